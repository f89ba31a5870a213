"""mapping.route: event in, intents out, with the real config/rules.toml and templates."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline.records import notification_id
from pipeline.router.mapping import MissingRecipientError, RoutingError
from pipeline.router.mapping import route as route_all
from pipeline.router.rules import Rule, RuleSet
from pipeline.router.templates import Templates
from tests.unit.unit_helpers import NOW, TEMPLATES_DIR, envelope, order_shipped, user_registered


def route(*args: Any, **kwargs: Any) -> list[Any]:
    """The intents of an event whose rules all apply."""
    routed = route_all(*args, **kwargs)
    assert routed.failures == [] and routed.suppressed == []
    return routed.intents


def failure(*args: Any, **kwargs: Any) -> RoutingError:
    """The one failure of an event whose one rule cannot be applied."""
    routed = route_all(*args, **kwargs)
    assert routed.intents == []
    [error] = routed.failures
    return error


def _decoded(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the serde hands it over: uuid fields as UUID objects."""
    env = dict(record["envelope"])
    env["event_id"] = uuid.UUID(env["event_id"])
    return {**record, "envelope": env}


def test_user_registered_makes_one_welcome_email(rules: RuleSet, templates: Templates) -> None:
    record = _decoded(user_registered())
    [intent] = route("user-registered", record, rules, templates, NOW)
    event_id = str(record["envelope"]["event_id"])
    assert intent.notification_id == notification_id(
        event_id, "welcome-email", "email", "ada@example.com"
    )
    assert uuid.UUID(intent.notification_id).version == 5
    assert intent.event_id == event_id
    assert intent.event_type == "user-registered"
    assert intent.rule == "welcome-email"
    assert intent.channel == "email"
    assert intent.recipient == "ada@example.com"
    assert intent.user_id == "u-42"
    assert intent.subject == "Welcome to Herald, Ada!"
    assert intent.body_text.startswith("Hi Ada, your account is ready.")
    assert "ada@example.com" in intent.body_text
    assert intent.body_html is not None and intent.body_html.startswith("<p>Hi Ada,")
    assert intent.created_at == NOW
    assert intent.traceparent == record["envelope"]["traceparent"]
    assert intent.generation == 0
    assert intent.idempotency_key == intent.notification_id


def test_notification_id_is_deterministic(rules: RuleSet, templates: Templates) -> None:
    record = _decoded(user_registered())
    later = NOW.replace(year=2030)
    a = route("user-registered", record, rules, templates, NOW)[0]
    b = route("user-registered", _decoded(user_registered()), rules, templates, later)[0]
    assert a.notification_id == b.notification_id


@pytest.mark.parametrize(
    "change",
    [
        {"email": "grace@example.com"},
        {"envelope": envelope(event_id="5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a")},
    ],
    ids=["other-recipient", "other-event"],
)
def test_notification_id_differs_per_recipient_and_event(
    rules: RuleSet, templates: Templates, change: dict[str, Any]
) -> None:
    a = route("user-registered", _decoded(user_registered()), rules, templates, NOW)[0]
    b = route("user-registered", _decoded(user_registered(**change)), rules, templates, NOW)[0]
    assert a.notification_id != b.notification_id


def test_notification_id_inputs_do_not_run_together() -> None:
    """The parts are separated, so shifting characters between them changes the id."""
    assert notification_id("e", "r", "email", "ab") != notification_id("e", "r", "emaila", "b")
    assert notification_id("e", "r", "c", "x") == notification_id("e", "r", "c", "x")


def test_recipient_is_trimmed(rules: RuleSet, templates: Templates) -> None:
    [intent] = route(
        "user-registered",
        _decoded(user_registered(email="  ada@example.com\n")),
        rules,
        templates,
        NOW,
    )
    assert intent.recipient == "ada@example.com"


def test_order_shipped_renders_items(rules: RuleSet, templates: Templates) -> None:
    [intent] = route("order-shipped", _decoded(order_shipped()), rules, templates, NOW)
    assert intent.subject == "Your order o-1 is on its way"
    assert "- 2 x Widget" in intent.body_text
    assert intent.body_html is None


def test_password_reset_renders_expiry(rules: RuleSet, templates: Templates) -> None:
    record = {
        "envelope": envelope(),
        "user_id": "u-1",
        "email": "ada@example.com",
        "reset_url": "https://example.com/r/1",
        "expires_at": NOW,
        "requested_ip": None,
    }
    [intent] = route("password-reset-requested", _decoded(record), rules, templates, NOW)
    assert "2024-05-06 07:08 UTC" in intent.body_text
    assert "https://example.com/r/1" in intent.body_text


