"""pipeline/sink/checkpoint.py: one group commit records outcomes and contiguous offsets in
one ledger transaction, after the side records were acknowledged, and never otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.records import DeliveryState
from pipeline.sink.checkpoint import Checkpoint
from pipeline.sink.ledger import LedgerOutcome, LedgerThread
from pipeline.sink.ledger_sqlite import SQLiteLedger
from pipeline.sink.stats import SinkStats
from pipeline.sink.windows import TP, OffsetWindow
from tests.unit.sink_harness import intent

A = ("unit.notifications.fake", 0)
B = ("unit.notifications.fake", 1)
GROUP = "unit-sink-fake"


def sent(n: int) -> LedgerOutcome:
    i = intent(f"r{n}@example.com")
    return LedgerOutcome(
        i.notification_id,
        0,
        "fake",
        i.recipient,
        DeliveryState.SENT,
        1,
        "ok",
        None,
        None,
        i.created_at,
    )


class Wiring:
    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "ledger.db")
        self.ledger = LedgerThread(SQLiteLedger(self.path))
        self.flush_error: Exception | None = None
        self.commits: list[dict[TP, int]] = []
        self.released: list[TP] = []
        self.stats = SinkStats()
        self.checkpoint = Checkpoint(
            GROUP, self.ledger, self.flush, self.commits.append, self.release, self.stats
        )

    async def flush(self) -> None:
        if self.flush_error is not None:
            raise self.flush_error

    def release(self, windows: list[OffsetWindow]) -> None:
        self.released += [w.tp for w in windows]

    def stored(self) -> dict[TP, int]:
        ledger = SQLiteLedger(self.path)
        try:
            return ledger.offsets(GROUP, [A, B])
        finally:
            ledger.close()


async def test_offsets_move_over_the_contiguous_run_only(tmp_path: Path) -> None:
    w = Wiring(tmp_path)
    a, b = OffsetWindow(A), OffsetWindow(B)
    for o in range(4):
        a.start(o)
    b.start(10)
    w.checkpoint.complete(a, 2, sent(2))
    w.checkpoint.complete(a, 0, sent(0))
    w.checkpoint.complete(b, 10, None)  # skipped: nothing to record, the offset still moves
    assert await w.checkpoint.record() == {A: 1, B: 11}
    assert w.stored() == {A: 1, B: 11}
    assert w.commits == [{A: 1, B: 11}]
    assert (a.in_flight, b.in_flight) == (2, 0)
    w.checkpoint.complete(a, 1, sent(1))
    assert await w.checkpoint.record() == {A: 3}
    assert w.stored() == {A: 3, B: 11}
    assert w.stats.recorded == 3
    assert w.stats.commits == 2
    assert await w.checkpoint.record() == {}  # nothing pending: no transaction
    assert w.stats.commits == 2
    await w.ledger.close()


async def test_nothing_is_recorded_when_side_records_were_not_acknowledged(
    tmp_path: Path,
) -> None:
    w = Wiring(tmp_path)
    a = OffsetWindow(A)
    a.start(0)
    w.checkpoint.complete(a, 0, sent(0))
    w.flush_error = KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT))
    with pytest.raises(KafkaException):
        await w.checkpoint.record()
    assert w.stored() == {}
    assert w.commits == []
    assert a.in_flight == 1  # still taken: the sink stops, a restart redoes it
    await w.ledger.close()


async def test_a_closed_windows_outcome_is_recorded_but_its_offset_is_not(tmp_path: Path) -> None:
    w = Wiring(tmp_path)
    a = OffsetWindow(A)
    a.start(0)
    a.closed = True  # revoked while the record was in flight: the offset is the next owner's
    outcome = sent(0)
    w.checkpoint.complete(a, 0, outcome)
    assert await w.checkpoint.record() == {}
    assert w.stored() == {}
    ledger = SQLiteLedger(w.path)
    assert (outcome.notification_id, 0) in ledger.lookup([(outcome.notification_id, 0)])
    ledger.close()
    await w.ledger.close()
