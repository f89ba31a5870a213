"""Routing rules: config/rules.toml loads; invalid rules fail naming the rule and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.router.rules import Rule, RuleError, RuleSet, load_rules, parse_rules
from pipeline.schemas import SchemaSet
from tests.unit.unit_helpers import RULES_FILE, TEMPLATES_DIR

GOOD = {
    "name": "welcome-email",
    "event": "user-registered",
    "channel": "email",
    "recipient": "email",
    "template": "welcome",
}


def test_config_rules_load(rules: RuleSet) -> None:
    assert len(rules) == 3
    assert [r.name for r in rules.for_event("user-registered")] == ["welcome-email"]
    assert [r.name for r in rules.for_event("password-reset-requested")] == ["password-reset-email"]
    assert [r.name for r in rules.for_event("order-shipped")] == ["order-shipped-email"]
    assert rules.for_event("no-such-event") == []


def test_config_rules_name_declared_events_and_existing_templates(
    rules: RuleSet, schemas: SchemaSet
) -> None:
    declared = {et.name for et in schemas.event_types()}
    for rule in rules.rules:
        assert rule.event in declared, rule
        assert (TEMPLATES_DIR / rule.template / "body.txt").is_file(), rule


def test_a_valid_rule_parses_with_its_condition() -> None:
    rules = parse_rules({"rules": [{**GOOD, "when": "locale == 'de'"}]})
    assert rules.rules == [Rule(**GOOD, when="locale == 'de'")]


def test_no_rules_is_an_empty_rule_set() -> None:
    assert len(parse_rules({})) == 0


def _rules(*items: dict[str, Any]) -> dict[str, Any]:
    return {"rules": list(items)}


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in GOOD.items() if k != key}


PARSE_ERRORS = [
    (
        "missing-template",
        _rules(GOOD, {**_without("template"), "name": "b"}),
        "rules[1]",
        "'template'",
    ),
    ("missing-name", _rules(_without("name")), "rules[0]", "'name'"),
    ("empty-recipient", _rules({**GOOD, "recipient": ""}), "rules[0]", "'recipient'"),
    ("non-string-channel", _rules({**GOOD, "channel": 5}), "rules[0]", "'channel'"),
    (
        "unknown-key",
        _rules(GOOD, {**GOOD, "name": "b", "recipients": "x"}),
        "rules[1]",
        "recipients",
    ),
    (
        "bad-name-space",
        _rules({**GOOD, "name": "Welcome Email"}),
        "rules[0]",
        "name 'Welcome Email'",
    ),
    ("bad-name-leading-dash", _rules({**GOOD, "name": "-x"}), "rules[0]", "name '-x'"),
    ("non-string-when", _rules({**GOOD, "when": True}), "rules[0]", "'when'"),
    ("not-a-table", _rules(GOOD, "welcome"), "rules[1]", "table"),
    # The duplicate is the second rule: the message should point at it like every other error.
    (
        "duplicate-name",
        _rules(GOOD, {**GOOD, "event": "order-shipped"}),
        "rules[1]",
        "'welcome-email'",
    ),
]


@pytest.mark.parametrize(
    ("doc", "index", "key"), [c[1:] for c in PARSE_ERRORS], ids=[c[0] for c in PARSE_ERRORS]
)
def test_parse_errors_name_the_rule_index_and_key(
    doc: dict[str, Any], index: str, key: str
) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules(doc, "my-rules.toml")
    message = str(info.value)
    assert "my-rules.toml" in message
    assert index in message
    assert key in message


def test_rules_must_be_an_array_of_tables() -> None:
    with pytest.raises(RuleError, match=r"my-rules.toml: 'rules' must be an array"):
        parse_rules({"rules": {"name": "x"}}, "my-rules.toml")


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="not found"):
        load_rules(tmp_path / "nope.toml")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("[[rules]\nname = ")
    with pytest.raises(RuleError, match="invalid TOML") as info:
        load_rules(path)
    assert str(path) in str(info.value)


def test_load_errors_name_the_file_and_rule(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULES_FILE.read_text() + '\n[[rules]]\nname = "x"\nevent = "e"\n')
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert f"{path}: rules[3]: 'channel' is required" in str(info.value)
