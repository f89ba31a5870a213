"""The router's people tables: subscribers, preferences and suppressions, rebuilt from their
compacted topics, looked up by RouterHandler.

What the router loop calls (see docs/architecture.md, "People", for the wiring):

- ``start()`` once, before consuming; ``close()`` at the end;
- ``on_assign(partitions)`` / ``on_revoke(partitions)`` with the event topic-partitions the
  consumer group gave or took (TopicPartition objects or (topic, partition) pairs);
- ``ready(p, timestamp_ms)`` before routing an event of partition p: True once the tables of
  partition p (its subscribers and preferences partition, and all of the suppressions) were
  read from the beginning to their end as of the assignment, and, given the event's
  timestamp, once they are known to hold everything written before it. The loop must hold
  the event until then (``await wait_ready(p, timestamp_ms)``);
- ``handler.people = tables``: RouterHandler asks ``subscriber(user_id)``,
  ``preferences(user_id)``, ``suppressed(channel, address)`` and ``describe(...)``.

``topics()`` and ``apply(msg)`` are the table side of it: the compacted topics, and one of
their records applied (upsert, or delete on a tombstone). The reader
(pipeline/people/reader.py) calls ``apply`` from its own thread; tests call it directly.

Why a reader of its own rather than the loop's consumer: the suppressions table is global
(keyed by address, every router needs all of it), which a consumer group cannot assign to
every member, and the co-partitioned tables must follow the event partitions exactly, which
a cooperative assignor does not promise for two subscribed topics.

Ordering across topics. Kafka orders records within a partition only, so an event may be
read before a subscriber change written earlier to another topic. ``ready(p, timestamp_ms)``
closes that gap with timestamps, as Kafka Streams does: a catch-up round notes the time t0,
asks for the end offsets, and once the reader reached them the tables hold everything
written before t0. An event whose timestamp is later than that waits for the next round.
This is exact when the clocks of the writers and the router agree; skew widens it by the
skew.

Memory: every subscriber and preferences record of the held partitions and every
suppression, in dicts. A restart (or an assignment) reads the partitions again from their
start; compaction keeps that to about one record per key.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import Message

from pipeline.people.policy import PreferencePolicy
from pipeline.people.reader import TP, TableReader
from pipeline.people.records import (
    PREFERENCES,
    SUBSCRIBER,
    SUPPRESSION,
    Preferences,
    Subscriber,
    Suppression,
    suppression_key,
)
from pipeline.people.unsubscribe import UnsubscribeLinks
from pipeline.serialization import AvroSerde, DecodeError
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["PeopleTables", "PeopleTablesError"]

log = logging.getLogger(__name__)


class PeopleTablesError(RuntimeError):
    """The tables cannot be kept (the reader stopped, a topic is missing or not
    co-partitioned). Unexpected for the router: it stops, and its restart tries again."""


def _tp(item: Any) -> TP:
    if isinstance(item, tuple):
        return str(item[0]), int(item[1])
    return str(item.topic), int(item.partition)


class PeopleTables:
    def __init__(
        self,
        serde: AvroSerde,
        topics: Topics,
        policy: PreferencePolicy | None = None,
        links: UnsubscribeLinks | None = None,
        describers: Mapping[str, Callable[[str], str]] | None = None,
        *,
        settings: HeraldSettings | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        """``settings``: where the reader's consumer connects; without it there is no
        reader and the tables are fed by ``apply`` and ``complete`` (tests)."""
        self.serde = serde
        self.names = topics
        self.policy = policy or PreferencePolicy()
        self.links = links
        self.describers = dict(describers or {})
        self.clock_ms = clock_ms
        self._subscribers: dict[int, dict[str, Subscriber]] = {}
        self._preferences: dict[int, dict[str, Preferences]] = {}
        self._suppressions: dict[str, Suppression] = {}
        self._complete: dict[TP, int] = {}  # table partition -> complete up to (wall ms)
        self._events: set[TP] = set()  # event partitions the router holds
        self._epochs: dict[int, int] = {}  # partition -> its assignment's number
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._waiting = 0  # wait_ready calls in progress
        self._global: set[TP] | None = None  # suppressions partitions, once known
        self._reader: TableReader | None = None
        if settings is not None:
            self._reader = TableReader(
                settings, self, [topics.subscribers, topics.preferences], [topics.suppressions]
            )

    @classmethod
    def from_settings(cls, settings: HeraldSettings, serde: AvroSerde) -> PeopleTables:
        """Tables with the workspace's preference policy, unsubscribe links and the
        installed connectors' address descriptions, reading the topics ``settings`` name."""
        from connectors.registry import load_connectors

        describers = {ch: c.describe_address for ch, c in load_connectors().items()}
        return cls(
            serde,
            Topics(settings.topic_prefix),
            PreferencePolicy.load(settings.preferences_file),
            UnsubscribeLinks.from_settings(settings),
            describers,
            settings=settings,
        )

    # -- what the loop calls --------------------------------------------------------------------

    def topics(self) -> list[str]:
        """The compacted topics the tables are built from."""
        return self.names.people()

    def start(self) -> None:
        """Check the topics and start reading the global ones (suppressions)."""
        if self._reader is None:
            return
        self._check_topics()
        self._reader.start()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stop()

    def on_assign(self, partitions: Iterable[Any]) -> None:
        """The router was given these event topic-partitions: read their people partitions
        from the beginning (those not held already for another event topic)."""
        added = {_tp(x) for x in partitions}
        with self._lock:
            before = {p for _, p in self._events}
            self._events |= added
            fresh = {p for _, p in added} - before
            epochs = {}
            for p in fresh:
                epochs[p] = self._epochs[p] = self._epochs.get(p, 0) + 1
                self._subscribers[p] = {}
                self._preferences[p] = {}
                for topic in self._co_partitioned():
                    self._complete.pop((topic, p), None)
        if fresh and self._reader is not None:
            self._reader.assign(epochs)

    def on_revoke(self, partitions: Iterable[Any]) -> None:
        """The router lost these event topic-partitions (revoked or lost): drop the people
        partitions no other held event topic needs."""
        removed = {_tp(x) for x in partitions}
        with self._lock:
            self._events -= removed
            still = {p for _, p in self._events}
            gone = {p for _, p in removed} - still
            for p in gone:
                self._subscribers.pop(p, None)
                self._preferences.pop(p, None)
                for topic in self._co_partitioned():
                    self._complete.pop((topic, p), None)
        if gone and self._reader is not None:
            self._reader.revoke(gone)

    @property
    def waiting(self) -> bool:
        """Whether an event is being held in ``wait_ready`` now (a loop stopping meanwhile
        may drop its batch: it was not routed and is read again)."""
        return self._waiting > 0

    def ready(self, partition: int, timestamp_ms: int | None = None) -> bool:
        """Whether events of ``partition`` may be routed: its tables restored and, with the
        event's timestamp, complete up to it. Raises PeopleTablesError once the reader
        stopped (it never becomes ready then)."""
        if self._error is not None:
            raise PeopleTablesError(f"the people tables reader stopped: {self._error}")
        with self._lock:
            needed = [(t, partition) for t in self._co_partitioned()]
            if self._global is None:
                return False
            needed += sorted(self._global)
            if any(tp not in self._complete for tp in needed):
                return False
            if timestamp_ms is None:
                return True
            behind = any(self._complete[tp] < timestamp_ms for tp in needed)
        if behind and self._reader is not None:
            self._reader.sync()
        return not behind

    async def wait_ready(
        self,
        partition: int,
        timestamp_ms: int | None = None,
        stopping: Callable[[], bool] | None = None,
        poll_s: float = 0.01,
    ) -> bool:
        """Wait until ``ready(partition, timestamp_ms)``; False if ``stopping()`` turned true
        first. Logs a hold longer than a second."""
        started = time.monotonic()
        warned = False
        self._waiting += 1
        try:
            while not self.ready(partition, timestamp_ms):
                if stopping is not None and stopping():
                    return False
                if not warned and time.monotonic() - started > 1.0:
                    warned = True
                    log.warning("holding partition %d until the people tables are ready", partition)
                await asyncio.sleep(poll_s)
        finally:
            self._waiting -= 1
        if warned:
            log.warning("released partition %d after %.1fs", partition, time.monotonic() - started)
        return True

    # -- what the reader calls ------------------------------------------------------------------

    def apply(self, msg: Message) -> None:
        """One record of a people topic: an upsert, or a delete for a tombstone. A record
        that cannot be decoded is skipped (logged): it cannot say anything. Raises
        RegistryUnavailableError (the reader holds it and tries again)."""
        topic, partition = str(msg.topic()), int(msg.partition() or 0)
        raw_key = msg.key()
        if raw_key is None:
            return
        key = raw_key.decode("utf-8", errors="replace")
        value = msg.value()
        kind = {
            self.names.subscribers: SUBSCRIBER,
            self.names.preferences: PREFERENCES,
            self.names.suppressions: SUPPRESSION,
        }.get(topic)
        if kind is None:
            return
        record = None
        if value is not None:
            try:
                decoded = self.serde.decode(
                    value, topic=topic, partition=partition, offset=msg.offset(), expect=kind
                )
            except DecodeError as e:
                log.warning("people tables: skipping %s", e)
                return
            record = decoded.record
        with self._lock:
            if kind == SUPPRESSION:
                if record is None:
                    self._suppressions.pop(key, None)
                else:
                    self._suppressions[key] = Suppression.from_avro(record)
                return
            tables: dict[int, Any] = self._subscribers if kind == SUBSCRIBER else self._preferences
            table = tables.get(partition)
            if table is None:  # not held (a record read after the partition was revoked)
                return
            if record is None:
                table.pop(key, None)
            elif kind == SUBSCRIBER:
                table[key] = Subscriber.from_avro(record)
            else:
                table[key] = Preferences.from_avro(record)

    def complete(self, tp: TP, as_of_ms: int, epoch: int = 0) -> None:
        """The reader applied everything written to ``tp`` before ``as_of_ms``, in the
        assignment numbered ``epoch`` (co-partitioned topics; a completion of an earlier
        assignment, or of a revoked partition, does not count)."""
        with self._lock:
            if tp[0] != self.names.suppressions and (
                tp[1] not in self._subscribers or self._epochs.get(tp[1], 0) != epoch
            ):
                return
            self._complete[tp] = max(self._complete.get(tp, 0), as_of_ms)

    def epoch(self, partition: int) -> int:
        """The number of the current assignment of ``partition`` (for ``complete``)."""
        return self._epochs.get(partition, 0)

    def failed(self, error: BaseException) -> None:
        self._error = error

    def expect_global(self, partitions: int) -> None:
        """How many suppressions partitions there are (the reader learns it; tests say)."""
        with self._lock:
            self._global = {(self.names.suppressions, p) for p in range(partitions)}

    # -- lookups (RouterHandler) ---------------------------------------------------------------

    def subscriber(self, user_id: str) -> Subscriber | None:
        for table in list(self._subscribers.values()):
            found = table.get(user_id)
            if found is not None:
                return found
        return None

    def preferences(self, user_id: str) -> Preferences | None:
        for table in list(self._preferences.values()):
            found = table.get(user_id)
            if found is not None:
                return found
        return None

    def suppressed(self, channel: str, address: str) -> Suppression | None:
        key = suppression_key(channel, address, self.describe(channel, address))
        return self._suppressions.get(key)

    def describe(self, channel: str, address: str) -> str:
        """``address`` as the channel's connector shows it (without secrets)."""
        describe = self.describers.get(channel)
        return describe(address) if describe is not None else address

    def suppressions(self) -> dict[str, Suppression]:
        return dict(self._suppressions)

    # -- checks ---------------------------------------------------------------------------------

    def _co_partitioned(self) -> list[str]:
        return [self.names.subscribers, self.names.preferences]

    def _check_topics(self) -> None:
        """Fail at start-up, naming the fix, when a people topic is missing or not
        co-partitioned with the event topics; learn the suppressions partitions."""
        from confluent_kafka.admin import AdminClient

        assert self._reader is not None  # noqa: S101 - only with settings
        settings = self._reader.settings
        metadata = AdminClient(settings.admin_config()).list_topics(timeout=30).topics
        counts = {}
        for topic in [*self.topics(), *self.names.all_events(self.serde.schemas.domains())]:
            md = metadata.get(topic)
            if md is None or md.error is not None:
                raise PeopleTablesError(f"topic {topic} does not exist: run `herald topics ensure`")
            counts[topic] = len(md.partitions)
        events = {t: n for t, n in counts.items() if t.startswith(self.names.events(""))}
        for topic in self._co_partitioned():
            wrong = {t: n for t, n in events.items() if n != counts[topic]}
            if wrong:
                raise PeopleTablesError(
                    f"{topic} has {counts[topic]} partitions but {', '.join(sorted(wrong))} "
                    f"{'has' if len(wrong) == 1 else 'have'} {sorted(set(wrong.values()))}: the "
                    "people topics must be co-partitioned with the event topics (same "
                    "partition count); recreate it with the event topics' count"
                )
        self.expect_global(counts[self.names.suppressions])
