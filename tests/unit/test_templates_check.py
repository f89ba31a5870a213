"""``herald templates check``: the shipped templates pass; a missing translation, an
undefined variable and a template that does not render with an example event fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.router.rules import Rule, RuleSet, load_rules
from pipeline.router.templates import Templates
from pipeline.router.templates_check import check_templates, example_record
from pipeline.schemas import SchemaSet
from tests.unit.unit_helpers import ROOT, RULES_FILE, TEMPLATES_DIR, write_template

WELCOME = Rule("welcome-email", "user-registered", "email", "welcome", recipient="email")
RESET = Rule("reset", "password-reset-requested", "email", "reset", recipient="email")


def test_the_shipped_templates_pass(schemas: SchemaSet) -> None:
    """What `make test` runs: the templates in config/ against the rules and schemas."""
    problems = check_templates(Templates(TEMPLATES_DIR), load_rules(RULES_FILE), schemas)
    assert [str(p) for p in problems] == []


def test_the_command_passes_on_the_shipped_templates() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "templates", "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok: 3 templates, translations pt" in done.stderr


@pytest.fixture
def good(tmp_path: Path) -> Path:
    write_template(tmp_path, "welcome", subject="Hi {{ display_name }}", body_txt="Hi {{ email }}")
    write_template(tmp_path / "welcome", "pt", subject="Olá {{ display_name }}", body_txt="Olá")
    write_template(tmp_path, "reset", subject="Reset", body_txt="{{ reset_url }}")
    write_template(tmp_path / "reset", "pt", subject="Redefinir", body_txt="{{ reset_url }}")
    return tmp_path


def problems(directory: Path, schemas: SchemaSet, *rules: Rule) -> list[str]:
    found = check_templates(Templates(directory), RuleSet(list(rules or (WELCOME, RESET))), schemas)
    return [str(p) for p in found]


def test_a_complete_set_passes(good: Path, schemas: SchemaSet) -> None:
    assert problems(good, schemas) == []


def test_a_missing_translation_fails(good: Path, schemas: SchemaSet) -> None:
    shutil.rmtree(good / "reset" / "pt")
    [problem] = problems(good, schemas)
    assert "reset" in problem and "missing translation pt (welcome has one)" in problem


def test_a_missing_part_of_a_translation_fails(good: Path, schemas: SchemaSet) -> None:
    (good / "reset" / "pt" / "subject.txt").unlink()
    [problem] = problems(good, schemas)
    assert "reset/pt" in problem and "missing subject.txt" in problem


def test_the_missing_translation_fails_the_command(good: Path) -> None:
    shutil.rmtree(good / "reset" / "pt")
    rules = good / "rules.toml"
    rules.write_text(
        '[[rules]]\nname = "w"\nevent = "user-registered"\nchannel = "email"\n'
        'recipient = "email"\ntemplate = "welcome"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "templates", "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={
            **os.environ,
            "HERALD_TEMPLATES_DIR": str(good),
            "HERALD_RULES_FILE": str(rules),
        },
    )
    assert done.returncode == 1
    assert "missing translation pt" in done.stdout
    assert "1 problem(s)" in done.stderr


def test_an_undefined_variable_fails(good: Path, schemas: SchemaSet) -> None:
    write_template(good / "welcome", "pt", body_txt="Olá {{ nickname }}")
    [problem] = problems(good, schemas)
    assert "welcome/pt/body.txt: undefined variable 'nickname'" in problem
    assert "herald.events.UserRegistered" in problem


def test_context_names_and_jinja_globals_are_known(good: Path, schemas: SchemaSet) -> None:
    write_template(
        good,
        "welcome",
        subject="{{ subscriber.email }} {{ locale }} {{ category }} {{ event.user_id }}",
        body_txt="{% for i in range(2) %}{{ i }}{% endfor %} {{ unsubscribe_url }}{{ rule }}",
    )
    assert problems(good, schemas) == []


def test_rule_templates_are_checked_too(good: Path, schemas: SchemaSet) -> None:
    rule = Rule(
        "w", "user-registered", "webhook", "welcome", to="https://x/{{ uid }}", when="loc == 1"
    )
    found = problems(good, schemas, rule, RESET)
    assert any("'to': undefined variable 'uid'" in p for p in found)
    assert any("'when': undefined variable 'loc'" in p for p in found)


def test_a_template_that_fails_on_a_null_optional_field_fails(
    good: Path, schemas: SchemaSet
) -> None:
    write_template(good, "welcome", subject="Hi", body_txt="{{ phone.upper() }}")
    write_template(good / "welcome", "pt", subject="Olá", body_txt="{{ phone }}")
    [problem] = problems(good, schemas)
    assert "does not render welcome (default, nulls)" in problem


def test_a_null_optional_field_is_fine_when_printed(good: Path, schemas: SchemaSet) -> None:
    write_template(good, "welcome", subject="Hi", body_txt="{{ phone }}{{ locale }}")
    assert problems(good, schemas) == []


def test_a_syntax_error_fails(good: Path, schemas: SchemaSet) -> None:
    write_template(good, "unused", body_txt="{% if %}")
    found = problems(good, schemas)
    assert any("unused/body.txt:1: syntax error" in p for p in found)


def test_example_records_fill_or_null_every_field(schemas: SchemaSet) -> None:
    schema = schemas.latest("herald.events.OrderShipped").parsed
    full = example_record(schema)
    assert full["items"] and full["tracking_url"] == "example tracking_url"
    empty = example_record(schema, nulls=True)
    assert empty["items"] == [] and empty["tracking_url"] is None
