"""The delivery ledger on PostgreSQL: for sinks on several hosts sharing a consumer group.

One connection per ledger (psycopg 3, synchronous, autocommit off); every call is one
transaction. The tables (``schema_version``, ``deliveries``, ``offsets``,
``idempotency_keys``) live in the
connection's default schema (``search_path``) and are created on first use, under a
transaction-scoped advisory lock so that sinks starting together do not race.

Nothing raised from here holds the password of the URL: connection failures are re-raised as
``LedgerError`` with the URL masked and the password scrubbed from the driver's message.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

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

__all__ = ["SCHEMA_VERSION", "PostgresLedger", "mask_url"]

# Stored in schema_version.version. Bump it, and add a step to _STEPS, when the schema
# changes. 1: deliveries and offsets. 2: idempotency_keys (the HTTP API's).
SCHEMA_VERSION = 2

# pg_advisory_xact_lock key for schema creation and migration: any constant bigint that no
# other application on the database uses ("herald" in ASCII).
_SCHEMA_LOCK = 0x68_65_72_61_6C_64

CONNECT_TIMEOUT_S = 10

# Keys per lookup statement (keys travel as two array parameters, so this bounds memory, not
# a parameter limit).
_LOOKUP_CHUNK = 10_000

_TERMINAL_SQL = "('DEAD', 'REJECTED', 'SENT')"
if {DeliveryState(s) for s in ("DEAD", "REJECTED", "SENT")} != TERMINAL:  # pragma: no cover
    raise ImportError("ledger_postgres's terminal states differ from ledger.TERMINAL")

_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS schema_version (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version   integer NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS deliveries (
        notification_id     text        NOT NULL,
        generation          bigint      NOT NULL,
        channel             text        NOT NULL,
        recipient           text        NOT NULL,
        state               text        NOT NULL
                            CHECK (state IN ('SENT', 'RETRYING', 'REJECTED', 'DEAD')),
        attempts            integer     NOT NULL CHECK (attempts >= 0),
        response            text,
        error_class         text,
        provider_message_id text,
        first_attempt_at    timestamptz NOT NULL,
        updated_at          timestamptz NOT NULL,
        PRIMARY KEY (notification_id, generation)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS offsets (
        group_id    text        NOT NULL,
        topic       text        NOT NULL,
        "partition" integer     NOT NULL,
        next_offset bigint      NOT NULL CHECK (next_offset >= 0),
        updated_at  timestamptz NOT NULL,
        PRIMARY KEY (group_id, topic, "partition")
    )
    """,
)

_SCHEMA_V2 = (
    """
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        scope           text        NOT NULL,
        idempotency_key text        NOT NULL,
        fingerprint     text        NOT NULL,
        response        text        NOT NULL,
        created_at      timestamptz NOT NULL,
        completed_at    timestamptz,
        PRIMARY KEY (scope, idempotency_key)
    )
    """,
    "CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON idempotency_keys (created_at)",
)

# The DDL that takes a ledger from version N-1 to N, for N = 1, 2, ...
_STEPS = (_SCHEMA_V1, _SCHEMA_V2)
if len(_STEPS) != SCHEMA_VERSION:  # pragma: no cover
    raise ImportError("ledger_postgres: one schema step per version")

# The stored row is kept (only attempts, first_attempt_at and updated_at may move) when it is
# SENT, or when it is terminal and the incoming state is not.
_KEEP = (
    f"(d.state = 'SENT' OR (d.state IN {_TERMINAL_SQL} AND EXCLUDED.state NOT IN {_TERMINAL_SQL}))"
)

_UPSERT_DELIVERY = f"""
INSERT INTO deliveries AS d (
    notification_id, generation, channel, recipient, state, attempts, response, error_class,
    provider_message_id, first_attempt_at, updated_at
) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (notification_id, generation) DO UPDATE SET
    state = CASE WHEN {_KEEP} THEN d.state ELSE EXCLUDED.state END,
    response = CASE WHEN {_KEEP} THEN d.response ELSE EXCLUDED.response END,
    error_class = CASE WHEN {_KEEP} THEN d.error_class ELSE EXCLUDED.error_class END,
    provider_message_id = CASE WHEN {_KEEP} THEN d.provider_message_id
                               ELSE EXCLUDED.provider_message_id END,
    attempts = GREATEST(d.attempts, EXCLUDED.attempts),
    first_attempt_at = LEAST(d.first_attempt_at, EXCLUDED.first_attempt_at),
    updated_at = GREATEST(d.updated_at, EXCLUDED.updated_at)
"""  # noqa: S608 - only constants are formatted in; values are bound parameters

