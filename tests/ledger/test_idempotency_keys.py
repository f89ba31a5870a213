"""The HTTP API's idempotency keys in the ledger, on both backends: a key is stored once per
scope, a claim with another fingerprint gets the first request back, expired keys are
forgotten, and concurrent claims of one key store exactly one request."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pipeline.sink.ledger import IdempotencyClaim, Ledger, open_ledger

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
DAY = timedelta(hours=24)
SCOPE = "POST /v1/notifications"


def claim(
    ledger: Ledger,
    fingerprint: str,
    *,
    key: str = "req-1",
    scope: str = SCOPE,
    at: datetime = T0,
    retention: timedelta = DAY,
) -> IdempotencyClaim:
    return ledger.claim_idempotency_key(
        scope, key, fingerprint, f'{{"answer": "{fingerprint}"}}', at, at - retention
    )


def test_first_claim_stores_the_request(ledger: Ledger) -> None:
    got = claim(ledger, "fp-a")
    assert got.created
    assert got.matches("fp-a") and not got.matches("fp-b")
    r = got.record
    assert (r.scope, r.key, r.fingerprint) == (SCOPE, "req-1", "fp-a")
    assert r.response == '{"answer": "fp-a"}'
    assert r.created_at == T0
    assert r.completed_at is None


def test_same_request_again_gets_the_stored_one(ledger: Ledger) -> None:
    claim(ledger, "fp-a")
    again = claim(ledger, "fp-a", at=T0 + timedelta(minutes=5))
    assert not again.created
    assert again.matches("fp-a")
    assert again.record.created_at == T0  # the first request's, not this one's


def test_another_request_with_the_key_gets_the_first_one_back(ledger: Ledger) -> None:
    claim(ledger, "fp-a")
    other = claim(ledger, "fp-b", at=T0 + timedelta(seconds=1))
    assert not other.created
    assert not other.matches("fp-b")
    assert other.record.fingerprint == "fp-a"
    assert other.record.response == '{"answer": "fp-a"}'  # nothing of the second was stored


def test_keys_are_scoped(ledger: Ledger) -> None:
    claim(ledger, "fp-a")
    elsewhere = claim(ledger, "fp-b", scope="POST /v1/events/user-registered")
    assert elsewhere.created and elsewhere.matches("fp-b")
    assert claim(ledger, "fp-c", key="req-2").created
    assert claim(ledger, "fp-a").matches("fp-a")


def test_complete_marks_only_the_stored_request(ledger: Ledger) -> None:
    claim(ledger, "fp-a")
    ledger.complete_idempotency_key(SCOPE, "req-1", "fp-b", T0 + timedelta(seconds=1))
    assert claim(ledger, "fp-a").record.completed_at is None  # another fingerprint: no-op
    ledger.complete_idempotency_key(SCOPE, "req-1", "fp-a", T0 + timedelta(seconds=2))
    ledger.complete_idempotency_key(SCOPE, "req-1", "fp-a", T0 + timedelta(seconds=9))
    assert claim(ledger, "fp-a").record.completed_at == T0 + timedelta(seconds=2)  # the first


def test_an_expired_key_is_forgotten_by_the_next_claim(ledger: Ledger) -> None:
    claim(ledger, "fp-a")
    ledger.complete_idempotency_key(SCOPE, "req-1", "fp-a", T0)
    within = claim(ledger, "fp-b", at=T0 + DAY - timedelta(seconds=1))
    assert not within.created and within.record.fingerprint == "fp-a"
    after = claim(ledger, "fp-b", at=T0 + DAY + timedelta(seconds=1))
    assert after.created and after.matches("fp-b")
    assert after.record.completed_at is None
    assert after.record.created_at == T0 + DAY + timedelta(seconds=1)


def test_purge_deletes_only_expired_keys(ledger: Ledger) -> None:
    claim(ledger, "fp-a", key="old-1")
    claim(ledger, "fp-a", key="old-2", at=T0 + timedelta(hours=1))
    claim(ledger, "fp-a", key="new", at=T0 + timedelta(hours=30))
    assert ledger.purge_idempotency_keys(T0 + timedelta(hours=6)) == 2
    assert ledger.purge_idempotency_keys(T0 + timedelta(hours=6)) == 0
    # A purged key is new again; the kept one is still there.
    assert claim(ledger, "fp-b", key="old-1", at=T0 + timedelta(hours=30)).created
    assert not claim(ledger, "fp-b", key="new", at=T0 + timedelta(hours=31)).created


def test_naive_timestamps_are_refused_with_nothing_written(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ledger.claim_idempotency_key(SCOPE, "req-1", "fp-a", "{}", T0.replace(tzinfo=None), T0)
    assert claim(ledger, "fp-b").created


def test_concurrent_claims_store_exactly_one(open_ledgers: Callable[[], Ledger]) -> None:
    """Several connections claim one key with different requests at the same moment: one
    stores it, every other gets that one back."""
    n = 6
    ledgers = [open_ledgers() for _ in range(n)]
    start = threading.Barrier(n)
    results: list[IdempotencyClaim] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race(i: int, ledger: Ledger) -> None:
        try:
            start.wait()
            for round_ in range(10):
                got = claim(ledger, f"fp-{i}", key=f"race-{round_}")
                with lock:
                    results.append(got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i, lg)) for i, lg in enumerate(ledgers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for round_ in range(10):
        claims = [c for c in results if c.record.key == f"race-{round_}"]
        assert len(claims) == n
        assert sum(c.created for c in claims) == 1
        winner = next(c for c in claims if c.created).record.fingerprint
        assert {c.record.fingerprint for c in claims} == {winner}


def test_a_version_1_ledger_gains_the_table(ledger_url: str) -> None:
    """A ledger written by the previous Herald (schema 1: no idempotency_keys) is migrated
    when opened, keeping its deliveries."""
    first = open_ledger(ledger_url)
    first.close()
    if ledger_url.startswith("sqlite:"):
        with sqlite3.connect(ledger_url.removeprefix("sqlite:///")) as conn:
            conn.execute("DROP TABLE idempotency_keys")
            conn.execute("PRAGMA user_version = 1")
        conn.close()
    else:
        with psycopg.connect(ledger_url) as pg_conn:
            pg_conn.execute("DROP TABLE idempotency_keys")
            pg_conn.execute("UPDATE schema_version SET version = 1")
    migrated = open_ledger(ledger_url)
    try:
        assert claim(migrated, "fp-a").created
        assert not claim(migrated, "fp-b").created
    finally:
        migrated.close()
    if ledger_url.startswith("sqlite:"):
        with sqlite3.connect(ledger_url.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        conn.close()
    else:
        with psycopg.connect(ledger_url) as pg_conn:
            row = pg_conn.execute("SELECT version FROM schema_version").fetchone()
            assert row is not None and row[0] == 2
