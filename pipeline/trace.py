"""``herald trace ID``: every record about one event or notification, across the event topic,
the intents, the retry tiers, the dead-letter topics, the status topic and the ledger, in
time order.

It reads Herald's topics (from ``since``, or from their start) and keeps the records whose
``herald-event-id`` or ``herald-notification-id`` header is the id; given a notification id,
it also finds the event it came from. Reading is bounded by each partition's end when the
trace starts, so it always finishes; on large topics, ``since`` keeps it short.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message

from pipeline import headers as h
from pipeline.inspect import read_topics, to_jsonable
from pipeline.records import DELIVERY_STATUS, NOTIFICATION_INTENT
from pipeline.serialization import AvroSerde, DecodeError
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import Ledger
from pipeline.topics import Topics

__all__ = ["TraceEntry", "trace"]


@dataclass(frozen=True)
class TraceEntry:
    at: datetime
    kind: str  # event, intent, retry, dead letter, status, ledger
    where: str  # topic[partition]@offset, or "ledger"
    event_id: str | None
    notification_id: str | None
    summary: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(timespec="milliseconds"),
            "kind": self.kind,
            "where": self.where,
            "event_id": self.event_id,
            "notification_id": self.notification_id,
            "summary": self.summary,
            "detail": to_jsonable(self.detail),
        }


def trace(
    settings: HeraldSettings,
    serde: AvroSerde,
    ledger: Ledger | None,
    ident: str,
    channels: Iterable[str],
    since: datetime | None = None,
) -> list[TraceEntry]:
    topics = Topics(settings.topic_prefix)
    channels = list(channels)
    event_topics = [*topics.all_events(serde.schemas.domains()), topics.events_dlq]
    all_topics = topics.all(serde.schemas.domains(), channels, settings.sink_retry_tiers)
    kinds = _kinds(topics, channels, settings.sink_retry_tiers)

    matched = [m for m in read_topics(settings, all_topics, since) if _about(m, {ident})]
    event_ids = {h.as_dict(m.headers()).get(h.EVENT_ID) for m in matched} - {None, ""}
    if event_ids and ident not in event_ids:  # a notification id: find its event too
        seen = {(m.topic(), m.partition(), m.offset()) for m in matched}
        matched += [
            m
            for m in read_topics(settings, event_topics, since)
            if _about(m, event_ids)  # type: ignore[arg-type]
            and (m.topic(), m.partition(), m.offset()) not in seen
        ]
    entries = [_entry(m, kinds.get(str(m.topic()), "record"), serde) for m in matched]
    entries += _ledger_entries(ledger, matched, serde)
    return sorted(entries, key=lambda e: (e.at, _ORDER.get(e.kind, 9)))


_ORDER = {"event": 0, "intent": 1, "retry": 2, "dead letter": 3, "status": 4, "ledger": 5}


def _about(msg: Message, ids: set[str]) -> bool:
    hdrs = h.as_dict(msg.headers())
    return hdrs.get(h.EVENT_ID) in ids or hdrs.get(h.NOTIFICATION_ID) in ids


def _kinds(topics: Topics, channels: list[str], tiers: int) -> dict[str, str]:
    kinds = {topics.events_dlq: "dead letter", topics.status: "status"}
    for c in channels:
        kinds[topics.notifications(c)] = "intent"
        kinds[topics.notifications_dlq(c)] = "dead letter"
        for t in range(1, tiers + 1):
            kinds[topics.notifications_retry(c, t)] = "retry"
    return kinds


def _entry(msg: Message, kind: str, serde: AvroSerde) -> TraceEntry:
    hdrs = h.as_dict(msg.headers())
    at = datetime.fromtimestamp(msg.timestamp()[1] / 1000, tz=UTC)
    where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
    if kind == "record":
        kind = "event"
    record: dict[str, Any] = {}
    try:
        record = serde.decode(msg.value()).record
    except DecodeError as e:
        record = {"error": f"{type(e).__name__}: {e.reason}"}
    if kind == "event":
        summary = f"{hdrs.get(h.EVENT_TYPE, '?')} key={_text(msg.key())}"
    elif kind in ("intent", "retry"):
        summary = f"{record.get('channel', '?')} to {record.get('recipient', '?')}"
        if kind == "retry":
            summary += (
                f", attempt {int(hdrs.get(h.ATTEMPTS, '0')) + 1} after {hdrs.get(h.NOT_BEFORE)}"
            )
    elif kind == "dead letter":
        summary = f"{hdrs.get(h.ERROR_CLASS)}: {hdrs.get(h.ERROR_MESSAGE, '')}"
        if hdrs.get(h.TRUNCATED):
            summary += f" (truncated: {hdrs[h.TRUNCATED]})"
    elif record.get("state") == "SUPPRESSED":  # the router decided not to send
        summary = f"SUPPRESSED by the router ({record.get('error_class')})"
        if record.get("provider_response"):
            summary += f": {record['provider_response']}"
    else:  # status
        summary = f"{record.get('state')} after {record.get('attempts')} attempt(s)"
        if record.get("provider_response"):
            summary += f": {record['provider_response']}"
    return TraceEntry(
        at,
        kind,
        where,
        hdrs.get(h.EVENT_ID),
        hdrs.get(h.NOTIFICATION_ID),
        summary,
        {"headers": hdrs, "value": record},
    )


def _ledger_entries(
    ledger: Ledger | None, matched: list[Message], serde: AvroSerde
) -> list[TraceEntry]:
    if ledger is None:
        return []
    keys: set[tuple[str, int]] = set()
    events: dict[str, str | None] = {}
    for m in matched:
        hdrs = h.as_dict(m.headers())
        nid = hdrs.get(h.NOTIFICATION_ID)
        if not nid:
            continue
        events[nid] = hdrs.get(h.EVENT_ID)
        keys.add((nid, 0))
        try:
            decoded = serde.decode(m.value())
        except DecodeError:
            continue
        if decoded.schema.full_name in (NOTIFICATION_INTENT, DELIVERY_STATUS):
            keys.add((nid, int(decoded.record.get("generation") or 0)))
    found = ledger.lookup(sorted(keys))
    out = []
    for (nid, generation), e in found.items():
        summary = f"{e.state.value}, {e.attempts} attempt(s), generation {generation}"
        if e.response:
            summary += f": {e.response}"
        out.append(
            TraceEntry(
                e.updated_at,
                "ledger",
                "ledger",
                events.get(nid),
                nid,
                summary,
                to_jsonable(e.__dict__),
            )
        )
    return out


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", errors="replace") if raw is not None else ""
