"""Which generation a replay writes an intent as, decided against a real (SQLite) ledger: a
redrive is derived from the failed record, so the same dead letter replayed twice names the
same generation; --force always finds one the ledger has not seen."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.records import DeliveryState, NotificationIntent
from pipeline.replay import _generation_to_write, _Skip, redrive_generation
from pipeline.sink.ledger import Ledger, LedgerOutcome, open_ledger

SENT, RETRYING, REJECTED, DEAD = (
    DeliveryState.SENT,
    DeliveryState.RETRYING,
    DeliveryState.REJECTED,
    DeliveryState.DEAD,
)
NID = "3f1d0a7e-9c55-5b8e-a0f1-2a3b4c5d6e7f"


def intent(generation: int = 0) -> NotificationIntent:
    return NotificationIntent(
        notification_id=NID,
        event_id="0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        event_type="user-registered",
        rule="welcome-email",
        channel="email",
        recipient="ada@example.com",
        body_text="hi",
        generation=generation,
    )


@dataclass(frozen=True)
class Case:
    name: str
    ledger: dict[int, DeliveryState] = field(default_factory=dict)  # generation -> state
    generation: int = 0  # of the replayed record
    dead_letter: bool = False
    force: bool = False
    expect: int | _Skip = 0


SKIP_SENT, SKIP_REDRIVEN = _Skip.SENT, _Skip.REDRIVEN
DL = True  # the record is a dead letter

CASES = [
    Case("unknown intent: as is, the sink decides", expect=0),
    Case("sent intent: skipped", {0: SENT}, expect=SKIP_SENT),
    Case("retrying intent: as is (the sink skips a stale copy)", {0: RETRYING}, expect=0),
    Case("rejected intent: redriven", {0: REJECTED}, expect=1),
    Case("dead intent: redriven", {0: DEAD}, expect=1),
    Case("dead letter, ledger has nothing: redriven", dead_letter=DL, expect=1),
    Case("dead letter of a redrive: redriven further", {1: REJECTED}, 1, DL, expect=2),
    Case("redriven before and sent", {0: REJECTED, 1: SENT}, 0, DL, expect=SKIP_SENT),
    Case("redriven before, failed", {0: REJECTED, 1: REJECTED}, 0, DL, expect=SKIP_REDRIVEN),
    Case("redriven before, retrying", {0: DEAD, 1: RETRYING}, 0, DL, expect=SKIP_REDRIVEN),
    Case("intent whose redrive was sent", {0: REJECTED, 1: SENT}, expect=SKIP_SENT),
    Case("dead letter of a sent one (crash resend)", {0: SENT}, 0, DL, expect=SKIP_SENT),
    Case(
        "force: the first unused generation", {0: SENT, 1: SENT, 2: REJECTED}, force=True, expect=3
    ),
    Case("force on a dead letter", {0: REJECTED}, 0, DL, force=True, expect=1),
]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield ledger
    ledger.close()


def record(ledger: Ledger, states: dict[int, DeliveryState]) -> None:
    now = datetime.now(UTC)
    outcomes = [
        LedgerOutcome(NID, g, "email", "ada@example.com", s, 1, None, None, None, now)
        for g, s in states.items()
    ]
    ledger.record("herald-sink-email", outcomes, {})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generation_to_write(ledger: Ledger, case: Case) -> None:
    record(ledger, case.ledger)
    got = _generation_to_write(intent(case.generation), case.dead_letter, case.force, ledger)
    assert got == case.expect


def test_the_same_dead_letter_twice_names_the_same_generation(ledger: Ledger) -> None:
    record(ledger, {0: REJECTED})
    first = _generation_to_write(intent(0), True, False, ledger)
    second = _generation_to_write(intent(0), True, False, ledger)  # nothing recorded between
    assert first == second == redrive_generation(0)
    assert isinstance(first, int)
    assert intent(first).idempotency_key == intent(second).idempotency_key != NID
    record(ledger, {first: SENT})  # the sink delivered the first replay's record
    assert _generation_to_write(intent(0), True, False, ledger) is _Skip.SENT


def test_without_a_ledger_a_dead_letter_is_still_redriven() -> None:
    assert _generation_to_write(intent(0), True, False, None) == 1
    assert _generation_to_write(intent(0), False, False, None) == 0  # no proof it failed
