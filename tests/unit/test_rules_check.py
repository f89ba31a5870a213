"""`herald rules check` (pipeline/router/check.py): the shipped configuration passes, and each
kind of mistake is found before any event arrives, by the same function the router runs at
start."""

from __future__ import annotations

import shutil
from pathlib import Path

import fastavro.validation
import pytest

from connectors.registry import installed_channels
from pipeline.examples import example_record
from pipeline.router.app import create_handler
from pipeline.router.check import RulesCheckError, check_rules
from pipeline.router.rules import RuleSet, parse_rules
from pipeline.router.templates import Templates
from pipeline.schemas import SchemaSet
from pipeline.settings import HeraldSettings
from tests.unit.unit_helpers import RULES_FILE, SCHEMAS_DIR, TEMPLATES_DIR


def test_the_shipped_rules_templates_and_schemas_pass(
    rules: RuleSet, templates: Templates, schemas: SchemaSet
) -> None:
    report = check_rules(rules, templates, schemas, installed_channels())
    assert report.problems == []
    assert report.rules == len(rules) == 3
    assert report.templates == 3
    assert {i.rule: i.subject for i in report.rendered} == {
        "welcome-email": "Welcome to Herald, example!",
        "password-reset-email": "Reset your password",
        "order-shipped-email": "Your order example is on its way",
    }
    assert {i.recipient for i in report.rendered} == {"user@example.com"}


@pytest.mark.parametrize("full", [False, True])
def test_example_records_fit_every_schema(schemas: SchemaSet, full: bool) -> None:
    for schema in schemas:
        record = example_record(schema.definition, full=full)
        assert fastavro.validation.validate(record, schema.parsed, raise_errors=True)


def test_examples_leave_optional_fields_null_only_when_minimal(schemas: SchemaSet) -> None:
    definition = schemas.latest("herald.events.UserRegistered").definition
    minimal = example_record(definition)
    full = example_record(definition, full=True)
    assert minimal["locale"] is None and minimal["phone"] is None
    assert full["locale"] == "example" and full["phone"].startswith("+")
    assert minimal["email"] == "user@example.com"
    assert minimal["envelope"]["occurred_at"].tzinfo is not None


def _templates(tmp_path: Path, extra: dict[str, str] | None = None) -> Templates:
    directory = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, directory)
    for name, text in (extra or {}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Templates(directory)


RULE = """
[[rules]]
name = "{name}"
event = "{event}"
channel = "{channel}"
{target}
template = "{template}"
{more}
"""


def _rules(**fields: str) -> RuleSet:
    values = {
        "name": "r1",
        "event": "user-registered",
        "channel": "email",
        "target": 'recipient = "email"',
        "template": "welcome",
        "more": "",
        **fields,
    }
    import tomllib

    return parse_rules(tomllib.loads(RULE.format(**values)))


CASES = [
    ({"channel": "pigeon"}, {}, "unknown channel 'pigeon'"),
    ({"event": "user-deleted"}, {}, "unknown event 'user-deleted'"),
    ({"template": "farewell"}, {}, "no template 'farewell'"),
    ({}, {"broken/body.txt": "Hi {{ name "}, "broken/body.txt:1:"),
    ({"template": "t"}, {"t/body.txt": "Hi {{ nickname }}"}, "'nickname' is undefined"),
    # Optional fields are null in events that lack them: a template must allow for that.
    ({"template": "t"}, {"t/body.txt": "{{ locale.upper() }}"}, "optional fields null"),
    ({"more": 'when = "locale.startswith("'}, {}, "condition"),
    ({"more": 'data = { url = "{{ nowhere }}" }'}, {}, "'nowhere' is undefined"),
    ({"target": 'to = "{{ missing_field }}"'}, {}, "'missing_field' is undefined"),
]


@pytest.mark.parametrize(("rule", "files", "problem"), CASES)
def test_each_kind_of_mistake_is_found(
    tmp_path: Path,
    schemas: SchemaSet,
    rule: dict[str, str],
    files: dict[str, str],
    problem: str,
) -> None:
    report = check_rules(_rules(**rule), _templates(tmp_path, files), schemas, installed_channels())
    assert len(report.problems) == 1, report.problems
    assert problem in report.problems[0]
    with pytest.raises(RulesCheckError, match="1 problem in the routing rules"):
        report.raise_for_problems()


def test_a_condition_that_guards_an_optional_recipient_is_respected(
    tmp_path: Path, schemas: SchemaSet
) -> None:
    templates = _templates(tmp_path)
    rules = _rules(channel="sms", target='recipient = "phone"', more='when = "phone is not none"')
    report = check_rules(rules, templates, schemas, installed_channels())
    assert report.problems == []
    assert report.rendered[0].recipient.startswith("+")
    # Without the condition, events without a phone number get a dead letter for this rule
    # (a failing rule fails alone): a warning with the condition to add, not a refusal.
    unguarded = _rules(channel="sms", target='recipient = "phone"')
    report = check_rules(unguarded, templates, schemas, installed_channels())
    assert report.problems == []
    [warning] = report.warnings
    assert "recipient field 'phone' is missing" in warning
    assert 'when = "phone is not none"' in warning


def test_the_router_runs_the_same_check_at_start(tmp_path: Path) -> None:
    templates = _templates(tmp_path, {"welcome/subject.txt": "Welcome {{ nickname }}"})
    settings = HeraldSettings(
        schemas_dir=SCHEMAS_DIR, rules_file=RULES_FILE, templates_dir=templates.directory
    )
    with pytest.raises(RulesCheckError, match="'nickname' is undefined"):
        create_handler(settings)
