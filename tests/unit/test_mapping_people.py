"""route() with people: recipients from the subscriber and their fallbacks, device fan-out,
preferences and suppressions, unsubscribe links, locales; and a failing rule that fails
alone (in route() and in RouterHandler)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from babel.dates import format_datetime

from pipeline import headers as h
from pipeline.people.policy import PreferencePolicy
from pipeline.people.records import Preferences, Subscriber, Suppression, suppression_key
from pipeline.people.unsubscribe import UnsubscribeLinks, verify
from pipeline.records import (
    DATA_LIST_UNSUBSCRIBE_MAILTO,
    DATA_LIST_UNSUBSCRIBE_URL,
    DELIVERY_STATUS,
    NOTIFICATION_INTENT,
    notification_id,
)
from pipeline.router.handler import RouterHandler
from pipeline.router.mapping import ADDRESS_SUPPRESSED, OPTED_OUT, MissingRecipientError, route
from pipeline.router.rules import Rule, RuleError, RuleSet, parse_rules
from pipeline.router.templates import Templates
from pipeline.serialization import AvroSerde
from pipeline.topics import Topics
from tests.unit.unit_helpers import (
    NOW,
    USER_REGISTERED,
    envelope,
    user_registered,
    write_template,
)

SECRET = b"unit-secret"


@dataclass
class People:
    """A stand-in for PeopleTables."""

    subscribers: dict[str, Subscriber] = field(default_factory=dict)
    prefs: dict[str, Preferences] = field(default_factory=dict)
    gone: dict[str, Suppression] = field(default_factory=dict)
    policy: PreferencePolicy = field(
        default_factory=lambda: PreferencePolicy(critical=frozenset({"security"}))
    )
    links: UnsubscribeLinks | None = None

    def subscriber(self, user_id: str) -> Subscriber | None:
        return self.subscribers.get(user_id)

    def preferences(self, user_id: str) -> Preferences | None:
        return self.prefs.get(user_id)

    def suppressed(self, channel: str, address: str) -> Suppression | None:
        return self.gone.get(suppression_key(channel, address))

    def describe(self, channel: str, address: str) -> str:
        return address

    def suppress(self, channel: str, address: str, reason: str = "bounced") -> None:
        self.gone[suppression_key(channel, address)] = Suppression(
            channel, address, reason, "unit", detail="550 5.1.1 Mailbox unavailable"
        )


def decoded(record: dict[str, Any]) -> dict[str, Any]:
    env = dict(record["envelope"])
    env["event_id"] = uuid.UUID(env["event_id"])
    return {**record, "envelope": env}


def rule(name: str = "welcome-email", **kw: Any) -> Rule:
    base: dict[str, Any] = {
        "name": name,
        "event": "user-registered",
        "channel": "email",
        "template": "welcome",
        "recipient": "subscriber.email|email",
    }
    base.update(kw)
    return Rule(**base)


ADA = Subscriber(
    "u-42",
    email="ada@stored.example.com",
    phone="+447911123456",
    devices={"fcm": ["tok-1", "tok-2", "tok-1"]},
    custom={"plan": "gold"},
)


def test_the_subscriber_address_comes_first(templates: Templates) -> None:
    people = People({"u-42": ADA})
    routed = route(
        "user-registered", decoded(user_registered()), RuleSet([rule()]), templates, NOW, people
    )
    [intent] = routed.intents
    assert intent.recipient == "ada@stored.example.com"
    assert intent.notification_id == notification_id(
        str(intent.event_id), "welcome-email", "email", "ada@stored.example.com"
    )


@pytest.mark.parametrize(
    "people",
    [None, People(), People({"u-42": Subscriber("u-42", email=None)})],
    ids=["no-tables", "no-record", "no-address"],
)
def test_falls_back_to_the_event(templates: Templates, people: People | None) -> None:
    routed = route(
        "user-registered", decoded(user_registered()), RuleSet([rule()]), templates, NOW, people
    )
    [intent] = routed.intents
    assert intent.recipient == "ada@example.com"


def test_no_address_anywhere_names_every_source(templates: Templates) -> None:
    routed = route(
        "user-registered",
        decoded(user_registered()),
        RuleSet([rule(channel="sms", recipient="subscriber.phone|phone")]),
        templates,
        NOW,
        People(),
    )
    [error] = routed.failures
    assert isinstance(error, MissingRecipientError)
    assert "subscriber.phone and phone are missing or empty" in str(error)


def test_every_device_of_the_channel_gets_its_own_notification(templates: Templates) -> None:
    people = People({"u-42": ADA})
    rules = RuleSet([rule("welcome-push", channel="fcm", recipient="subscriber.devices")])
    routed = route("user-registered", decoded(user_registered()), rules, templates, NOW, people)
    assert [i.recipient for i in routed.intents] == ["tok-1", "tok-2"]  # duplicates once
    assert len({i.notification_id for i in routed.intents}) == 2


def test_custom_data_and_the_subscriber_in_templates(tmp_path: Path) -> None:
    write_template(
        tmp_path, "plan", subject="{{ subscriber.custom.plan }}", body_txt="Hi {{ display_name }}"
    )
    rules = RuleSet([rule(template="plan", recipient="subscriber.custom.backup|email")])
    routed = route(
        "user-registered",
        decoded(user_registered()),
        rules,
        Templates(tmp_path),
        NOW,
        People({"u-42": ADA}),
    )
    [intent] = routed.intents
    assert intent.subject == "gold" and intent.recipient == "ada@example.com"


def test_an_opt_out_suppresses_that_channel_only(templates: Templates) -> None:
    people = People({"u-42": ADA}, {"u-42": Preferences("u-42", {"marketing": {"email": False}})})
    rules = RuleSet(
        [
            rule("news-email", category="marketing"),
            rule("news-push", channel="fcm", recipient="subscriber.devices", category="marketing"),
        ]
    )
    routed = route("user-registered", decoded(user_registered()), rules, templates, NOW, people)
    assert [i.channel for i in routed.intents] == ["fcm", "fcm"]
    [s] = routed.suppressed
    assert (s.channel, s.recipient, s.rule) == ("email", "ada@stored.example.com", "news-email")
    assert (s.reason, s.error_class) == ("opted out of marketing on email", OPTED_OUT)
    assert s.notification_id == notification_id(s.event_id, "news-email", "email", s.recipient)


def test_a_critical_category_ignores_the_opt_out(templates: Templates) -> None:
    people = People({"u-42": ADA}, {"u-42": Preferences("u-42", {"*": {"*": False}})})
    rules = RuleSet([rule(category="security"), rule("news", category="marketing")])
    routed = route("user-registered", decoded(user_registered()), rules, templates, NOW, people)
    assert [i.rule for i in routed.intents] == ["welcome-email"]
    assert [s.rule for s in routed.suppressed] == ["news"]


def test_an_opted_out_person_without_an_address_is_suppressed_not_failed(
    templates: Templates,
) -> None:
    people = People({}, {"u-42": Preferences("u-42", {"marketing": {"sms": False}})})
    rules = RuleSet([rule(channel="sms", recipient="phone", category="marketing")])
    routed = route("user-registered", decoded(user_registered()), rules, templates, NOW, people)
    assert routed.failures == [] and routed.intents == []
    [s] = routed.suppressed
    assert s.error_class == OPTED_OUT


def test_a_suppressed_address_is_not_sent_to(templates: Templates) -> None:
    people = People({"u-42": ADA})
    people.suppress("email", "ada@stored.example.com")
    people.suppress("fcm", "tok-2", "gone")
    rules = RuleSet([rule(), rule("welcome-push", channel="fcm", recipient="subscriber.devices")])
    routed = route("user-registered", decoded(user_registered()), rules, templates, NOW, people)
    assert [i.recipient for i in routed.intents] == ["tok-1"]
    assert [(s.recipient, s.error_class) for s in routed.suppressed] == [
        ("ada@stored.example.com", ADDRESS_SUPPRESSED),
        ("tok-2", ADDRESS_SUPPRESSED),
    ]
    assert (
        routed.suppressed[0].reason == "address suppressed: bounced (550 5.1.1 Mailbox unavailable)"
    )


def test_non_critical_email_carries_unsubscribe_links(tmp_path: Path) -> None:
    write_template(tmp_path, "welcome", subject="Hi", body_txt="Bye: {{ unsubscribe_url }}")
    links = UnsubscribeLinks(SECRET, "https://notify.example.com", "unsubscribe@example.com")
    people = People({"u-42": ADA}, links=links)
    rules = RuleSet(
        [
            rule(category="marketing"),
            rule("reset", category="security"),
            rule("push", channel="fcm", recipient="subscriber.devices", category="marketing"),
        ]
    )
    routed = route(
        "user-registered", decoded(user_registered()), rules, Templates(tmp_path), NOW, people
    )
    by_rule = {i.rule: i for i in routed.intents}
    data = by_rule["welcome-email"].data
    token = data[DATA_LIST_UNSUBSCRIBE_URL].rsplit("/", 1)[1]
    found = verify(SECRET, token, NOW)
    assert (found.user_id, found.category, found.channel) == ("u-42", "marketing", "email")
    assert data[DATA_LIST_UNSUBSCRIBE_MAILTO].endswith(f"?subject={token}")
    assert by_rule["welcome-email"].body_text == f"Bye: {data[DATA_LIST_UNSUBSCRIBE_URL]}"
    assert DATA_LIST_UNSUBSCRIBE_URL not in by_rule["reset"].data, "critical: no unsubscribe"
    assert by_rule["reset"].body_text == "Bye:", "a null renders as empty text"
    assert DATA_LIST_UNSUBSCRIBE_URL not in by_rule["push"].data


def test_rules_may_not_set_the_reserved_data_keys() -> None:
    doc = {"rules": [{**rule().__dict__, "data": {DATA_LIST_UNSUBSCRIBE_URL: "x"}, "to": None}]}
    doc["rules"][0] = {k: v for k, v in doc["rules"][0].items() if v is not None and k != "when"}
    with pytest.raises(RuleError, match="reserved"):
        parse_rules(doc)


@pytest.mark.parametrize(
    ("recipient", "message"),
    [
        ("subscriber.address", "subscriber.email"),
        ("a b", "not a field path"),
        ("email|", "'' is not a field path"),
    ],
)
def test_invalid_recipients_are_refused(recipient: str, message: str) -> None:
    item = {"name": "r", "event": "user-registered", "channel": "email", "template": "welcome"}
    with pytest.raises(RuleError, match=message):
        parse_rules({"rules": [{**item, "recipient": recipient}]})


def test_category_defaults_to_transactional() -> None:
    item = {"name": "r", "event": "e", "channel": "email", "template": "t", "recipient": "email"}
    assert parse_rules({"rules": [item]}).rules[0].category == "transactional"
    with pytest.raises(RuleError, match="category"):
        parse_rules({"rules": [{**item, "category": "Not Valid"}]})


# -- locales ------------------------------------------------------------------------------------


def reset_event(**overrides: Any) -> dict[str, Any]:
    record = {
        "envelope": envelope(),
        "user_id": "u-42",
        "email": "ada@example.com",
        "reset_url": "https://example.com/r/1",
        "expires_at": NOW,
        "requested_ip": None,
    }
    record.update(overrides)
    return decoded(record)


RESET = RuleSet(
    [
        Rule(
            "password-reset-email",
            "password-reset-requested",
            "email",
            "password-reset",
            recipient="subscriber.email|email",
            category="security",
        )
    ]
)


def test_a_pt_br_subscriber_gets_the_pt_template_with_portuguese_dates(
    templates: Templates,
) -> None:
    people = People({"u-42": Subscriber("u-42", locale="pt-BR", time_zone="America/Sao_Paulo")})
    [intent] = route(
        "password-reset-requested", reset_event(), RESET, templates, NOW, people
    ).intents
    assert intent.subject == "Redefina sua senha"
    zone = ZoneInfo("America/Sao_Paulo")
    expected = format_datetime(NOW, "long", tzinfo=zone, locale="pt_BR")
    assert f"Ele expira em {expected}." in intent.body_text
    assert "6 de maio de 2024" in intent.body_text


def test_the_event_locale_when_the_subscriber_has_none(templates: Templates) -> None:
    record = decoded(user_registered(locale="pt_PT"))
    [intent] = route("user-registered", record, RuleSet([rule()]), templates, NOW, People()).intents
    assert intent.subject == "Boas-vindas ao Herald, Ada!"
    assert intent.body_html is not None and "sua conta está pronta" in intent.body_html


@pytest.mark.parametrize("locale", ["en-GB", "de", None, "not a locale"])
def test_other_locales_get_the_default(templates: Templates, locale: str | None) -> None:
    record = decoded(user_registered(locale=locale))
    [intent] = route("user-registered", record, RuleSet([rule()]), templates, NOW).intents
    assert intent.subject == "Welcome to Herald, Ada!"


def test_locale_fallback_chain(tmp_path: Path) -> None:
    write_template(tmp_path, "t", body_txt="default")
    write_template(tmp_path / "t", "pt", body_txt="pt")
    write_template(tmp_path / "t", "pt-BR", body_txt="pt-BR {{ 1234.5|format_number }}")
    t = Templates(tmp_path)
    assert t.render("t", {}, "pt-BR").body_text == "pt-BR 1.234,5"
    assert t.render("t", {}, "pt_br").body_text == "pt-BR 1.234,5"
    assert t.render("t", {}, "pt-PT").body_text == "pt"
    assert t.render("t", {}, "pt").body_text == "pt"
    assert t.render("t", {}, "fr").body_text == "default"


def test_babel_filters_follow_the_render_locale(tmp_path: Path) -> None:
    write_template(
        tmp_path,
        "f",
        body_txt=(
            "{{ when|format_date('long') }}|{{ amount|format_currency('EUR') }}|"
            "{{ ratio|format_percent }}|{{ missing|format_date }}|{{ missing }}|"
            "{{ when|format_time('short') }}"
        ),
    )
    t = Templates(tmp_path)
    ctx = {"when": NOW, "amount": 1234.5, "ratio": 0.25, "missing": None}
    de = t.render("f", {**ctx, "locale": "de", "time_zone": "Europe/Berlin"}).body_text
    assert de == "6. Mai 2024|1.234,50\xa0€|25\xa0%|||09:08"
    en = t.render("f", {**ctx, "locale": None}).body_text
    assert en == "May 6, 2024|€1,234.50|25%|||7:08\u202fAM"


def test_a_null_optional_field_renders_as_empty_text(tmp_path: Path) -> None:
    write_template(
        tmp_path,
        "n",
        subject="[{{ tracking_url }}]",
        body_txt="<{{ tracking_url }}>",
        body_html="<b>{{ tracking_url }}</b>",
    )
    r = Templates(tmp_path).render("n", {"tracking_url": None})
    assert (r.subject, r.body_text, r.body_html) == ("[]", "<>", "<b></b>")


# -- a failing rule fails alone -----------------------------------------------------------------


def test_one_failing_rule_does_not_stop_the_others(tmp_path: Path) -> None:
    write_template(tmp_path, "ok", subject="Hi", body_txt="Hi {{ display_name }}")
    write_template(tmp_path, "broken", body_txt="{{ no_such_field }}")
    rules = RuleSet(
        [
            rule("sms-without-phone", channel="sms", recipient="phone", template="ok"),
            rule("broken-template", template="broken"),
            rule("good", template="ok"),
        ]
    )
    routed = route("user-registered", decoded(user_registered()), rules, Templates(tmp_path), NOW)
    assert [i.rule for i in routed.intents] == ["good"]
    assert [f.rule for f in routed.failures] == ["sms-without-phone", "broken-template"]


def test_the_handler_writes_a_dead_letter_per_failed_rule_and_the_other_intents(
    serde: AvroSerde, tmp_path: Path
) -> None:
    write_template(tmp_path, "ok", subject="Hi", body_txt="Hi {{ display_name }}")
    rules = RuleSet(
        [
            rule("sms-without-phone", channel="sms", recipient="phone", template="ok"),
            rule("good", template="ok"),
        ]
    )
    handler = RouterHandler(serde, rules, Templates(tmp_path), Topics(), clock=lambda: NOW)
    value, _ = serde.encode(USER_REGISTERED, user_registered())
    out = handler.handle(
        key=b"u-42", value=value, headers=[], topic="events.user", partition=1, offset=7
    )
    dead = [o for o in out if o.dead]
    sent = [o for o in out if not o.dead]
    assert [o.topic for o in sent] == ["notifications.email"]
    [dl] = dead
    hd = h.as_dict(dl.headers)
    assert dl.topic == "events.dlq" and dl.value == value
    assert hd[h.ERROR_RULE] == "sms-without-phone"
    assert hd[h.ERROR_CLASS] == "MissingRecipientError"
    assert hd[h.ORIGINAL_OFFSET] == "7"


def test_the_handler_writes_suppressed_statuses(serde: AvroSerde, templates: Templates) -> None:
    people = People({"u-42": ADA}, {"u-42": Preferences("u-42", {"marketing": {"email": False}})})
    handler = RouterHandler(
        serde, RuleSet([rule(category="marketing")]), templates, Topics("p."), clock=lambda: NOW
    )
    value, _ = serde.encode(USER_REGISTERED, user_registered())
    [out] = handler.handle(
        key=b"u-42", value=value, headers=[], topic="p.events.user", partition=0, offset=0,
        people=people,
    )  # fmt: skip
    assert out.topic == "p.notifications.status" and not out.dead
    status = serde.decode(out.value, expect=DELIVERY_STATUS).record
    assert status["state"] == "SUPPRESSED" and status["attempts"] == 0
    assert status["error_class"] == OPTED_OUT
    assert status["recipient"] == "ada@stored.example.com"
    nid = str(status["notification_id"])
    assert out.key == nid.encode()
    assert h.as_dict(out.headers)[h.NOTIFICATION_ID] == nid


def test_an_oversize_rule_is_dead_lettered_alone(serde: AvroSerde, tmp_path: Path) -> None:
    write_template(tmp_path, "ok", subject="Hi", body_txt="Hi")
    write_template(tmp_path, "big", subject="Hi", body_txt="{{ 'x' * 5000 }}")
    rules = RuleSet([rule("big", template="big"), rule("ok", template="ok")])
    handler = RouterHandler(
        serde, rules, Templates(tmp_path), Topics(), clock=lambda: NOW, max_record_bytes=3000
    )
    value, _ = serde.encode(USER_REGISTERED, user_registered())
    out = handler.handle(
        key=b"u-42", value=value, headers=[], topic="events.user", partition=0, offset=0
    )
    assert [(o.topic, o.rule) for o in out] == [
        ("events.dlq", "big"),
        ("notifications.email", "ok"),
    ]
    assert h.as_dict(out[0].headers)[h.ERROR_CLASS] == "RecordTooLargeError"
    intent = serde.decode(out[1].value, expect=NOTIFICATION_INTENT).record
    assert intent["rule"] == "ok"