_UPSERT_OFFSET = """
INSERT INTO offsets AS o (group_id, topic, "partition", next_offset, updated_at)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (group_id, topic, "partition") DO UPDATE SET
    next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset),
    updated_at = CASE WHEN EXCLUDED.next_offset > o.next_offset
                      THEN EXCLUDED.updated_at ELSE o.updated_at END
"""

_FORGET_EXPIRED_KEY = """
DELETE FROM idempotency_keys WHERE scope = %s AND idempotency_key = %s AND created_at < %s
"""

_INSERT_KEY = """
INSERT INTO idempotency_keys (
    scope, idempotency_key, fingerprint, response, created_at, completed_at
) VALUES (%s, %s, %s, %s, %s, NULL)
ON CONFLICT (scope, idempotency_key) DO NOTHING
"""

_SELECT_KEY = """
SELECT scope, idempotency_key, fingerprint, response, created_at, completed_at
FROM idempotency_keys WHERE scope = %s AND idempotency_key = %s
"""

_COMPLETE_KEY = """
UPDATE idempotency_keys SET completed_at = %s
WHERE scope = %s AND idempotency_key = %s AND fingerprint = %s AND completed_at IS NULL
"""

_SELECT_DELIVERIES = """
SELECT d.notification_id, d.generation, d.channel, d.recipient, d.state, d.attempts,
       d.response, d.error_class, d.provider_message_id, d.first_attempt_at, d.updated_at
FROM deliveries AS d
JOIN unnest(%s::text[], %s::bigint[]) AS k(notification_id, generation)
  ON d.notification_id = k.notification_id AND d.generation = k.generation
"""


