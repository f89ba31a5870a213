"""The delivery ledger: where a sink keeps, per notification, what happened to it, and per
topic-partition the next offset to read, written in one transaction.

This is Kafka's own advice for exactly-once output to an external system: store the
consumer's position in the same place as its output. A sink that restarts reads its offsets
from here and skips what the ledger already has as done, so a crash or a replay costs no
second provider call for anything the ledger recorded.

States (``DeliveryState``): SENT, REJECTED and DEAD are terminal; RETRYING means the last
attempt failed and a retry record was written to a retry topic.

The same database also keeps the HTTP API's idempotency keys (``claim_idempotency_key``):
which request each key was first used for, so that a key reused with another request is
refused instead of publishing a second, different notification under the first one's ids.

Backends: SQLite (embedded default; WAL) and PostgreSQL (sinks on several hosts). Calls are
synchronous; the sink serializes them on one thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pipeline.records import DeliveryState

R = TypeVar("R")

__all__ = [
    "TERMINAL",
    "IdempotencyClaim",
    "IdempotencyRecord",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "LedgerOutcome",
    "LedgerThread",
    "open_ledger",
]

TERMINAL = frozenset({DeliveryState.SENT, DeliveryState.REJECTED, DeliveryState.DEAD})

# (notification_id, generation): a forced redelivery is a new generation with its own row.
Key = tuple[str, int]
# (topic, partition)
TP = tuple[str, int]


class LedgerError(RuntimeError):
    """A ledger operation failed (connection, schema or transaction). Its message never holds
    the password of the ledger URL."""


@dataclass(frozen=True)
class LedgerEntry:
    notification_id: str
    generation: int
    channel: str
    recipient: str
    state: DeliveryState
    attempts: int
    response: str | None
    error_class: str | None
    provider_message_id: str | None
    first_attempt_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class LedgerOutcome:
    """One attempt's outcome, to be recorded."""

    notification_id: str
    generation: int
    channel: str
    recipient: str
    state: DeliveryState
    attempts: int  # attempts so far, including this one
    response: str | None
    error_class: str | None
    provider_message_id: str | None
    at: datetime


@dataclass(frozen=True)
class IdempotencyRecord:
    """What the API answered to the first request that used an Idempotency-Key."""

    scope: str  # what the key is scoped to, e.g. "POST /v1/notifications"
    key: str  # the client's Idempotency-Key
    fingerprint: str  # of that request (method, path, canonical JSON body)
    response: str  # the JSON body answered (the ids), replayed to a retry
    created_at: datetime
    completed_at: datetime | None  # when Kafka acknowledged the write; None until then


@dataclass(frozen=True)
class IdempotencyClaim:
    record: IdempotencyRecord  # the stored record: this request's, or the first user's
    created: bool  # True when this call stored it (the key was new, or had expired)

    def matches(self, fingerprint: str) -> bool:
        return self.record.fingerprint == fingerprint


class Ledger(ABC):
    @abstractmethod
    def lookup(self, keys: list[Key]) -> dict[Key, LedgerEntry]:
        """The entries the ledger has for ``keys`` (missing keys are absent)."""

    @abstractmethod
    def record(self, group: str, outcomes: list[LedgerOutcome], offsets: dict[TP, int]) -> None:
        """In ONE transaction: upsert ``outcomes`` and move ``group``'s next offsets forward.

        - A terminal state is never replaced by a non-terminal one, and SENT is never
          replaced at all (a late duplicate's failure must not undo a delivery).
        - attempts keeps the larger value; first_attempt_at keeps the earliest.
        - An offset only moves forward: the stored value becomes max(stored, given).
        Raises on failure with nothing written."""

    @abstractmethod
    def offsets(self, group: str, partitions: list[TP]) -> dict[TP, int]:
        """``group``'s next offsets for those partitions the ledger has one for."""

    @abstractmethod
    def claim_idempotency_key(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        response: str,
        now: datetime,
        expired_before: datetime,
    ) -> IdempotencyClaim:
        """In ONE transaction: forget ``(scope, key)`` if it was stored before
        ``expired_before``; store it with this fingerprint and response unless it is stored;
        return what is stored.

        Two concurrent claims of one key (from any process) store exactly one record: the
        other call gets that record back (``created`` False) and compares fingerprints."""

    @abstractmethod
    def complete_idempotency_key(
        self, scope: str, key: str, fingerprint: str, at: datetime
    ) -> None:
        """Mark the request stored for ``(scope, key)`` as written to Kafka, if it is still
        the one with ``fingerprint`` (a no-op otherwise). Called after Kafka acknowledged:
        from then on a retry is answered from the ledger without writing again."""

    @abstractmethod
    def purge_idempotency_keys(self, expired_before: datetime) -> int:
        """Delete the keys stored before ``expired_before``; returns how many."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""


def open_ledger(url: str) -> Ledger:
    """``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` or a PostgreSQL URL
    (``postgresql://user@host:port/db``)."""
    if url.startswith("sqlite:///"):
        from pipeline.sink.ledger_sqlite import SQLiteLedger

        return SQLiteLedger(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from pipeline.sink.ledger_postgres import PostgresLedger

        return PostgresLedger(url)
    raise ValueError(
        "HERALD_LEDGER_URL must start with sqlite:/// or postgresql:// "
        f"(got a value starting with {url.split(':', 1)[0]!r})"
    )


class LedgerThread:
    """A ledger called from the event loop: every call runs on one thread of its own, one
    at a time, so a slow ledger never stalls the loop and calls never interleave."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self._ledger = ledger
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "herald-ledger")

    async def open(self, url: str) -> None:
        """Open the ledger at ``url`` unless one was given."""
        if self._ledger is None:
            self._ledger = await self._run(open_ledger, url)

    async def lookup(self, keys: list[Key]) -> dict[Key, LedgerEntry]:
        return await self._run(self._get().lookup, keys)

    async def record(
        self, group: str, outcomes: list[LedgerOutcome], offsets: dict[TP, int]
    ) -> None:
        await self._run(self._get().record, group, outcomes, offsets)

    async def offsets(self, group: str, partitions: list[TP]) -> dict[TP, int]:
        return await self._run(self._get().offsets, group, partitions)

    async def close(self) -> None:
        try:
            if self._ledger is not None:
                await self._run(self._ledger.close)
        finally:
            self._thread.shutdown()

    def _get(self) -> Ledger:
        if self._ledger is None:
            raise LedgerError("the ledger is not open")
        return self._ledger

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
