"""The delivery ledger on SQLite: the embedded default, for sinks on one host.

One connection per ledger. Several processes may open the same file (WAL lets readers run
beside the one writer; ``busy_timeout`` makes a writer wait for another's transaction instead
of failing). Timestamps are stored as ISO-8601 UTC text of one fixed width
(``2025-01-31T12:00:00.000000+00:00``), so text order is time order and ``MIN``/``MAX``
compare instants.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.records import DeliveryState
from pipeline.sink.ledger import (
    TERMINAL,
    TP,
    IdempotencyClaim,
    IdempotencyRecord,
    Key,
    Ledger,
    LedgerEntry,
    LedgerError,
    LedgerOutcome,
)

__all__ = ["SCHEMA_VERSION", "SQLiteLedger"]

# Stored in PRAGMA user_version. Bump it, and add a step to _STEPS, when the schema changes.
# 1: deliveries and offsets. 2: idempotency_keys (the HTTP API's).
SCHEMA_VERSION = 2

# How long a writer waits for another connection's write transaction before giving up.
BUSY_TIMEOUT_MS = 30_000

# Keys per lookup statement: two orders of magnitude under SQLite's host-parameter limit
# (999 before 3.32, 32766 since).
_LOOKUP_CHUNK = 500

# Upsert requires SQLite 3.24; WITHOUT ROWID and row values are older than that.
_MIN_SQLITE = (3, 24, 0)

_TERMINAL_SQL = "('DEAD', 'REJECTED', 'SENT')"
if {DeliveryState(s) for s in ("DEAD", "REJECTED", "SENT")} != TERMINAL:  # pragma: no cover
    raise ImportError("ledger_sqlite's terminal states differ from ledger.TERMINAL")

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS deliveries (
    notification_id     TEXT    NOT NULL,
    generation          INTEGER NOT NULL,
    channel             TEXT    NOT NULL,
    recipient           TEXT    NOT NULL,
    state               TEXT    NOT NULL
                        CHECK (state IN ('SENT', 'RETRYING', 'REJECTED', 'DEAD')),
    attempts            INTEGER NOT NULL CHECK (attempts >= 0),
    response            TEXT,
    error_class         TEXT,
    provider_message_id TEXT,
    first_attempt_at    TEXT    NOT NULL,
    updated_at          TEXT    NOT NULL,
    PRIMARY KEY (notification_id, generation)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS offsets (
    group_id    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    "partition" INTEGER NOT NULL,
    next_offset INTEGER NOT NULL CHECK (next_offset >= 0),
    updated_at  TEXT    NOT NULL,
    PRIMARY KEY (group_id, topic, "partition")
) WITHOUT ROWID;
"""

_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope           TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    response        TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    completed_at    TEXT,
    PRIMARY KEY (scope, idempotency_key)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at);