def _secrets(url: str) -> list[str]:
    """The password(s) a URL carries, as written and decoded, longest first."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        if parts.password:
            found.update({parts.password, unquote(parts.password)})
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "password" and value:
                found.add(value)
    except ValueError:
        pass
    try:
        password = conninfo_to_dict(url).get("password")
        if password:
            found.add(str(password))
    except psycopg.Error:
        pass
    return sorted(found, key=len, reverse=True)


def mask_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) as ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostport}"
        query = urlencode(
            [
                (k, "***" if k == "password" else v)
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="*",
        )
        masked = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable URL>"
    return _scrub(masked, _secrets(url))


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


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
        first_attempt_at=row[9].astimezone(UTC),
        updated_at=row[10].astimezone(UTC),
    )


def _idempotency_record(row: Sequence[Any]) -> IdempotencyRecord:
    return IdempotencyRecord(
        scope=row[0],
        key=row[1],
        fingerprint=row[2],
        response=row[3],
        created_at=row[4].astimezone(UTC),
        completed_at=row[5].astimezone(UTC) if row[5] is not None else None,
    )


def _aware(value: datetime) -> datetime:
    # A naive datetime would be read in the session's TimeZone: refuse it rather than guess.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"ledger timestamps must be timezone-aware, got {value!r}")
    return value


class PostgresLedger(Ledger):
    def __init__(self, url: str) -> None:
        self._url = url  # never shown: see __repr__ and mask_url
        self._secrets = _secrets(url)
        self.masked_url = mask_url(url)
        self._lock = threading.Lock()
        self._closed = False
        self._conn = self._connect()
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _fail(self, what: str, exc: BaseException) -> LedgerError:
        return LedgerError(_scrub(f"{what} ({self.masked_url}): {exc}", self._secrets))

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            params = conninfo_to_dict(self._url)
            extra: dict[str, Any] = {}
            if "connect_timeout" not in params:
                extra["connect_timeout"] = CONNECT_TIMEOUT_S
            if "application_name" not in params:
                extra["application_name"] = "herald-ledger"
            return psycopg.connect(self._url, autocommit=False, **extra)
        except psycopg.Error as exc:
            # `from None`: the driver's exception, were it chained, would print unscrubbed.
            raise self._fail("cannot connect to the PostgreSQL ledger", exc) from None

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The connection, opened again if the last one was lost (a server restart)."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        if self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _migrate(self) -> None:
        conn = self._conn
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
                row = cur.fetchone()
                version = 0
                if row is not None and row[0]:
                    cur.execute("SELECT version FROM schema_version")
                    current = cur.fetchone()
                    version = int(current[0]) if current is not None else 0
                if version > SCHEMA_VERSION:
                    raise LedgerError(
                        f"the PostgreSQL ledger ({self.masked_url}) has schema version "
                        f"{version}; this Herald knows up to {SCHEMA_VERSION}"
                    )
                if version < SCHEMA_VERSION:
                    # Only DDL when needed: CREATE ... IF NOT EXISTS still needs the CREATE
                    # privilege, which a sink's role may rightly lack once the schema exists.
                    for step in _STEPS[version:]:
                        for statement in step:
                            cur.execute(statement)
                    cur.execute(
                        "INSERT INTO schema_version (version) VALUES (%s) "
                        "ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version",
                        (SCHEMA_VERSION,),
                    )
        except psycopg.Error as exc:
            raise self._fail("cannot create the PostgreSQL ledger schema", exc) from exc

    def lookup(self, keys: list[Key]) -> dict[Key, LedgerEntry]:
        if not keys:
            return {}
        unique = sorted(set(keys))
        found: dict[Key, LedgerEntry] = {}
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    for start in range(0, len(unique), _LOOKUP_CHUNK):
                        chunk = unique[start : start + _LOOKUP_CHUNK]
                        cur.execute(
                            _SELECT_DELIVERIES,
                            ([k[0] for k in chunk], [k[1] for k in chunk]),
                        )
                        for row in cur:
                            entry = _entry(row)
                            found[(entry.notification_id, entry.generation)] = entry
            except psycopg.Error as exc:
                raise self._fail("ledger lookup failed", exc) from exc
        return found

    def record(self, group: str, outcomes: list[LedgerOutcome], offsets: dict[TP, int]) -> None:
        now = datetime.now(UTC)
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
                _aware(o.at),
                o.at,
            )
            # Stable sort by key: writers take row locks in one order (no deadlock between two
            # sinks), while two outcomes of one key keep the order they were given in.
            for o in sorted(outcomes, key=lambda o: (o.notification_id, o.generation))
        ]
        offset_rows = [
            (group, topic, partition, offset, now)
            for (topic, partition), offset in sorted(offsets.items())
        ]
        if not delivery_rows and not offset_rows:
            return
        with self._lock:
            conn = self._connection()
            try:
                # executemany runs in pipeline mode: one round trip per batch, not per row.
                # Rows go one statement each, so a batch may hold the same key twice (a
                # single multi-row INSERT ... ON CONFLICT could not).
                with conn.transaction(), conn.cursor() as cur:
                    if delivery_rows:
                        cur.executemany(_UPSERT_DELIVERY, delivery_rows)
                    if offset_rows:
                        cur.executemany(_UPSERT_OFFSET, offset_rows)
            except psycopg.Error as exc:
                raise self._fail("ledger record failed, nothing written", exc) from exc

    def offsets(self, group: str, partitions: list[TP]) -> dict[TP, int]:
        if not partitions:
            return {}
        wanted = set(partitions)
        with self._lock:
            conn = self._connection()
            try:
                # A group has one row per partition it consumed: few enough to read whole.
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(
                        'SELECT topic, "partition", next_offset FROM offsets WHERE group_id = %s',
                        (group,),
                    )
                    rows = cur.fetchall()
            except psycopg.Error as exc:
                raise self._fail("ledger offsets read failed", exc) from exc
        found: dict[TP, int] = {}
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
        _aware(now)
        _aware(expired_before)
        with self._lock:
            conn = self._connection()
            try:
                # READ COMMITTED: a concurrent claim's INSERT waits on this row's unique index
                # entry until this transaction ends, then does nothing; its SELECT, a new
                # statement, sees this row.
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(_FORGET_EXPIRED_KEY, (scope, key, expired_before))
                    cur.execute(_INSERT_KEY, (scope, key, fingerprint, response, now))
                    inserted = cur.rowcount
                    cur.execute(_SELECT_KEY, (scope, key))
                    row = cur.fetchone()
            except psycopg.Error as exc:
                raise self._fail("idempotency key claim failed, nothing written", exc) from exc
        if row is None:  # pragma: no cover - inserted or found in this transaction
            raise LedgerError(f"idempotency key claim found no row for {scope}")
        return IdempotencyClaim(_idempotency_record(row), created=inserted == 1)

    def complete_idempotency_key(
        self, scope: str, key: str, fingerprint: str, at: datetime
    ) -> None:
        _aware(at)
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(_COMPLETE_KEY, (at, scope, key, fingerprint))
            except psycopg.Error as exc:
                raise self._fail("idempotency key completion failed", exc) from exc

    def purge_idempotency_keys(self, expired_before: datetime) -> int:
        _aware(expired_before)
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(
                        "DELETE FROM idempotency_keys WHERE created_at < %s", (expired_before,)
                    )
                    deleted = cur.rowcount
            except psycopg.Error as exc:
                raise self._fail("idempotency key purge failed", exc) from exc
        return int(deleted)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

    def __repr__(self) -> str:
        return f"PostgresLedger({self.masked_url!r})"
