"""The Ledger contract, run against both backends (the ``ledger`` fixture is parametrized over
SQLite and PostgreSQL in conftest.py)."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.records import DeliveryState
from pipeline.sink.ledger import Ledger, LedgerEntry, LedgerError, LedgerOutcome, open_ledger
from pipeline.sink.ledger_postgres import PostgresLedger, mask_url
from pipeline.sink.ledger_sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from pipeline.sink.ledger_sqlite import SQLiteLedger
from tests.conftest import free_port

SENT, RETRYING, REJECTED, DEAD = (
    DeliveryState.SENT,
    DeliveryState.RETRYING,
    DeliveryState.REJECTED,
    DeliveryState.DEAD,
)
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
GROUP = "herald-sink.email"
TP0, TP1, TP2 = ("intents.email", 0), ("intents.email", 1), ("intents.email", 2)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def outcome(
    state: DeliveryState,
    attempts: int = 1,
    t: float = 0,
    *,
    nid: str = "n-1",
    generation: int = 0,
    **overrides: Any,
) -> LedgerOutcome:
    """An outcome whose response/error/provider id say which attempt it was."""
    failed = state is not SENT
    values: dict[str, Any] = {
        "notification_id": nid,
        "generation": generation,
        "channel": "email",
        "recipient": "ada@example.com",
        "state": state,
        "attempts": attempts,
        "response": f"{state.value} #{attempts}",
        "error_class": f"Error{attempts}" if failed else None,
        "provider_message_id": None if failed else f"pm-{attempts}",
        "at": at(t),
    }
    values.update(overrides)
    return LedgerOutcome(**values)


def entry(ledger: Ledger, nid: str = "n-1", generation: int = 0) -> LedgerEntry:
    found = ledger.lookup([(nid, generation)])
    return found[(nid, generation)]


# --- the state table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    batches: list[list[LedgerOutcome]]  # each one record() call, in order
    expect: dict[str, Any] = field(default_factory=dict)  # LedgerEntry fields to check


CASES = [
    Case(
        "first outcome is stored as given",
        [[outcome(RETRYING, 1, 0)]],
        {
            "state": RETRYING,
            "attempts": 1,
            "response": "RETRYING #1",
            "error_class": "Error1",
            "provider_message_id": None,
            "first_attempt_at": at(0),
            "updated_at": at(0),
        },
    ),
    Case(
        "RETRYING -> SENT upgrades",
        [[outcome(RETRYING, 1, 0)], [outcome(SENT, 2, 5)]],
        {
            "state": SENT,
            "attempts": 2,
            "response": "SENT #2",
            "error_class": None,
            "provider_message_id": "pm-2",
            "first_attempt_at": at(0),
            "updated_at": at(5),
        },
    ),
    Case(
        "SENT is not replaced by a late RETRYING",
        [[outcome(SENT, 1, 0)], [outcome(RETRYING, 3, 10)]],
        {
            "state": SENT,
            "attempts": 3,  # attempts still keeps the larger value
            "response": "SENT #1",
            "error_class": None,
            "provider_message_id": "pm-1",
            "first_attempt_at": at(0),
        },
    ),
    Case(
        "SENT is not replaced by REJECTED",
        [[outcome(SENT, 2, 0)], [outcome(REJECTED, 1, 10)]],
        {"state": SENT, "attempts": 2, "response": "SENT #2", "provider_message_id": "pm-2"},
    ),
    Case(
        "SENT is not replaced by DEAD",
        [[outcome(SENT, 1, 0)], [outcome(DEAD, 5, 10)]],
        {"state": SENT, "attempts": 5, "error_class": None, "provider_message_id": "pm-1"},
    ),
    Case(
        "SENT is not replaced by another SENT",
        [[outcome(SENT, 1, 0)], [outcome(SENT, 2, 10)]],
        {"state": SENT, "attempts": 2, "response": "SENT #1", "provider_message_id": "pm-1"},
    ),
    Case(
        "REJECTED is not replaced by RETRYING",
        [[outcome(REJECTED, 1, 0)], [outcome(RETRYING, 2, 10)]],
        {"state": REJECTED, "attempts": 2, "response": "REJECTED #1", "error_class": "Error1"},
    ),
    Case(
        "DEAD is not replaced by RETRYING",
        [[outcome(DEAD, 5, 0)], [outcome(RETRYING, 2, 10)]],
        {"state": DEAD, "attempts": 5, "error_class": "Error5"},
    ),
    # Terminal by terminal is allowed (only SENT is final): the docstring's rule.
    Case(
        "DEAD -> SENT (a late duplicate that did deliver)",
        [[outcome(DEAD, 5, 0)], [outcome(SENT, 6, 10)]],
        {"state": SENT, "attempts": 6, "provider_message_id": "pm-6", "error_class": None},
    ),
    Case(
        "REJECTED -> DEAD",
        [[outcome(REJECTED, 1, 0)], [outcome(DEAD, 2, 10)]],
        {"state": DEAD, "attempts": 2, "error_class": "Error2"},
    ),
    Case(
        "attempts keeps the max",
        [[outcome(RETRYING, 4, 0)], [outcome(RETRYING, 2, 10)]],
        {"state": RETRYING, "attempts": 4},
    ),
    Case(
        "first_attempt_at keeps the earliest, updated_at the latest",
        [[outcome(RETRYING, 2, 30)], [outcome(RETRYING, 1, -30)], [outcome(RETRYING, 3, 10)]],
        {"attempts": 3, "first_attempt_at": at(-30), "updated_at": at(30)},
    ),
    Case(
        "one batch: RETRYING then SENT",
        [[outcome(RETRYING, 1, 0), outcome(SENT, 2, 5)]],
        {"state": SENT, "attempts": 2, "provider_message_id": "pm-2"},
    ),
    Case(
        "one batch: SENT then RETRYING",
        [[outcome(SENT, 1, 0), outcome(RETRYING, 2, 5)]],
        {"state": SENT, "attempts": 2, "provider_message_id": "pm-1"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_state_rules(ledger: Ledger, case: Case) -> None:
    for batch in case.batches:
        ledger.record(GROUP, batch, {})
    got = entry(ledger)
    for name, want in case.expect.items():
        assert getattr(got, name) == want, f"{case.name}: {name}"


# --- round trip and lookup ---------------------------------------------------------------


def test_record_lookup_round_trip(ledger: Ledger) -> None:
    plus2 = timezone(timedelta(hours=2))
    outcomes = [
        outcome(SENT, 1, 0, nid="n-1"),
        outcome(RETRYING, 2, 1, nid="n-1", generation=1),  # a forced redelivery: its own row
        outcome(
            REJECTED,
            1,
            nid="n-2",
            channel="sms",
            recipient="+15550100",
            response=None,
            error_class=None,
            at=datetime(2025, 3, 1, 14, 0, tzinfo=plus2),  # same instant as 12:00 UTC
        ),
    ]
    ledger.record(GROUP, outcomes, {TP0: 3})

    found = ledger.lookup([("n-1", 0), ("n-1", 1), ("n-2", 0), ("missing", 0), ("n-2", 7)])
    assert set(found) == {("n-1", 0), ("n-1", 1), ("n-2", 0)}
    for o in outcomes:
        want = LedgerEntry(
            notification_id=o.notification_id,
            generation=o.generation,
            channel=o.channel,
            recipient=o.recipient,
            state=o.state,
            attempts=o.attempts,
            response=o.response,
            error_class=o.error_class,
            provider_message_id=o.provider_message_id,
            first_attempt_at=o.at,
            updated_at=o.at,
        )
        got = found[(o.notification_id, o.generation)]
        assert got == want
        assert isinstance(got.state, DeliveryState)
        for stamp in (got.first_attempt_at, got.updated_at):
            assert stamp.utcoffset() == timedelta(0)  # tz-aware, in UTC
    assert found[("n-2", 0)].first_attempt_at == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert ledger.lookup([]) == {}


def test_lookup_many_keys(ledger: Ledger) -> None:
    """More keys than SQLite's host-parameter limit of old (999) and than one lookup chunk."""
    n = 2500
    ledger.record(GROUP, [outcome(SENT, 1, nid=f"n-{i:05d}") for i in range(n)], {})
    keys = [(f"n-{i:05d}", 0) for i in range(n)]
    missing = [(f"absent-{i}", 0) for i in range(300)] + [(f"n-{i:05d}", 1) for i in range(300)]
    found = ledger.lookup(keys + missing + keys[:10])
    assert set(found) == set(keys)


