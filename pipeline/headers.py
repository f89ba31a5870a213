"""Kafka record header names. Values are UTF-8 text, so console tools print them as is."""

from __future__ import annotations

import re

__all__ = [
    "ATTEMPTS",
    "AVRO",
    "CONTENT_TYPE",
    "ERROR_CLASS",
    "ERROR_MESSAGE",
    "ERROR_RULE",
    "EVENT_ID",
    "EVENT_TIME",
    "EVENT_TYPE",
    "FAILED_AT",
    "FIRST_FAILED_AT",
    "LAST_FAILED_AT",
    "NOTIFICATION_ID",
    "NOT_BEFORE",
    "ORIGINAL_OFFSET",
    "ORIGINAL_PARTITION",
    "ORIGINAL_SIZE",
    "ORIGINAL_TOPIC",
    "SCHEMA",
    "TRACEPARENT",
    "TRUNCATED",
    "Headers",
    "as_dict",
    "for_record",
    "header_value",
    "pairs",
    "valid_traceparent",
]

EVENT_TYPE = "herald-event-type"
EVENT_ID = "herald-event-id"
NOTIFICATION_ID = "herald-notification-id"
CONTENT_TYPE = "content-type"
SCHEMA = "herald-schema"  # "<full name>@<fingerprint or registry id>"
TRACEPARENT = "traceparent"  # W3C trace context
# On intents: the event's occurred_at (epoch milliseconds), for the delivery latency metric.
EVENT_TIME = "herald-event-time"

# Dead-letter records keep the original value and say where it came from and why.
ORIGINAL_TOPIC = "herald-original-topic"
ORIGINAL_PARTITION = "herald-original-partition"
ORIGINAL_OFFSET = "herald-original-offset"
ERROR_CLASS = "herald-error-class"
ERROR_MESSAGE = "herald-error-message"
FAILED_AT = "herald-failed-at"
ATTEMPTS = "herald-attempts"  # failed attempts so far
# A dead letter cut to fit the record limit: what was cut ("value", "headers", "key") and
# the size of the record it stands for. The original is at herald-original-*.
TRUNCATED = "herald-truncated"
ORIGINAL_SIZE = "herald-original-size"
ERROR_RULE = "herald-error-rule"  # the routing rule that failed, when one did
# Retry records: when to try again, and the failure history the dead letter will carry.
NOT_BEFORE = "herald-not-before"  # epoch milliseconds
FIRST_FAILED_AT = "herald-first-failed-at"
LAST_FAILED_AT = "herald-last-failed-at"

# What both Kafka clients take and return; values we write are UTF-8 bytes.
Headers = list[tuple[str, str | bytes | None]]

AVRO = "application/avro"  # the content-type of every record Herald writes


_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def valid_traceparent(value: str | None) -> str | None:
    """``value`` if it is a W3C traceparent (version 00, non-zero ids), else None."""
    if not value or not _TRACEPARENT.fullmatch(value):
        return None
    _, trace_id, span_id, _ = value.split("-")
    if set(trace_id) == {"0"} or set(span_id) == {"0"}:
        return None
    return value


def for_record(
    *,
    schema_ref: str,
    event_type: str | None = None,
    event_id: str | None = None,
    notification_id: str | None = None,
    traceparent: str | None = None,
    event_time_ms: int | None = None,
) -> Headers:
    """The headers of a record Herald writes (events, intents, statuses): whatever ids it
    has, its content type and schema, and the trace context, so that every producer writes
    the same set and console tools show them as text."""
    hdrs: Headers = []
    if event_type:
        hdrs.append((EVENT_TYPE, event_type.encode()))
    if event_id:
        hdrs.append((EVENT_ID, event_id.encode()))
    if notification_id:
        hdrs.append((NOTIFICATION_ID, notification_id.encode()))
    hdrs.append((CONTENT_TYPE, AVRO.encode()))
    hdrs.append((SCHEMA, schema_ref.encode()))
    if traceparent:
        hdrs.append((TRACEPARENT, traceparent.encode()))
    if event_time_ms is not None:
        hdrs.append((EVENT_TIME, str(event_time_ms).encode()))
    return hdrs


def pairs(raw: object) -> Headers:
    """Headers from either client (a list of pairs, a mapping or None) as a list of pairs."""
    if not raw:
        return []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), v if isinstance(v, bytes) else header_value(v).encode()) for k, v in items]  # type: ignore[attr-defined]


def header_value(raw: object) -> str:
    """A header value as text, whatever the client handed us (bytes, str or None)."""
    if raw is None:
        return ""
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw).decode("utf-8", errors="replace")
    return str(raw)


def as_dict(headers: object) -> dict[str, str]:
    """Headers from either client (a list of pairs, a mapping or None) as a dict of text."""
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, dict) else headers
    return {str(k): header_value(v) for k, v in items}  # type: ignore[attr-defined]
