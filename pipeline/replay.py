"""Replay: read a range of a topic and write its records again, for redelivery.

    herald replay notifications.email --since 2h      # what the ledger has as sent: skipped
    herald replay notifications.email.dlq             # dead letters back to their topic
    herald replay notifications.email --recipient a@x.io --force   # again, new idempotency key
    herald replay events.user --from-time 2026-11-27T08:00 --event-type user-registered --dry-run

Source: any Herald topic. Destination (``--to``): by default a dead letter goes back to the
topic it came from (its ``herald-original-topic`` header) and any other record to its own
topic (events go through the router again, intents to their sink again).

Range: ``--from-offset``, ``--from-time`` (``offsets_for_times``) or ``--since`` (a duration),
up to ``--until-time`` or the end of each partition as it was when the replay started, so a
replay always ends. Filters: ``--event-type``, ``--event-id``, ``--notification-id``,
``--recipient``.

What is sent twice. Notification ids are deterministic, so by default nothing the ledger
has as SENT is written again: replaying a whole topic from offset 0 makes no provider call.
A dead-lettered intent, or one the ledger has as REJECTED or DEAD, was never delivered: it is
redriven, i.e. written as the next generation (its own idempotency key) so the sink tries
again. That generation is derived from the failed record itself (``redrive_generation``), so
replaying the same dead letters twice writes the same generations and the sink skips what
the first run delivered. ``--force`` makes every selected intent a generation the ledger has
not seen, including sent ones: a deliberate second delivery each time.

``--dry-run`` counts. ``--rate`` limits records per second. Progress is saved to
``--checkpoint`` (a JSON file) every second, and ``--resume`` continues from it.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from pipeline import headers as h
from pipeline.records import NOTIFICATION_INTENT, DeliveryState, NotificationIntent
from pipeline.serialization import AvroSerde, DecodeError
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import Ledger

__all__ = [
    "ReplayError",
    "ReplayOptions",
    "ReplayStats",
    "parse_duration",
    "redrive_generation",
    "replay",
]

REPLAYED_FROM = "herald-replayed-from"
# Headers a dead letter carries that must not follow the record back into the pipeline.
_DEAD_LETTER_HEADERS = {
    h.ERROR_CLASS,
    h.ERROR_MESSAGE,
    h.FAILED_AT,
    h.ATTEMPTS,
    h.NOT_BEFORE,
    h.FIRST_FAILED_AT,
    h.LAST_FAILED_AT,
    h.ORIGINAL_TOPIC,
    h.ORIGINAL_PARTITION,
    h.ORIGINAL_OFFSET,
}


class ReplayError(ValueError):
    """The replay cannot start: a bad topic, range or option; the message says which."""


@dataclass(frozen=True)
class ReplayOptions:
    source: str
    to: str | None = None
    from_offset: int | None = None
    from_time: datetime | None = None
    until_time: datetime | None = None
    event_type: str | None = None
    event_id: str | None = None
    notification_id: str | None = None
    recipient: str | None = None
    error_class: str | None = None  # dead letters of this herald-error-class only
    force: bool = False
    dry_run: bool = False
    rate: float | None = None  # records per second
    checkpoint: Path | None = None
    resume: bool = False


@dataclass
class ReplayStats:
    read: int = 0
    written: int = 0
    filtered: int = 0
    skipped_sent: int = 0
    skipped_redriven: int = 0  # redriven by an earlier replay, whose outcome the ledger has
    new_generation: int = 0
    undecodable: int = 0
    by_destination: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        dest = ", ".join(f"{t}: {n}" for t, n in sorted(self.by_destination.items())) or "-"
        return (
            f"read={self.read} written={self.written} filtered={self.filtered} "
            f"skipped_sent={self.skipped_sent} skipped_redriven={self.skipped_redriven} "
            f"new_generation={self.new_generation} "
            f"undecodable={self.undecodable} destinations=[{dest}]"
        )


_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|h|d)$")


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text.strip())
    if not m:
        raise ReplayError(f"duration {text!r}: use a number and s, m, h or d (e.g. 90m, 2h)")
    seconds = float(m["n"]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m["unit"]]
    return timedelta(seconds=seconds)


def replay(
    settings: HeraldSettings,
    options: ReplayOptions,
    serde: AvroSerde,
    ledger: Ledger | None,
    progress: Callable[[ReplayStats, int], None] | None = None,
) -> ReplayStats:
    """Run one replay to the end of its range; returns what it did."""
    consumer = Consumer(
        settings.client_config(
            **{
                "group.id": f"herald-replay-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
    )
    producer = None if options.dry_run else Producer(settings.producer_config())
    stats = ReplayStats()
    try:
        starts, ends = _range(consumer, options)
        total = sum(max(0, ends[p] - starts[p]) for p in starts)
        consumer.assign([TopicPartition(options.source, p, o) for p, o in starts.items()])
        remaining = {p for p in starts if starts[p] < ends[p]}
        position = dict(starts)
        last_report = time.monotonic()
        started = time.monotonic()
        while remaining:
            msg = consumer.poll(0.5)
            if msg is None:
                _check_positions(consumer, options.source, remaining, ends, position)
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise ReplayError(f"reading {options.source}: {err}")
                continue
            partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            if offset >= ends[partition]:
                remaining.discard(partition)
                continue
            position[partition] = offset + 1
            if options.until_time is not None:
                ts = msg.timestamp()[1]
                if ts > options.until_time.timestamp() * 1000:
                    remaining.discard(partition)
                    continue
            stats.read += 1
            _one(msg, options, serde, ledger, producer, stats)
            if position[partition] >= ends[partition]:
                remaining.discard(partition)
            if options.rate:
                wait = stats.read / options.rate - (time.monotonic() - started)
                if wait > 0:
                    time.sleep(wait)
            if time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                if producer is not None:
                    producer.flush(30)
                _save_checkpoint(options, position)
                if progress is not None:
                    progress(stats, total)
        if producer is not None and producer.flush(60):
            raise ReplayError("Kafka did not acknowledge every replayed record; run again")
        _save_checkpoint(options, position)
        if progress is not None:
            progress(stats, total)
        return stats
    finally:
        consumer.close()


def _range(consumer: Consumer, options: ReplayOptions) -> tuple[dict[int, int], dict[int, int]]:
    md = consumer.list_topics(options.source, timeout=15).topics.get(options.source)
    if md is None or md.error is not None:
        raise ReplayError(f"no topic {options.source!r}")
    partitions = sorted(md.partitions)
    lows, ends = {}, {}
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(options.source, p), timeout=15)
        lows[p], ends[p] = int(low), int(high)
    if options.resume and options.checkpoint and options.checkpoint.exists():
        saved = json.loads(options.checkpoint.read_text())
        if saved.get("topic") != options.source:
            raise ReplayError(f"checkpoint {options.checkpoint} is for {saved.get('topic')}")
        starts = {p: max(lows[p], int(saved["next"].get(str(p), lows[p]))) for p in partitions}
    elif options.from_time is not None:
        ms = int(options.from_time.timestamp() * 1000)
        found = consumer.offsets_for_times(
            [TopicPartition(options.source, p, ms) for p in partitions], timeout=15
        )
        starts = {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition] for tp in found}
    elif options.from_offset is not None:
        starts = {p: min(max(lows[p], options.from_offset), ends[p]) for p in partitions}
    else:
        starts = dict(lows)
    return starts, ends


def _check_positions(
    consumer: Consumer,
    topic: str,
    remaining: set[int],
    ends: dict[int, int],
    position: dict[int, int],
) -> None:
    # Transaction markers take offsets but are never returned: go by the consumer's position.
    for tp in consumer.position([TopicPartition(topic, p) for p in list(remaining)]):
        if tp.offset >= ends[tp.partition]:
            remaining.discard(tp.partition)
            position[tp.partition] = ends[tp.partition]


def _save_checkpoint(options: ReplayOptions, position: dict[int, int]) -> None:
    if options.checkpoint is None or options.dry_run:
        return
    tmp = options.checkpoint.with_suffix(".tmp")
    tmp.write_text(json.dumps({"topic": options.source, "next": position}))
    tmp.replace(options.checkpoint)


def _one(
    msg: Message,
    options: ReplayOptions,
    serde: AvroSerde,
    ledger: Ledger | None,
    producer: Producer | None,
    stats: ReplayStats,
) -> None:
    hdrs = h.as_dict(msg.headers())
    dead_letter = h.ORIGINAL_TOPIC in hdrs
    destination = options.to or (hdrs[h.ORIGINAL_TOPIC] if dead_letter else str(msg.topic()))
    value = msg.value()
    if options.event_type and hdrs.get(h.EVENT_TYPE) != options.event_type:
        stats.filtered += 1
        return
    if options.event_id and hdrs.get(h.EVENT_ID) != options.event_id:
        stats.filtered += 1
        return
    if options.error_class and hdrs.get(h.ERROR_CLASS) != options.error_class:
        stats.filtered += 1
        return
    intent: NotificationIntent | None = None
    if h.NOTIFICATION_ID in hdrs:
        try:
            decoded = serde.decode(value, expect=NOTIFICATION_INTENT)
            intent = NotificationIntent.from_avro(decoded.record)
        except DecodeError:
            stats.undecodable += 1  # written as is: the sink dead-letters it again
    if options.notification_id and hdrs.get(h.NOTIFICATION_ID) != options.notification_id:
        stats.filtered += 1
        return
    if options.recipient and (intent is None or intent.recipient != options.recipient):
        stats.filtered += 1
        return
    if intent is not None:
        generation = _generation_to_write(intent, h.ERROR_CLASS in hdrs, options.force, ledger)
        if generation is _Skip.SENT:
            stats.skipped_sent += 1
            return
        if generation is _Skip.REDRIVEN:
            stats.skipped_redriven += 1
            return
        if generation != intent.generation:
            intent = replace(intent, generation=generation, created_at=datetime.now(UTC))
            value, ref = serde.encode(NOTIFICATION_INTENT, intent.to_avro())
            hdrs[h.SCHEMA] = ref
            # A new generation's latency counts from now (its created_at), not the event.
            hdrs.pop(h.EVENT_TIME, None)
            stats.new_generation += 1
    out: h.Headers = [
        (k, v.encode())
        for k, v in hdrs.items()
        if k not in _DEAD_LETTER_HEADERS and k != REPLAYED_FROM
    ]
    out.append((REPLAYED_FROM, f"{msg.topic()}[{msg.partition()}]@{msg.offset()}".encode()))
    stats.written += 1
    stats.by_destination[destination] = stats.by_destination.get(destination, 0) + 1
    if producer is None:
        return
    while True:
        try:
            producer.produce(destination, value, msg.key(), headers=out)
            break
        except BufferError:
            producer.poll(0.1)


class _Skip(Enum):
    SENT = "the ledger has it (or its redrive) as sent"
    REDRIVEN = "an earlier replay redrove it and the ledger has that outcome"


def redrive_generation(failed: int) -> int:
    """The generation a failed delivery of generation ``failed`` is redriven as: always the
    next one, whatever the ledger has seen.

    It is a function of the failed record alone (its notification id and generation are in
    the dead letter's value), so it is deterministic: a generation fails at most once (REJECTED
    and DEAD are final), hence every copy of its dead letter, every replay of them, and a
    replay of the original intent from the channel topic all name the same redrive, with the
    same idempotency key, which the sink's ledger skips once it is SENT. A redrive that fails
    in turn is dead-lettered as that generation and redriven as the next. (Before, a replay
    took the first generation the ledger had not seen, so a second replay of the same dead
    letters sent everything the first had delivered again.)"""
    return failed + 1


def _generation_to_write(
    intent: NotificationIntent, dead_letter: bool, force: bool, ledger: Ledger | None
) -> int | _Skip:
    """The generation to write ``intent`` as (its own: the sink decides), or why not to.

    ``dead_letter``: the record is a dead letter (it carries herald-error-class), so the
    delivery of its generation failed even if the ledger does not say so (``--no-ledger``)."""
    if force:
        return _unused_generation(intent, ledger)
    state = _ledger_state(ledger, intent.notification_id, intent.generation)
    if state is DeliveryState.SENT:
        return _Skip.SENT
    if not dead_letter and state not in (DeliveryState.REJECTED, DeliveryState.DEAD):
        return intent.generation
    redrive = redrive_generation(intent.generation)
    done = _ledger_state(ledger, intent.notification_id, redrive)
    if done is DeliveryState.SENT:
        return _Skip.SENT
    if done is not None:
        # Failed again (its own dead letter redrives it further) or being retried.
        return _Skip.REDRIVEN
    return redrive


def _ledger_state(ledger: Ledger | None, nid: str, generation: int) -> DeliveryState | None:
    if ledger is None:
        return None
    entry = ledger.lookup([(nid, generation)]).get((nid, generation))
    return entry.state if entry is not None else None


def _unused_generation(intent: NotificationIntent, ledger: Ledger | None) -> int:
    """For --force: the first generation after ``intent``'s that the ledger has not seen, so
    each forced replay is a new delivery with its own idempotency key."""
    generation = intent.generation + 1
    while ledger is not None and ledger.lookup([(intent.notification_id, generation)]):
        generation += 1
    return generation


def print_progress(stats: ReplayStats, total: int) -> None:
    done = stats.read
    width = 30
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "-" * (width - filled)
    print(f"\r[{bar}] {done}/{total} {stats.line()}", end="", file=sys.stderr, flush=True)


def parse_time(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReplayError(f"time {text!r}: use ISO-8601, e.g. 2026-11-27T08:00:00Z") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