def test_record_nothing_is_a_no_op(ledger: Ledger) -> None:
    ledger.record(GROUP, [], {})
    assert ledger.offsets(GROUP, [TP0]) == {}


def test_naive_timestamp_is_refused_with_nothing_written(ledger: Ledger) -> None:
    good = outcome(SENT, nid="n-good")
    naive = outcome(SENT, nid="n-naive", at=datetime(2025, 3, 1, 12, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        ledger.record(GROUP, [good, naive], {TP0: 1})
    assert ledger.lookup([("n-good", 0), ("n-naive", 0)]) == {}
    assert ledger.offsets(GROUP, [TP0]) == {}


# --- offsets -----------------------------------------------------------------------------


def test_offsets_move_only_forward(ledger: Ledger) -> None:
    ledger.record(GROUP, [], {TP0: 10, TP1: 5})
    assert ledger.offsets(GROUP, [TP0, TP1, TP2]) == {TP0: 10, TP1: 5}
    ledger.record(GROUP, [], {TP0: 7, TP1: 6})  # TP0 backwards: ignored
    assert ledger.offsets(GROUP, [TP0, TP1, TP2]) == {TP0: 10, TP1: 6}
    ledger.record(GROUP, [], {TP0: 10, TP2: 0})
    assert ledger.offsets(GROUP, [TP0, TP1, TP2]) == {TP0: 10, TP1: 6, TP2: 0}
    assert ledger.offsets(GROUP, [TP1]) == {TP1: 6}
    assert ledger.offsets(GROUP, []) == {}


def test_offsets_are_per_group(ledger: Ledger) -> None:
    ledger.record("group-a", [], {TP0: 100})
    assert ledger.offsets("group-b", [TP0]) == {}
    ledger.record("group-b", [], {TP0: 3})
    assert ledger.offsets("group-a", [TP0]) == {TP0: 100}
    assert ledger.offsets("group-b", [TP0]) == {TP0: 3}
    # same partition number, other topic
    ledger.record("group-a", [], {("other", 0): 9})
    assert ledger.offsets("group-a", [TP0, ("other", 0)]) == {TP0: 100, ("other", 0): 9}


# --- atomicity ---------------------------------------------------------------------------


def test_record_is_atomic_when_an_outcome_fails(ledger: Ledger) -> None:
    ledger.record(GROUP, [outcome(RETRYING, 1, nid="n-before")], {TP0: 5})
    batch = [
        outcome(SENT, 1, nid="n-a"),
        outcome(RETRYING, 2, nid="n-before"),  # an update to an existing row
        outcome(SENT, 1, nid="n-b", channel=None),  # NOT NULL violation
        outcome(SENT, 1, nid="n-c"),
    ]
    with pytest.raises(LedgerError):
        ledger.record(GROUP, batch, {TP0: 42, TP1: 7})
    assert set(ledger.lookup([("n-a", 0), ("n-b", 0), ("n-c", 0)])) == set()
    assert entry(ledger, "n-before").attempts == 1
    assert ledger.offsets(GROUP, [TP0, TP1]) == {TP0: 5}
    # The ledger is still usable after the failed transaction.
    ledger.record(GROUP, [outcome(SENT, 1, nid="n-a")], {TP0: 42})
    assert entry(ledger, "n-a").state is SENT
    assert ledger.offsets(GROUP, [TP0]) == {TP0: 42}


def test_record_is_atomic_when_an_offset_fails(ledger: Ledger) -> None:
    with pytest.raises(LedgerError):
        ledger.record(GROUP, [outcome(SENT, 1, nid="n-a")], {TP0: 3, TP1: -1})
    assert ledger.lookup([("n-a", 0)]) == {}
    assert ledger.offsets(GROUP, [TP0, TP1]) == {}


# --- several ledgers on the same storage (the multi-process case) ------------------------


def test_two_ledgers_see_each_others_writes(open_ledgers: Callable[[], Ledger]) -> None:
    a, b = open_ledgers(), open_ledgers()
    a.record(GROUP, [outcome(SENT, 1, 0)], {TP0: 10})
    assert entry(b).state is SENT
    assert b.offsets(GROUP, [TP0]) == {TP0: 10}
    b.record(GROUP, [outcome(RETRYING, 4, 20)], {TP0: 8, TP1: 2})  # a late duplicate
    got = entry(a)
    assert (got.state, got.attempts, got.provider_message_id) == (SENT, 4, "pm-1")
    assert a.offsets(GROUP, [TP0, TP1]) == {TP0: 10, TP1: 2}


def test_concurrent_writers(open_ledgers: Callable[[], Ledger]) -> None:
    """Two ledgers writing at once, overlapping keys and partitions in opposite orders: no
    deadlock, no lost update."""
    writers = [open_ledgers(), open_ledgers()]
    errors: list[BaseException] = []
    start = threading.Barrier(len(writers))

    def write(index: int, ledger: Ledger) -> None:
        try:
            start.wait()
            for batch in range(15):
                order = range(20) if index == 0 else reversed(range(20))
                outcomes = [outcome(RETRYING, batch + 1, batch, nid=f"n-{i}") for i in order]
                offsets = {TP0: batch * 10 + index, TP1: batch * 10 + index}
                if index == 1:
                    offsets = dict(reversed(offsets.items()))
                ledger.record(GROUP, outcomes, offsets)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i, w)) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    reader = open_ledgers()
    found = reader.lookup([(f"n-{i}", 0) for i in range(20)])
    assert len(found) == 20
    assert {e.attempts for e in found.values()} == {15}
    assert reader.offsets(GROUP, [TP0, TP1]) == {TP0: 141, TP1: 141}


