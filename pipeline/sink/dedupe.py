"""Dedupe decisions: is a record's notification done already, or stale?

Asked before every send. The answer comes from an in-process memory of recent outcomes, else
from the ledger. SENT, REJECTED and DEAD are terminal: skip. RETRYING with more attempts than
the record carries means a retry for a later attempt was already written: this copy is stale,
skip. Two copies of one notification in flight at once are serialized (``exclusive``), so the
second one sees the first one's outcome.

Ledger lookups asked for while one is running wait for the next one, which asks for all of
them at once: one query per batch of records instead of one each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

from pipeline.records import DeliveryState
from pipeline.sink.ledger import TERMINAL, Key, LedgerEntry

__all__ = ["Deduper", "Known", "is_done"]

Known = tuple[DeliveryState, int]  # (state, attempts) of a notification
Lookup = Callable[[list[Key]], Awaitable[dict[Key, LedgerEntry]]]

MEMORY = 100_000  # recent outcomes kept in process (about 20 MB at most)


def is_done(known: Known | None, attempts_before: int) -> bool:
    """Whether a record carrying ``attempts_before`` failed attempts must be skipped, given
    what is known of its notification."""
    if known is None:
        return False
    state, attempts = known
    return state in TERMINAL or attempts > attempts_before


class Deduper:
    def __init__(self, lookup: Lookup, memory: int = MEMORY) -> None:
        self._lookup = lookup
        self._memory = memory
        self._recent: OrderedDict[Key, Known] = OrderedDict()
        self._inflight: dict[Key, asyncio.Future[None]] = {}
        self._lookups: dict[Key, asyncio.Future[LedgerEntry | None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def already_handled(self, key: Key, attempts_before: int) -> bool:
        known = self._recent.get(key)
        if known is None:
            entry = await self._ledger_entry(key)
            known = (entry.state, entry.attempts) if entry is not None else None
        return is_done(known, attempts_before)

    def remember(self, key: Key, state: DeliveryState, attempts: int) -> None:
        """An outcome about to be recorded. SENT is never forgotten for a later failure of
        a duplicate."""
        previous = self._recent.get(key)
        if previous is not None and previous[0] is DeliveryState.SENT:
            return
        self._recent[key] = (state, attempts)
        self._recent.move_to_end(key)
        while len(self._recent) > self._memory:
            self._recent.popitem(last=False)

    @contextlib.asynccontextmanager
    async def exclusive(self, key: Key) -> AsyncIterator[None]:
        """One copy of a notification at a time in this process."""
        while key in self._inflight:
            await asyncio.shield(self._inflight[key])
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        try:
            yield
        finally:
            del self._inflight[key]
            done.set_result(None)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _ledger_entry(self, key: Key) -> LedgerEntry | None:
        future = self._lookups.get(key)
        if future is None or future.cancelled():
            future = self._lookups[key] = asyncio.get_running_loop().create_future()
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._run_lookups())
        return await future

    async def _run_lookups(self) -> None:
        while self._lookups:
            batch, self._lookups = self._lookups, {}
            try:
                entries = await self._lookup(list(batch))
            except Exception as e:  # each waiting record fails as its own lookup would
                for future in batch.values():
                    if not future.done():
                        future.set_exception(e)
                continue
            for key, future in batch.items():
                if not future.done():
                    future.set_result(entries.get(key))