def test_no_rule_for_the_event_makes_nothing(rules: RuleSet, templates: Templates) -> None:
    assert route("account-closed", _decoded(user_registered()), rules, templates, NOW) == []


def _rules(**rule: Any) -> RuleSet:
    base = {
        "name": "german-welcome",
        "event": "user-registered",
        "channel": "email",
        "recipient": "email",
        "template": "welcome",
    }
    return RuleSet([Rule(**{**base, **rule})])


def test_false_condition_makes_nothing(templates: Templates) -> None:
    rules = _rules(when="locale == 'de'")
    assert route("user-registered", _decoded(user_registered()), rules, templates, NOW) == []
    de = _decoded(user_registered(locale="de"))
    assert len(route("user-registered", de, rules, templates, NOW)) == 1


def test_condition_sees_the_event_type_and_the_event(templates: Templates) -> None:
    rules = _rules(when="event_type == 'user-registered' and event.user_id == 'u-42'")
    assert len(route("user-registered", _decoded(user_registered()), rules, templates, NOW)) == 1


def test_several_rules_make_several_intents_in_rule_order(templates: Templates) -> None:
    rules = RuleSet(
        [
            Rule("a-welcome", "user-registered", "email", template="welcome", recipient="email"),
            Rule("b-welcome", "user-registered", "email", template="welcome", recipient="email"),
        ]
    )
    intents = route("user-registered", _decoded(user_registered()), rules, templates, NOW)
    assert [i.rule for i in intents] == ["a-welcome", "b-welcome"]
    assert intents[0].notification_id != intents[1].notification_id


@pytest.mark.parametrize(
    ("recipient_path", "record"),
    [
        ("email", user_registered(email="")),
        ("email", user_registered(email="   ")),
        ("email", {k: v for k, v in user_registered().items() if k != "email"}),
        ("contact.email", user_registered()),
        ("user_id.email", user_registered()),
    ],
    ids=["empty", "blank", "absent", "absent-nested", "not-a-record"],
)
def test_missing_recipient(
    templates: Templates, recipient_path: str, record: dict[str, Any]
) -> None:
    rules = _rules(recipient=recipient_path)
    error = failure("user-registered", _decoded(record), rules, templates, NOW)
    assert isinstance(error, MissingRecipientError)
    assert error.field == recipient_path
    assert error.rule == "german-welcome"
    assert "german-welcome" in str(error)


def test_nested_recipient_path(templates: Templates) -> None:
    rules = _rules(recipient="envelope.producer")
    [intent] = route("user-registered", _decoded(user_registered()), rules, templates, NOW)
    assert intent.recipient == "unit-tests"


def test_template_failure_is_a_routing_error(tmp_path: Path) -> None:
    (tmp_path / "welcome").mkdir()
    (tmp_path / "welcome" / "body.txt").write_text("{{ no_such_field }}")
    error = failure(
        "user-registered", _decoded(user_registered()), _rules(), Templates(tmp_path), NOW
    )
    assert "german-welcome" in str(error)
    assert not isinstance(error, MissingRecipientError)


def test_condition_failure_is_a_routing_error() -> None:
    rules = _rules(when="no_such_field.startswith('x')")
    error = failure(
        "user-registered", _decoded(user_registered()), rules, Templates(TEMPLATES_DIR), NOW
    )
    assert "condition" in str(error)


@pytest.mark.parametrize(
    ("body", "when"),
    [("{{ display_name + 1 }}", None), ("fine", "locale > 5")],
    ids=["template-type-error", "condition-type-error"],
)
def test_python_errors_in_templates_are_routing_errors(
    tmp_path: Path, body: str, when: str | None
) -> None:
    """A template or condition that fails on an event's values (here str + int, str > int)
    is a rule failure like any other template failure, not a bare TypeError escaping route()
    (which the router would log as an unexpected bug)."""
    (tmp_path / "welcome").mkdir()
    (tmp_path / "welcome" / "body.txt").write_text(body)
    error = failure(
        "user-registered", _decoded(user_registered()), _rules(when=when), Templates(tmp_path), NOW
    )
    assert "german-welcome" in str(error)