def test_another_process_sees_the_writes(ledger_url: str, ledger: Ledger) -> None:
    ledger.record(GROUP, [outcome(RETRYING, 1, 0)], {TP0: 1})
    script = textwrap.dedent(
        f"""
        from datetime import UTC, datetime
        from pipeline.records import DeliveryState
        from pipeline.sink.ledger import LedgerOutcome, open_ledger
        ledger = open_ledger({ledger_url!r})
        before = ledger.lookup([("n-1", 0)])[("n-1", 0)].state.value
        ledger.record({GROUP!r}, [LedgerOutcome("n-1", 0, "email", "ada@example.com",
            DeliveryState.SENT, 2, "ok", None, "pm-x", datetime.now(UTC))], {{{TP0!r}: 9}})
        ledger.close()
        print(before)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "RETRYING"
    got = entry(ledger)
    assert (got.state, got.provider_message_id) == (SENT, "pm-x")
    assert ledger.offsets(GROUP, [TP0]) == {TP0: 9}


def test_concurrent_schema_creation(ledger_url: str) -> None:
    """Sinks starting together on empty storage all get a working ledger."""
    n = 4
    start = threading.Barrier(n)
    opened: list[Ledger] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def open_one() -> None:
        try:
            start.wait()
            ledger = open_ledger(ledger_url)
            with lock:
                opened.append(ledger)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        assert len(opened) == n
        opened[0].record(GROUP, [outcome(SENT)], {TP0: 1})
        assert entry(opened[-1]).state is SENT
    finally:
        for ledger in opened:
            ledger.close()


# --- lifecycle and schema ----------------------------------------------------------------


def test_open_ledger_dispatches_on_the_url(ledger_url: str, ledger: Ledger) -> None:
    expected = SQLiteLedger if ledger_url.startswith("sqlite:") else PostgresLedger
    assert isinstance(ledger, expected)


def test_closed_ledger_raises(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url)
    ledger.close()
    with pytest.raises(LedgerError):
        ledger.record(GROUP, [outcome(SENT)], {})
    with pytest.raises(LedgerError):
        ledger.lookup([("n-1", 0)])


def test_reopen_keeps_data_and_refuses_a_newer_schema(ledger_url: str) -> None:
    first = open_ledger(ledger_url)
    first.record(GROUP, [outcome(SENT)], {TP0: 4})
    first.close()
    second = open_ledger(ledger_url)  # schema exists: opening again is a no-op
    assert entry(second).state is SENT
    assert second.offsets(GROUP, [TP0]) == {TP0: 4}
    second.close()

    if ledger_url.startswith("sqlite:"):
        with sqlite3.connect(ledger_url.removeprefix("sqlite:///")) as conn:
            conn.execute("PRAGMA user_version = 99")
        conn.close()
    else:
        with psycopg.connect(ledger_url) as pg_conn:
            pg_conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(LedgerError, match="schema version 99"):
        open_ledger(ledger_url)


# --- URLs and secrets (no backend needed) ------------------------------------------------


def test_open_ledger_sqlite_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_ledger("sqlite:///state/rel.db")
    absolute = open_ledger("sqlite:///" + str(tmp_path / "abs" / "ledger.db"))
    try:
        assert isinstance(relative, SQLiteLedger)
        assert isinstance(absolute, SQLiteLedger)
        assert (tmp_path / "state" / "rel.db").is_file()  # parent directory created
        assert (tmp_path / "abs" / "ledger.db").is_file()
        with sqlite3.connect(tmp_path / "abs" / "ledger.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION
        conn.close()
    finally:
        relative.close()
        absolute.close()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@h/db",
        "mysql+pymysql://u:hunter2@h:3306/db",
        "postgresql+psycopg://u:hunter2@h/db",
        "u:hunter2@h/db",
        "sqlite://hunter2",
    ],
)
def test_bad_url_error_does_not_echo_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="must start with") as info:
        open_ledger(url)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("postgresql://herald:hunter2@127.0.0.1:{port}/herald", ["hunter2"]),
        ("postgres://herald:hunter2@127.0.0.1:{port}/herald", ["hunter2"]),
        ("postgresql://herald@127.0.0.1:{port}/herald?password=hunter2", ["hunter2"]),
        ("postgresql://herald:s3cr%40t@127.0.0.1:{port}/herald", ["s3cr%40t", "s3cr@t"]),
    ],
)
def test_connection_failure_does_not_leak_the_password(url: str, secrets: list[str]) -> None:
    url = url.format(port=free_port())  # nothing listens there
    with pytest.raises(LedgerError) as info:
        open_ledger(url)  # dispatches to PostgresLedger, which wraps the failure
    error = info.value
    shown = "".join(traceback.format_exception(error)) + repr(error)
    assert "127.0.0.1" in str(error)  # still says where it tried
    for secret in secrets:
        assert secret not in shown
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_mask_url() -> None:
    masked = mask_url("postgresql://u:hunter2@db.internal:5432/ledger?sslmode=require&password=x9")
    assert "hunter2" not in masked
    assert "x9" not in masked
    assert masked.startswith("postgresql://u:***@db.internal:5432/ledger?")
    assert "sslmode=require" in masked
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_postgres_ledger_repr_hides_the_password(postgres_url: str) -> None:
    # The test server trusts any password, so the connection works with one in the URL.
    head, tail = postgres_url.split("://", 1)
    user, rest = tail.split("@", 1)
    ledger = PostgresLedger(f"{head}://{user.split(':')[0]}:hunter2@{rest}")
    try:
        assert "hunter2" not in repr(ledger)
        assert "hunter2" not in str(vars(ledger).get("masked_url"))
    finally:
        ledger.close()


# --- throughput (printed, not asserted) --------------------------------------------------


def test_throughput(ledger_url: str, ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    backend = "sqlite" if ledger_url.startswith("sqlite:") else "postgres"
    n, size = 1000, 100
    first = [outcome(RETRYING, 1, 0, nid=f"tp-{i:04d}") for i in range(n)]
    second = [dataclasses.replace(o, state=SENT, attempts=2, at=at(1)) for o in first]
    timings = []
    for label, outcomes in (("insert", first), ("update", second)):
        began = time.perf_counter()
        for b in range(0, n, size):
            ledger.record(GROUP, outcomes[b : b + size], {TP0: b + size})
        elapsed = time.perf_counter() - began
        timings.append(
            f"{label} {elapsed * 1000:.0f} ms = {n / elapsed:,.0f} outcomes/s "
            f"({elapsed / (n // size) * 1000:.1f} ms per record() of {size})"
        )
    assert len(ledger.lookup([(o.notification_id, 0) for o in first])) == n
    with capsys.disabled():
        print(f"\n[ledger throughput, {backend}] {n} outcomes in batches of {size}: ", end="")
        print("; ".join(timings))


def test_postgres_ledger_reconnects_after_losing_its_connection(
    fresh_postgres_database: str,
) -> None:
    ledger = PostgresLedger(fresh_postgres_database)
    try:
        ledger.record(GROUP, [outcome(RETRYING)], {TP0: 1})
        with psycopg.connect(fresh_postgres_database, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'herald-ledger' AND datname = current_database()"
            )
        # The call that finds the connection gone fails (nothing is retried behind the
        # caller's back); the next one connects again.
        with pytest.raises(LedgerError):
            ledger.record(GROUP, [outcome(SENT, 2)], {TP0: 2})
        ledger.record(GROUP, [outcome(SENT, 2)], {TP0: 2})
        assert entry(ledger).state is SENT
        assert ledger.offsets(GROUP, [TP0]) == {TP0: 2}
    finally:
        ledger.close()
