"""The router's mapping: one decoded event in, its notification intents out. Pure: no Kafka,
no clock (the caller passes ``now``), no I/O beyond the templates loaded at start-up."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipeline.records import NotificationIntent, notification_id
from pipeline.router.rules import Rule, RuleSet
from pipeline.router.templates import TemplateRenderError, Templates

__all__ = ["MissingRecipientError", "RoutingError", "route"]


class RoutingError(ValueError):
    """An event matched a rule but no intent could be made from it. ``field`` names the
    event field at fault, when there is one."""

    def __init__(self, rule: str, message: str, field: str | None = None) -> None:
        self.rule = rule
        self.field = field
        super().__init__(f"rule {rule!r}: {message}")


class MissingRecipientError(RoutingError):
    pass


def _lookup(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def route(
    event_type: str,
    record: dict[str, Any],
    rules: RuleSet,
    templates: Templates,
    now: datetime,
) -> list[NotificationIntent]:
    """The intents for one event: one per matching rule, in rule order. An event no rule
    matches yields none. Raises RoutingError when a matching rule cannot be applied."""
    matching = rules.for_event(event_type)
    if not matching:
        return []
    envelope = record.get("envelope") or {}
    event_id = str(envelope.get("event_id"))
    context = {**record, "event_type": event_type, "event": record}
    intents = []
    for rule in matching:
        try:
            if rule.when is not None and not templates.condition(rule.when, context):
                continue
            intents.append(
                _intent(rule, templates, event_type, event_id, record, envelope, context, now)
            )
        except TemplateRenderError as e:
            raise RoutingError(rule.name, str(e)) from e
    return intents


def _intent(
    rule: Rule,
    templates: Templates,
    event_type: str,
    event_id: str,
    record: dict[str, Any],
    envelope: dict[str, Any],
    context: dict[str, Any],
    now: datetime,
) -> NotificationIntent:
    if rule.recipient is not None:
        recipient = _lookup(record, rule.recipient)
        if not isinstance(recipient, str) or not recipient.strip():
            raise MissingRecipientError(
                rule.name, f"recipient field {rule.recipient!r} is missing or empty", rule.recipient
            )
    else:
        assert rule.to is not None  # noqa: S101 - parse_rules guarantees one of the two
        recipient = templates.render_string(rule.to, context)
        if not recipient:
            raise MissingRecipientError(rule.name, f"'to' template {rule.to!r} rendered empty")
    recipient = recipient.strip()
    data = {k: templates.render_string(v, context) for k, v in rule.data.items()}
    rendered = templates.render(rule.template, context)
    user_id = record.get("user_id")
    return NotificationIntent(
        notification_id=notification_id(event_id, rule.name, rule.channel, recipient),
        event_id=event_id,
        event_type=event_type,
        rule=rule.name,
        channel=rule.channel,
        recipient=recipient,
        subject=rendered.subject,
        body_text=rendered.body_text,
        body_html=rendered.body_html,
        user_id=str(user_id) if user_id is not None else None,
        data=data,
        created_at=now,
        traceparent=envelope.get("traceparent"),
    )