"""

# The DDL that takes a ledger from version N-1 to N, for N = 1, 2, ...
_STEPS = (_SCHEMA_V1, _SCHEMA_V2)
if len(_STEPS) != SCHEMA_VERSION:  # pragma: no cover
    raise ImportError("ledger_sqlite: one schema step per version")

# The stored row is kept (only attempts, first_attempt_at and updated_at may move) when it is
# SENT, or when it is terminal and the incoming state is not.
_KEEP = (
    f"(deliveries.state = 'SENT' OR (deliveries.state IN {_TERMINAL_SQL} "
    f"AND excluded.state NOT IN {_TERMINAL_SQL}))"
)

_UPSERT_DELIVERY = f"""
INSERT INTO deliveries (
    notification_id, generation, channel, recipient, state, attempts, response, error_class,
    provider_message_id, first_attempt_at, updated_at
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (notification_id, generation) DO UPDATE SET
    state = CASE WHEN {_KEEP} THEN deliveries.state ELSE excluded.state END,
    response = CASE WHEN {_KEEP} THEN deliveries.response ELSE excluded.response END,
    error_class = CASE WHEN {_KEEP} THEN deliveries.error_class ELSE excluded.error_class END,
    provider_message_id = CASE WHEN {_KEEP} THEN deliveries.provider_message_id
                               ELSE excluded.provider_message_id END,
    attempts = MAX(deliveries.attempts, excluded.attempts),
    first_attempt_at = MIN(deliveries.first_attempt_at, excluded.first_attempt_at),
    updated_at = MAX(deliveries.updated_at, excluded.updated_at)
"""  # noqa: S608 - only constants are formatted in; values are bound parameters

_UPSERT_OFFSET = """
INSERT INTO offsets (group_id, topic, "partition", next_offset, updated_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (group_id, topic, "partition") DO UPDATE SET
    next_offset = MAX(offsets.next_offset, excluded.next_offset),
    updated_at = CASE WHEN excluded.next_offset > offsets.next_offset
                      THEN excluded.updated_at ELSE offsets.updated_at END
"""

_FORGET_EXPIRED_KEY = """
DELETE FROM idempotency_keys WHERE scope = ? AND idempotency_key = ? AND created_at < ?
"""

_INSERT_KEY = """
INSERT INTO idempotency_keys (
    scope, idempotency_key, fingerprint, response, created_at, completed_at
) VALUES (?, ?, ?, ?, ?, NULL)
ON CONFLICT (scope, idempotency_key) DO NOTHING
"""

_SELECT_KEY = """
SELECT scope, idempotency_key, fingerprint, response, created_at, completed_at
FROM idempotency_keys WHERE scope = ? AND idempotency_key = ?
"""

_COMPLETE_KEY = """
UPDATE idempotency_keys SET completed_at = ?
WHERE scope = ? AND idempotency_key = ? AND fingerprint = ? AND completed_at IS NULL
"""

_SELECT_DELIVERIES = """
SELECT notification_id, generation, channel, recipient, state, attempts, response,
       error_class, provider_message_id, first_attempt_at, updated_at
FROM deliveries WHERE notification_id IN ({})
"""


def _ts(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"ledger timestamps must be timezone-aware, got {value!r}")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(
        notification_id=row[0],
        generation=int(row[1]),
        channel=row[2],
        recipient=row[3],
        state=DeliveryState(row[4]),
        attempts=int(row[5]),
        response=row[6],
        error_class=row[7],
        provider_message_id=row[8],
        first_attempt_at=_dt(row[9]),
        updated_at=_dt(row[10]),
    )


def _idempotency_record(row: Sequence[Any]) -> IdempotencyRecord:
    return IdempotencyRecord(
        scope=row[0],
        key=row[1],
        fingerprint=row[2],
        response=row[3],
        created_at=_dt(row[4]),
        completed_at=_dt(row[5]) if row[5] is not None else None,
    )


class SQLiteLedger(Ledger):
    def __init__(self, path: str) -> None:
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise LedgerError(
                f"the SQLite ledger needs SQLite >= 3.24 (upsert); "
                f"this Python has {sqlite3.sqlite_version}"
            )
        self.path = path
        memory = path == ":memory:" or path.startswith("file::memory:")
        if not memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        try:
            # isolation_level=None: the module issues no BEGIN of its own; every transaction
            # here is explicit. check_same_thread=False: the sink calls from a thread of its
            # own (and self._lock serializes calls anyway).
            self._conn = sqlite3.connect(
                path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the SQLite ledger at {path}: {exc}") from exc
        try:
            self._configure(memory)
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _configure(self, memory: bool) -> None:
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._enable_wal()
            # WAL + synchronous=NORMAL: a commit appends to the WAL and returns without an
            # fsync (the WAL is fsynced at checkpoints). A committed transaction survives the
            # crash or kill of any process, which is the failure the ledger is for: the data
            # is in the OS page cache and the next opener replays the WAL. Only an OS crash or
            # power loss can roll back the last few commits (never corrupt the file); then
            # the sink re-reads from an older offset and the providers' idempotency keys absorb
            # the repeat. synchronous=FULL would fsync each commit for that case as well.
            self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot configure the SQLite ledger at {self.path}: {exc}") from exc
        if not memory and str(mode).lower() != "wal":
            raise LedgerError(
                f"the SQLite ledger at {self.path} could not switch to WAL (journal_mode is "
                f"{mode!r}; WAL needs a local filesystem with shared memory)"
            )

    def _enable_wal(self) -> str:
        # Switching a file to WAL takes an exclusive lock, and SQLite answers SQLITE_BUSY at
        # once, without the busy handler, when another connection is opening the same new
        # file: retry until the busy timeout. (Once the file is in WAL, this is a no-op.)
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                return str(self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _migrate(self) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise LedgerError(
                        f"the SQLite ledger at {self.path} has schema version {version}; "
                        f"this Herald knows up to {SCHEMA_VERSION}"
                    )
                for step in _STEPS[version:]:
                    for statement in step.split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                if version < SCHEMA_VERSION:
                    self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise LedgerError(
                f"cannot create the SQLite ledger schema at {self.path}: {exc}"
            ) from exc

    def lookup(self, keys: list[Key]) -> dict[Key, LedgerEntry]:
        if not keys:
            return {}
        wanted = set(keys)
        ids = sorted({notification_id for notification_id, _ in wanted})
        found: dict[Key, LedgerEntry] = {}
        with self._lock:
            try:
                self._check_open()
                # One read transaction: every chunk sees the same snapshot.
                self._conn.execute("BEGIN")
                try:
                    for chunk in _chunks(ids, _LOOKUP_CHUNK):
                        sql = _SELECT_DELIVERIES.format(", ".join("?" * len(chunk)))
                        for row in self._conn.execute(sql, tuple(chunk)):
                            key = (row[0], int(row[1]))
                            if key in wanted:
                                found[key] = _entry(row)
                finally:
                    if self._conn.in_transaction:
                        self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger lookup failed: {exc}") from exc
        return found

    def record(self, group: str, outcomes: list[LedgerOutcome], offsets: dict[TP, int]) -> None:
        now = _ts(datetime.now(UTC))
        # Built before the transaction: a bad timestamp fails with nothing begun.
        delivery_rows = [
            (
                o.notification_id,
                o.generation,
                o.channel,
                o.recipient,
                o.state,
                o.attempts,
                o.response,
                o.error_class,
                o.provider_message_id,
                _ts(o.at),
                _ts(o.at),
            )
            # Stable sort by key: inserts walk the B-tree in order, and two outcomes of one key
            # keep the order they were given in (the same order the PostgreSQL ledger uses).
            for o in sorted(outcomes, key=lambda o: (o.notification_id, o.generation))
        ]
        offset_rows = [
            (group, topic, partition, offset, now)
            for (topic, partition), offset in sorted(offsets.items())
        ]
        if not delivery_rows and not offset_rows:
            return
        with self._lock:
            try:
                self._check_open()
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if delivery_rows:
                        self._conn.executemany(_UPSERT_DELIVERY, delivery_rows)
                    if offset_rows:
                        self._conn.executemany(_UPSERT_OFFSET, offset_rows)
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger record failed, nothing written: {exc}") from exc

    def offsets(self, group: str, partitions: list[TP]) -> dict[TP, int]:
        if not partitions:
            return {}
        wanted = set(partitions)
        found: dict[TP, int] = {}
        with self._lock:
            try:
                self._check_open()
                # A group has one row per partition it consumed: few enough to read whole.
                rows = self._conn.execute(
                    'SELECT topic, "partition", next_offset FROM offsets WHERE group_id = ?',
                    (group,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger offsets read failed: {exc}") from exc
        for topic, partition, next_offset in rows:
            tp = (str(topic), int(partition))
            if tp in wanted:
                found[tp] = int(next_offset)
        return found

    def claim_idempotency_key(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        response: str,
        now: datetime,
        expired_before: datetime,
    ) -> IdempotencyClaim:
        created_at, cutoff = _ts(now), _ts(expired_before)
        # BEGIN IMMEDIATE takes the write lock first: a claim from another connection waits
        # (busy_timeout) until this one committed, then finds this row.
        with self._write("idempotency key claim failed, nothing written") as conn:
            conn.execute(_FORGET_EXPIRED_KEY, (scope, key, cutoff))
            inserted = conn.execute(
                _INSERT_KEY, (scope, key, fingerprint, response, created_at)
            ).rowcount
            row = conn.execute(_SELECT_KEY, (scope, key)).fetchone()
        return IdempotencyClaim(_idempotency_record(row), created=inserted == 1)

    def complete_idempotency_key(
        self, scope: str, key: str, fingerprint: str, at: datetime
    ) -> None:
        done = _ts(at)
        with self._write("idempotency key completion failed") as conn:
            conn.execute(_COMPLETE_KEY, (done, scope, key, fingerprint))

    def purge_idempotency_keys(self, expired_before: datetime) -> int:
        cutoff = _ts(expired_before)
        with self._write("idempotency key purge failed") as conn:
            deleted = conn.execute(
                "DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,)
            ).rowcount
        return int(deleted)

    @contextmanager
    def _write(self, failure: str) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed when the block ends, rolled back
        (and raised as LedgerError starting with ``failure``) when it raises."""
        with self._lock:
            try:
                self._check_open()
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LedgerError(f"{failure}: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("the ledger is closed")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

    def __repr__(self) -> str:
        return f"SQLiteLedger({self.path!r})"
