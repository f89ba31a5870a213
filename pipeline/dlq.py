"""``herald dlq list|show|redrive``: the dead-letter topics, read and redriven.

A dead letter keeps the original record (value, key, headers) and says where it came from
and why it failed (``herald-original-*``, ``herald-error-*``). ``list`` reads them with
filters, ``show`` prints one whole, ``redrive`` is ``herald replay`` of the dead-letter
topic back to where each record came from: a redrive's generation is derived from the dead
letter itself, so redriving the same dead letters twice sends nothing the first run
delivered (see pipeline/replay.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Message

from pipeline import headers as h
from pipeline.inspect import read_topics
from pipeline.settings import HeraldSettings

__all__ = ["DeadLetterView", "list_dead_letters", "view"]


@dataclass(frozen=True)
class DeadLetterView:
    where: str  # the dead letter's own topic[partition]@offset
    original: str  # where the record was when it failed
    error_class: str
    error_message: str
    failed_at: str
    attempts: int
    event_type: str | None
    event_id: str | None
    notification_id: str | None
    truncated: str | None
    at: datetime

    def line(self) -> str:
        ids = self.notification_id or self.event_id or "-"
        cut = f" [truncated: {self.truncated}]" if self.truncated else ""
        return (
            f"{self.failed_at}  {self.where}  from {self.original}  {self.error_class}  "
            f"attempts={self.attempts}  {ids}  {self.error_message}{cut}"
        )


def view(msg: Message) -> DeadLetterView:
    hdrs = h.as_dict(msg.headers())
    original = (
        f"{hdrs.get(h.ORIGINAL_TOPIC, '?')}[{hdrs.get(h.ORIGINAL_PARTITION, '?')}]"
        f"@{hdrs.get(h.ORIGINAL_OFFSET, '?')}"
    )
    return DeadLetterView(
        where=f"{msg.topic()}[{msg.partition()}]@{msg.offset()}",
        original=original,
        error_class=hdrs.get(h.ERROR_CLASS, "?"),
        error_message=hdrs.get(h.ERROR_MESSAGE, ""),
        failed_at=hdrs.get(h.FAILED_AT, ""),
        attempts=int(hdrs.get(h.ATTEMPTS) or 0),
        event_type=hdrs.get(h.EVENT_TYPE),
        event_id=hdrs.get(h.EVENT_ID),
        notification_id=hdrs.get(h.NOTIFICATION_ID),
        truncated=hdrs.get(h.TRUNCATED),
        at=datetime.fromtimestamp(msg.timestamp()[1] / 1000, tz=UTC),
    )


def list_dead_letters(
    settings: HeraldSettings,
    topics: list[str],
    *,
    error_class: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[DeadLetterView]:
    """The dead letters of ``topics`` matching the filters, oldest first."""
    found = []
    for msg in read_topics(settings, topics, since):
        v = view(msg)
        if error_class is not None and v.error_class != error_class:
            continue
        if until is not None and v.at > until:
            continue
        found.append(v)
    return sorted(found, key=lambda v: v.at)
