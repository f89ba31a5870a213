"""The router's mapping: one decoded event in, its notification intents out. Pure: no Kafka,
no clock (the caller passes ``now``), no I/O beyond the templates loaded at start-up; what
it knows about people comes from the lookups passed in (``People``).

Each matching rule is applied on its own. A rule that cannot be applied (no recipient, a
template that fails) is a failure of that rule alone: ``Routed.failures`` names it and the
other rules' intents are made all the same. A notification the person does not want (an
opt-out of the rule's category on its channel) or that goes to a suppressed address is not
made: ``Routed.suppressed`` says which and why, so the router can write a SUPPRESSED status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pipeline.people.policy import Decision, PreferencePolicy
from pipeline.people.records import Preferences, Subscriber, Suppression
from pipeline.people.unsubscribe import UnsubscribeLinks
from pipeline.records import DATA_LIST_UNSUBSCRIBE_URL, NotificationIntent, notification_id
from pipeline.router.rules import Rule, RuleSet
from pipeline.router.templates import Rendered, TemplateRenderError, Templates

__all__ = [
    "ADDRESS_SUPPRESSED",
    "OPTED_OUT",
    "MissingRecipientError",
    "People",
    "Routed",
    "RoutingError",
    "Suppressed",
    "route",
]

OPTED_OUT = "OptedOut"  # error_class of a SUPPRESSED status for a preference
ADDRESS_SUPPRESSED = "AddressSuppressed"  # ... for a suppressed address


class RoutingError(ValueError):
    """An event matched a rule but no intent could be made from it. ``field`` names the
    event field at fault, when there is one."""

    def __init__(self, rule: str, message: str, field: str | None = None) -> None:
        self.rule = rule
        self.field = field
        super().__init__(f"rule {rule!r}: {message}")


class MissingRecipientError(RoutingError):
    pass


class People(Protocol):
    """What the mapping asks about people: the router's tables (pipeline/people/tables.py),
    or a stand-in in tests."""

    @property
    def policy(self) -> PreferencePolicy: ...

    @property
    def links(self) -> UnsubscribeLinks | None: ...

    def subscriber(self, user_id: str) -> Subscriber | None: ...

    def preferences(self, user_id: str) -> Preferences | None: ...

    def suppressed(self, channel: str, address: str) -> Suppression | None: ...


@dataclass(frozen=True)
class Suppressed:
    """A notification not made, and why (``reason`` in words, ``error_class`` OPTED_OUT or
    ADDRESS_SUPPRESSED)."""

    notification_id: str
    event_id: str
    event_type: str
    rule: str
    channel: str
    recipient: str
    user_id: str | None
    reason: str
    error_class: str
    traceparent: str | None = None


@dataclass(frozen=True)
class Routed:
    intents: list[NotificationIntent] = field(default_factory=list)
    failures: list[RoutingError] = field(default_factory=list)  # one per failed rule
    suppressed: list[Suppressed] = field(default_factory=list)


def _lookup(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def route(
    event_type: str,
    record: dict[str, Any],
    rules: RuleSet,
    templates: Templates,
    now: datetime,
    people: People | None = None,
) -> Routed:
    """The intents for one event: one per matching rule and recipient, in rule order; the
    failures of the rules that could not be applied; what was suppressed. An event no rule
    matches yields nothing. Without ``people``, no subscriber, preference or suppression is
    known: every rule takes its recipient from the event."""
    matching = rules.for_event(event_type)
    if not matching:
        return Routed()
    envelope = record.get("envelope") or {}
    event_id = str(envelope.get("event_id"))
    raw_user = record.get("user_id")
    user_id = str(raw_user) if raw_user is not None else None
    subscriber = prefs = None
    if people is not None and user_id:
        subscriber = people.subscriber(user_id)
        prefs = people.preferences(user_id)
    locale = (subscriber.locale if subscriber else None) or _text(record.get("locale"))
    time_zone = (subscriber.time_zone if subscriber else None) or _text(record.get("time_zone"))
    base = {
        **record,
        "event_type": event_type,
        "event": record,
        "subscriber": subscriber.context() if subscriber else _no_subscriber(user_id),
        "locale": locale,
        "time_zone": time_zone,
    }
    out = Routed()
    for rule in matching:
        context = {
            **base,
            "category": rule.category,
            "channel": rule.channel,
            "rule": rule.name,
            "unsubscribe_url": None,
        }
        try:
            if rule.when is not None and not templates.condition(rule.when, context):
                continue
            made = _apply(
                rule, templates, event_type, event_id, record, envelope, context, now,
                people, subscriber, prefs, user_id, locale,
            )  # fmt: skip
        except TemplateRenderError as e:
            out.failures.append(RoutingError(rule.name, str(e)))
            continue
        except RoutingError as e:
            out.failures.append(e)
            continue
        out.intents.extend(made.intents)
        out.suppressed.extend(made.suppressed)
    return out


def _no_subscriber(user_id: str | None) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "email": None,
        "phone": None,
        "locale": None,
        "time_zone": None,
        "custom": {},
    }


def _apply(
    rule: Rule,
    templates: Templates,
    event_type: str,
    event_id: str,
    record: dict[str, Any],
    envelope: dict[str, Any],
    context: dict[str, Any],
    now: datetime,
    people: People | None,
    subscriber: Subscriber | None,
    prefs: Preferences | None,
    user_id: str | None,
    locale: str | None,
) -> Routed:
    """One rule's intents and suppressions. Raises RoutingError (or TemplateRenderError)
    when the rule cannot be applied; then nothing of it is made."""
    decision = (
        people.policy.decide(prefs, rule.category, rule.channel) if people else Decision(True)
    )
    try:
        recipients = _recipients(rule, templates, record, subscriber, context)
    except MissingRecipientError:
        if decision.send:
            raise
        recipients = [""]  # opted out and no address: nothing would go anyway
    traceparent = envelope.get("traceparent")
    out = Routed()

    def suppress(recipient: str, reason: str, error_class: str) -> None:
        nid = notification_id(event_id, rule.name, rule.channel, recipient)
        out.suppressed.append(
            Suppressed(
                notification_id=nid,
                event_id=event_id,
                event_type=event_type,
                rule=rule.name,
                channel=rule.channel,
                recipient=recipient,
                user_id=user_id,
                reason=reason,
                error_class=error_class,
                traceparent=traceparent,
            )
        )

    deliver = []
    for recipient in recipients:
        if not decision.send:
            suppress(recipient, decision.reason or "opted out", OPTED_OUT)
            continue
        found = people.suppressed(rule.channel, recipient) if people else None
        if found is not None:
            suppress(recipient, f"address suppressed: {found.describe()}", ADDRESS_SUPPRESSED)
            continue
        deliver.append(recipient)
    if not deliver:
        return out
    data: dict[str, str] = {}
    links = people.links if people else None
    if (
        links is not None
        and rule.channel == "email"
        and user_id
        and not (people is not None and people.policy.is_critical(rule.category))
    ):
        data = links.data(user_id, rule.category, rule.channel, now)
        context = {**context, "unsubscribe_url": data[DATA_LIST_UNSUBSCRIBE_URL]}
    data = {**{k: templates.render_string(v, context) for k, v in rule.data.items()}, **data}
    rendered: Rendered = templates.render(rule.template, context, locale)
    for recipient in deliver:
        out.intents.append(
            NotificationIntent(
                notification_id=notification_id(event_id, rule.name, rule.channel, recipient),
                event_id=event_id,
                event_type=event_type,
                rule=rule.name,
                channel=rule.channel,
                recipient=recipient,
                subject=rendered.subject,
                body_text=rendered.body_text,
                body_html=rendered.body_html,
                user_id=user_id,
                data=dict(data),
                created_at=now,
                traceparent=traceparent,
            )
        )
    return out


def _recipients(
    rule: Rule,
    templates: Templates,
    record: dict[str, Any],
    subscriber: Subscriber | None,
    context: dict[str, Any],
) -> list[str]:
    """The rule's recipients: the first of its sources that gives any (several only for
    subscriber devices), or the rendered ``to``."""
    if rule.recipient is None:
        assert rule.to is not None  # noqa: S101 - parse_rules guarantees one of the two
        recipient = templates.render_string(rule.to, context).strip()
        if not recipient:
            raise MissingRecipientError(rule.name, f"'to' template {rule.to!r} rendered empty")
        return [recipient]
    for source in rule.sources:
        if source.kind == "event":
            found = _text(_lookup(record, source.path))
        elif subscriber is None:
            continue
        elif source.kind == "subscriber":
            found = _text(getattr(subscriber, source.path))
        elif source.kind == "custom":
            found = _text(subscriber.custom.get(source.path))
        else:  # devices
            tokens = [t.strip() for t in subscriber.devices.get(source.path, []) if t.strip()]
            if tokens:
                return list(dict.fromkeys(tokens))
            continue
        if found is not None:
            return [found]
    if len(rule.sources) == 1:
        message = f"recipient field {rule.recipient!r} is missing or empty"
    else:
        message = f"no recipient: {' and '.join(map(str, rule.sources))} are missing or empty"
    raise MissingRecipientError(rule.name, message, rule.recipient)
