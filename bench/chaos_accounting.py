"""The chaos run's accounting: what became of every input.

The harness reads back, with read_committed consumers (what a downstream reader sees;
aborted transactions of a killed router are not counted), headers only:

- the dead letters: ``events.dlq`` (the router's) and ``notifications.email.dlq`` (the
  sink's). A dead letter names its input by the original coordinates it carries
  (``herald-original-topic/partition/offset``: the event's for the router, the intent's for
  the sink) or, failing that, by ``herald-event-id``;
- the intents the router committed to ``notifications.email``, counted per
  ``herald-notification-id``.

With the Message-IDs the receiver accepted, each input is delivered, dead-lettered (with
the error class and rule it was dead-lettered for), both, or neither (unaccounted).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from bench.chaos_inputs import Input
from pipeline import headers as h

__all__ = [
    "DeadLetterSeen",
    "TopicReader",
    "Verdict",
    "account",
    "dead_letter_seen",
    "extra_copies",
]


class TopicReader:
    """Reads whole topics from the start, read_committed, without a consumer group commit.
    ``read`` can be called again to pick up what was written since."""

    def __init__(
        self, bootstrap: str, topics: Iterable[str], on_record: Callable[[Message], None]
    ) -> None:
        self.on_record = on_record
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"chaos-reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )
        assignment = []
        for topic in topics:
            meta = self.consumer.list_topics(topic, timeout=30).topics[topic]
            assignment += [TopicPartition(topic, p, -2) for p in meta.partitions]  # beginning
        self.partitions = {(tp.topic, tp.partition) for tp in assignment}
        self.at_end: set[tuple[str, int]] = set()
        self.consumer.assign(assignment)

    def read(self, seconds: float) -> bool:
        """Read for up to ``seconds``, stopping early once every partition is at its end
        (for read_committed, its last stable offset). Returns whether they all were."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.at_end == self.partitions:
                return True
            for msg in self.consumer.consume(500, min(0.2, max(0.0, deadline - time.monotonic()))):
                err = msg.error()
                tp = (str(msg.topic()), int(msg.partition() or 0))
                if err is None:
                    self.at_end.discard(tp)
                    self.on_record(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    self.at_end.add(tp)
                elif err.fatal():
                    raise KafkaException(err)
        return self.at_end == self.partitions

    def close(self) -> None:
        self.consumer.close()


@dataclass(frozen=True)
class DeadLetterSeen:
    topic: str
    original: tuple[str, int, int] | None
    event_id: str | None
    error_class: str
    rule: str | None
    truncated: bool


def dead_letter_seen(msg: Message) -> DeadLetterSeen:
    hdrs = h.as_dict(msg.headers())
    try:
        original: tuple[str, int, int] | None = (
            hdrs[h.ORIGINAL_TOPIC],
            int(hdrs[h.ORIGINAL_PARTITION]),
            int(hdrs[h.ORIGINAL_OFFSET]),
        )
    except (KeyError, ValueError):
        original = None
    return DeadLetterSeen(
        topic=str(msg.topic()),
        original=original,
        event_id=hdrs.get(h.EVENT_ID),
        error_class=hdrs.get(h.ERROR_CLASS, ""),
        rule=hdrs.get(h.ERROR_RULE),
        truncated=h.TRUNCATED in hdrs,
    )


@dataclass
class Verdict:
    delivered: int = 0  # inputs whose Message-ID the receiver accepted
    lost: int = 0  # inputs that must be delivered and were not
    dead_lettered: int = 0  # inputs found in a dead-letter topic
    unaccounted: list[Input] = field(default_factory=list)  # neither
    not_in_kafka: list[Input] = field(default_factory=list)  # acknowledged, not in the topic
    wrong: list[str] = field(default_factory=list)  # the wrong fate, or the wrong reason
    stray: list[DeadLetterSeen] = field(default_factory=list)  # dead letters of no input


def account(inputs: list[Input], received: set[str], dead_letters: list[DeadLetterSeen]) -> Verdict:
    by_coords = {i.coords: i for i in inputs if i.coords is not None}
    by_event = {i.event_id: i for i in inputs}
    found: dict[int, list[DeadLetterSeen]] = {}
    v = Verdict()
    for dl in dead_letters:
        item = by_coords.get(dl.original) if dl.original is not None else None
        if item is None and dl.event_id is not None:
            item = by_event.get(dl.event_id)
        if item is None:
            v.stray.append(dl)
        else:
            found.setdefault(item.index, []).append(dl)
    for item in inputs:
        delivered = item.message_id in received
        dls = found.get(item.index, [])
        if item.in_kafka is False and not delivered and not dls:
            v.not_in_kafka.append(item)
            continue
        v.delivered += delivered
        v.dead_lettered += bool(dls)
        if not delivered and not dls:
            v.unaccounted.append(item)
        want = item.expectation
        if want is None:
            if not delivered:
                v.lost += 1
            if dls:
                v.wrong.append(f"{item.describe()} dead-lettered: {_reasons(dls)}")
            continue
        if delivered:
            v.wrong.append(f"{item.describe()} delivered, must be dead-lettered")
        if dls and not any(_matches(dl, want.error_class, want.rule, want.truncated) for dl in dls):
            v.wrong.append(
                f"{item.describe()} dead-lettered as {_reasons(dls)}, expected "
                f"{want.error_class}" + (f" (rule {want.rule})" if want.rule else "")
            )
    return v


def _matches(dl: DeadLetterSeen, error_class: str, rule: str | None, truncated: bool) -> bool:
    return dl.error_class == error_class and dl.rule == rule and dl.truncated == truncated


def _reasons(dls: list[DeadLetterSeen]) -> str:
    return ", ".join(
        f"{dl.topic}: {dl.error_class or '?'}"
        + (f" rule {dl.rule}" if dl.rule else "")
        + (" truncated" if dl.truncated else "")
        for dl in dls
    )


def extra_copies(counts: Counter[str]) -> int:
    """Records beyond the first per key: each is one more committed copy."""
    return sum(n - 1 for n in counts.values() if n > 1)
