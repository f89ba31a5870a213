"""The group commit: outcomes and offsets recorded together, then committed to Kafka.

Completed records gather here. Every ``HERALD_SINK_COMMIT_INTERVAL_MS`` (and while a
partition is being given up) one checkpoint:

1. flushes the producer, so every retry, dead letter and status of the completed records
   is acknowledged (if not, it raises: nothing is recorded, the sink stops, a restart
   redoes the records and skips what is done);
2. moves each partition's next offset over the contiguous run of completed records;
3. writes the outcomes and those offsets in ONE ledger transaction;
4. asks the consumer to commit the same offsets to Kafka (so ``kafka-consumer-groups
   --describe`` shows true lag);
5. only then frees the records' window slots.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pipeline.sink.ledger import LedgerOutcome, LedgerThread
from pipeline.sink.stats import SinkStats
from pipeline.sink.windows import TP, OffsetWindow

__all__ = ["Checkpoint", "Completion"]


@dataclass(frozen=True)
class Completion:
    window: OffsetWindow  # the assignment it was started under
    offset: int
    outcome: LedgerOutcome | None  # None: nothing to record (skipped, dead-lettered unread)
    abandoned: bool = False  # given up unsent: frees the slot, the offset stays below it


class Checkpoint:
    def __init__(
        self,
        group: str,
        ledger: LedgerThread,
        flush: Callable[[], Awaitable[None]],
        commit: Callable[[dict[TP, int]], None],
        released: Callable[[list[OffsetWindow]], None],
        stats: SinkStats,
    ) -> None:
        """``flush`` waits for the side records, ``commit`` hands offsets to the consumer,
        ``released`` is told which windows have free slots again."""
        self.group = group
        self._ledger = ledger
        self._flush = flush
        self._commit = commit
        self._released = released
        self._stats = stats
        self._pending: list[Completion] = []

    def complete(self, window: OffsetWindow, offset: int, outcome: LedgerOutcome | None) -> None:
        self._pending.append(Completion(window, offset, outcome))

    def abandon(self, window: OffsetWindow, offset: int) -> None:
        self._pending.append(Completion(window, offset, None, abandoned=True))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def record(self) -> dict[TP, int]:
        """One group commit. Returns the next offsets it recorded and committed."""
        if not self._pending:
            return {}
        batch, self._pending = self._pending, []
        await self._flush()
        touched: dict[TP, OffsetWindow] = {}
        for c in batch:
            if c.window.closed:  # outcome still recorded; the offset is the next owner's
                continue
            if not c.abandoned:
                c.window.complete(c.offset)
            touched[c.window.tp] = c.window
        offsets: dict[TP, int] = {}
        for tp, window in touched.items():
            offset = window.advance()
            if offset is not None:
                offsets[tp] = offset
        outcomes = [c.outcome for c in batch if c.outcome is not None]
        await self._ledger.record(self.group, outcomes, offsets)
        self._stats.recorded += len(outcomes)
        self._stats.commits += 1
        self._commit(offsets)
        for c in batch:
            c.window.release()
        self._released(list(touched.values()))
        return offsets
