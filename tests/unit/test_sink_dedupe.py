"""pipeline/sink/dedupe.py: which records are skipped, and how lookups are batched."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from pipeline.records import DeliveryState
from pipeline.sink.dedupe import Deduper, Known, is_done
from pipeline.sink.ledger import Key, LedgerEntry

S = DeliveryState


@pytest.mark.parametrize(
    ("known", "attempts_before", "skip"),
    [
        (None, 0, False),  # never seen: send
        ((S.SENT, 1), 0, True),  # terminal
        ((S.REJECTED, 1), 0, True),
        ((S.DEAD, 8), 3, True),  # terminal, whatever the record carries
        ((S.RETRYING, 1), 1, False),  # the retry this record is
        ((S.RETRYING, 2), 1, True),  # a later retry exists: this copy is stale
        ((S.RETRYING, 1), 0, True),  # the original after its first retry was written
        ((S.RETRYING, 1), 2, False),  # the ledger is behind the record (not recorded yet)
    ],
)
def test_is_done(known: Known | None, attempts_before: int, skip: bool) -> None:
    assert is_done(known, attempts_before) is skip


def entry(key: Key, state: DeliveryState, attempts: int) -> LedgerEntry:
    now = datetime.now(UTC)
    return LedgerEntry(key[0], key[1], "fake", "r", state, attempts, None, None, None, now, now)


async def test_lookups_asked_for_while_one_runs_go_as_one_batch() -> None:
    calls: list[list[Key]] = []
    ledger = {("n1", 0): entry(("n1", 0), S.SENT, 1)}

    async def lookup(keys: list[Key]) -> dict[Key, LedgerEntry]:
        calls.append(keys)
        await asyncio.sleep(0.01)
        return {k: ledger[k] for k in keys if k in ledger}

    d = Deduper(lookup)
    keys = [(f"n{i}", 0) for i in range(1, 30)]
    answers = await asyncio.gather(*(d.already_handled(k, 0) for k in keys))
    assert answers == [True] + [False] * 28
    assert len(calls) <= 2  # the first key alone, then everyone who asked meanwhile
    assert sorted(k for batch in calls for k in batch) == sorted(keys)


async def test_memory_answers_before_the_ledger_and_never_forgets_sent() -> None:
    async def lookup(keys: list[Key]) -> dict[Key, LedgerEntry]:
        raise AssertionError("the memory knew")

    d = Deduper(lookup, memory=2)
    d.remember(("a", 0), S.SENT, 1)
    d.remember(("a", 0), S.RETRYING, 2)  # a late duplicate's failure does not undo SENT
    assert await d.already_handled(("a", 0), 5)
    d.remember(("b", 0), S.RETRYING, 1)
    assert not await d.already_handled(("b", 0), 1)
    assert await d.already_handled(("b", 0), 0)


async def test_a_failed_lookup_fails_each_waiting_record() -> None:
    async def lookup(keys: list[Key]) -> dict[Key, LedgerEntry]:
        raise RuntimeError("ledger down")

    d = Deduper(lookup)
    results = await asyncio.gather(
        d.already_handled(("a", 0), 0), d.already_handled(("b", 0), 0), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_two_copies_of_one_notification_run_one_after_the_other() -> None:
    d = Deduper(lambda keys: asyncio.sleep(0, {}))
    events: list[str] = []

    async def copy(name: str) -> None:
        async with d.exclusive(("n", 0)):
            events.append(f"{name} in")
            await asyncio.sleep(0.01)
            events.append(f"{name} out")

    await asyncio.gather(copy("first"), copy("second"))
    assert events == ["first in", "first out", "second in", "second out"]
