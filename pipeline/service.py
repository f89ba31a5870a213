"""The notification service's operations, shared by the HTTP API (pipeline/api.py) and the
gRPC API (pipeline/grpc_api.py): validating and encoding events and direct notifications,
the record-size limit, Idempotency-Keys and reading delivery state from the ledger.

Transport-free: a request arrives as the JSON-shaped dict the HTTP API takes (the gRPC API
converts its messages to the same shape), an acceptance is a dict of ids, and a refusal is a
``ServiceError`` subclass that each transport maps to its own answer (a problem document with
an HTTP status; a gRPC status code). Nothing here knows aiohttp or grpc.

Idempotency. A request may carry a key (1 to 255 printable ASCII characters). The first
request with a key is stored in the ledger's database with its fingerprint (what the request
was: method, path or RPC name, and canonical JSON of its body), scoped by method and path
(``POST /v1/notifications``, ``gRPC /herald.v1.NotificationService/SendNotification``), for
``HERALD_API_IDEMPOTENCY_RETENTION_S``:

- the same key with the same request gets the same ids. Once Kafka acknowledged the first,
  nothing is written again (``Accepted.replayed``); while it has not (in flight, or Kafka
  refused it), the record is written again under the same ids, which the router and the
  sinks absorb;
- the same key with a different request is refused (``IdempotencyKeyReused``) and nothing is
  written: a second, different notification must not go out under the first one's ids.

The ids a key yields are uuid5 of the key and the fingerprint, so once a key has expired a
different request with it gets ids of its own rather than colliding with the first one's.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from pipeline import headers as h
from pipeline import metrics, tracing
from pipeline.publisher import (
    OutgoingRecord,
    OversizedRecordError,
    Publisher,
    PublishError,
    new_traceparent,
)
from pipeline.records import NOTIFICATION_INTENT, NotificationIntent, notification_id
from pipeline.schemas import SchemaError
from pipeline.serialization import RecordValidationError
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import Ledger, LedgerEntry, LedgerError
from pipeline.topics import Topics

__all__ = [
    "BODY_LIMIT_FACTOR",
    "IDEMPOTENCY_KEY_REUSED",
    "MAX_KEY_LENGTH",
    "Accepted",
    "BadRequest",
    "BodyTooLarge",
    "Idempotency",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "NotFound",
    "NotificationService",
    "RecordTooLarge",
    "ServiceError",
    "Unavailable",
    "UnknownEventType",
    "authorized",
    "installed_channels",
    "parse_idempotency_key",
    "request_fingerprint",
]

log = logging.getLogger(__name__)

_API_NS = uuid.UUID("0d6c1a52-3c1e-5b0f-8a4e-7b2f9c1d3e5a")  # fixed forever, like ids

# The problem type of a key reused with a different request (a tag URI: an identifier that
# needs no registration and is not meant to be fetched).
IDEMPOTENCY_KEY_REUSED = "tag:herald,2025:problems/idempotency-key-reused"

MAX_KEY_LENGTH = 255  # Stripe's limit; the IETF draft sets none
# JSON can be larger than the Avro record it becomes (field names, escapes, numbers as text):
# requests are read up to this many times the record limit, and the record is what is checked.
BODY_LIMIT_FACTOR = 2
# The ledger generations a notification is looked up under: 0, the redrives of dead letters
# and what replay --force made.
GENERATIONS = 16


# -- refusals ---------------------------------------------------------------------------------


class ServiceError(Exception):
    """A request the service refuses. ``title`` is a short summary, the message says what
    is wrong and what to do; ``problem_type`` and ``extra()`` are what a problem document
    carries besides them. Each transport maps the subclass to its status."""

    problem_type: ClassVar[str] = "about:blank"

    def __init__(self, title: str, detail: str) -> None:
        super().__init__(detail)
        self.title = title
        self.detail = detail

    def extra(self) -> dict[str, Any]:
        """Members a problem document adds (HTTP) or trailing metadata carries (gRPC)."""
        return {}


class BadRequest(ServiceError):
    """The request itself is malformed: not JSON, a bad Idempotency-Key, an id that is not a
    UUID."""


class InvalidRequest(ServiceError):
    """Well-formed, but its fields are wrong or missing; ``fields`` names them."""

    def __init__(self, title: str, detail: str, fields: list[str] | None = None) -> None:
        super().__init__(title, detail)
        self.fields = fields or []

    def extra(self) -> dict[str, Any]:
        return {"fields": self.fields} if self.fields else {}


class UnknownEventType(ServiceError):
    """No schema for the event type."""


class RecordTooLarge(ServiceError):
    """The encoded record would be over HERALD_MAX_RECORD_BYTES; nothing was written."""

    def __init__(self, error: OversizedRecordError) -> None:
        super().__init__("Content Too Large", str(error))
        self.size = error.size
        self.limit = error.limit

    def extra(self) -> dict[str, Any]:
        return {"size": self.size, "limit": self.limit}


class BodyTooLarge(ServiceError):
    """The request is over twice HERALD_MAX_RECORD_BYTES, before it is even decoded."""


class IdempotencyKeyReused(ServiceError):
    """The key was first used for a different request; nothing was written."""

    problem_type = IDEMPOTENCY_KEY_REUSED

    def __init__(self, key: str, scope: str, first_used_at: datetime) -> None:
        super().__init__(
            "Idempotency-Key reused",
            f"this Idempotency-Key was used at {first_used_at.isoformat()} for a different "
            f"request to {scope}; a retry must repeat that request exactly, a new request "
            "needs a new key",
        )
        self.key = key

    def extra(self) -> dict[str, Any]:
        return {"idempotency_key": self.key}


class NotFound(ServiceError):
    """Nothing recorded under that id."""


class Unavailable(ServiceError):
    """Kafka or the ledger did not answer; the request may be retried as it is."""

    def __init__(self, detail: str) -> None:
        super().__init__("Service Unavailable", detail)


# -- idempotency --------------------------------------------------------------------------------


def request_fingerprint(method: str, path: str, body: Any) -> str:
    """What makes two requests "the same" for an Idempotency-Key: method, path and the body
    as canonical JSON (keys sorted, no insignificant whitespace, UTF-8), so spacing and key
    order do not matter and any other difference does."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{method}\n{path}\n{canonical}".encode()).hexdigest()
    return f"sha256:{digest}"


def parse_idempotency_key(raw: str) -> str:
    """The key in an Idempotency-Key header (or idempotency-key metadata); a quoted
    structured-field string is read without its quotes. BadRequest when malformed."""
    key = raw.strip()
    if len(key) >= 2 and key.startswith('"') and key.endswith('"'):
        key = key[1:-1].replace('\\"', '"').replace("\\\\", "\\")  # an sf-string
    if not 0 < len(key) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise BadRequest(
            "Bad Request",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return key


@dataclass(frozen=True)
class Idempotency:
    """The Idempotency-Key of one request, with what it is scoped to (method and path, or
    the RPC) and the request's fingerprint."""

    scope: str
    key: str
    fingerprint: str

    @classmethod
    def of(cls, key: str, method: str, path: str, body: Any) -> Idempotency:
        """The key of a request to ``method path`` with ``body`` (its JSON as received, or a
        gRPC request as a dict)."""
        return cls(f"{method} {path}", key, request_fingerprint(method, path, body))

    def ids_seed(self) -> str:
        return f"{self.key}\x1f{self.fingerprint}"


def authorized(authorization: str | None, token: bytes | None) -> bool:
    """Whether a request with this Authorization header (or authorization metadata) may
    pass: always without a token; else only ``Bearer <token>`` (scheme case-insensitive,
    RFC 9110), compared in constant time. A bare token or another scheme is refused."""
    if token is None:
        return True
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return False
    try:
        given = credentials.encode()
    except UnicodeEncodeError:  # lone surrogates: not our token, whatever they are
        return False
    return hmac.compare_digest(given, token)


@dataclass(frozen=True)
class Accepted:
    """An accepted request: what to answer (its ids and ``"status": "accepted"``), and
    whether it is a retry answered from the ledger with nothing written."""

    answer: dict[str, Any]
    replayed: bool = False


@functools.cache
def installed_channels() -> list[str]:
    """The installed connectors' channels (read once: packages do not change under a running
    process)."""
    from connectors.registry import installed_channels as installed

    return installed()


# -- the service --------------------------------------------------------------------------------


class NotificationService:
    def __init__(self, settings: HeraldSettings, publisher: Publisher, ledger: Ledger) -> None:
        self.settings = settings
        self.publisher = publisher
        self.ledger = ledger
        self.topics = Topics(settings.topic_prefix)
        self.request_limit = settings.max_record_bytes * BODY_LIMIT_FACTOR
        self.retention = timedelta(seconds=settings.api_idempotency_retention_s)
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self.token = token.encode() if token else None  # for authorized()

    async def publish_event(
        self,
        event_type: str,
        body: dict[str, Any],
        *,
        idem: Idempotency | None,
        traceparent: str | None,
        producer: str,
    ) -> Accepted:
        """Validate, encode and write one domain event (``body``: its fields, an optional
        ``envelope`` among them). The answer has ``event_id``, ``topic`` and ``status``."""
        envelope = body.get("envelope") or {}
        if not isinstance(envelope, dict):
            raise InvalidRequest("Invalid Event", "envelope must be an object", ["envelope"])
        envelope = dict(envelope)
        if idem is not None:  # the same request: the same event id, hence notification ids
            seed = f"event:{event_type}:{idem.ids_seed()}"
            envelope.setdefault("event_id", str(uuid.uuid5(_API_NS, seed)))
        envelope.setdefault("producer", producer)
        caller = h.valid_traceparent(traceparent)
        if caller or not tracing.enabled():  # else the publisher's span starts the trace
            envelope.setdefault("traceparent", caller or new_traceparent())
        try:
            event, record = self.publisher.prepare(event_type, {**body, "envelope": envelope})
        except SchemaError as e:
            raise UnknownEventType("Unknown Event Type", str(e)) from e
        except RecordValidationError as e:
            raise InvalidRequest("Invalid Event", str(e), e.fields) from e
        except OversizedRecordError as e:
            raise RecordTooLarge(e) from e
        answer = {"event_id": event.event_id, "topic": event.topic, "status": "accepted"}
        return await self._write(record, answer, idem)

    async def send_notification(
        self,
        body: Mapping[str, Any],
        *,
        idem: Idempotency | None,
        traceparent: str | None,
        answer_extra: Mapping[str, Any] | None = None,
    ) -> Accepted:
        """Validate, encode and write one direct notification to notifications.<channel>
        (``body``: channel, recipient and body_text, optionally subject, body_html, user_id
        and data, an object of strings). The answer has ``notification_id`` and ``status``
        (and ``answer_extra``)."""
        problems: list[tuple[str, str]] = [
            (f, f"{f} is required")
            for f in ("channel", "recipient", "body_text")
            if not body.get(f)
        ]
        channel = str(body.get("channel", ""))
        channels = installed_channels()
        if channel and channel not in channels:
            problems.append(("channel", f"channel must be one of {', '.join(channels)}"))
        data = body.get("data") or {}
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            problems.append(("data", "data must be an object of strings"))
        if problems:
            raise InvalidRequest(
                "Invalid Notification",
                "; ".join(message for _, message in problems),
                [f for f, _ in problems],
            )
        if idem is not None:
            event_id = str(uuid.uuid5(_API_NS, f"direct:{idem.ids_seed()}"))
        else:
            event_id = str(uuid.uuid4())
        recipient = str(body["recipient"])
        caller = h.valid_traceparent(traceparent)
        with tracing.span(
            "herald.publish direct",
            parent=caller,
            kind="producer",
            attributes={"herald.event_id": event_id, "herald.channel": channel},
        ) as span:
            intent = NotificationIntent(
                notification_id=notification_id(event_id, "direct", channel, recipient),
                event_id=event_id,
                event_type="direct",
                rule="direct",
                channel=channel,
                recipient=recipient,
                subject=body.get("subject"),
                body_text=str(body["body_text"]),
                body_html=body.get("body_html"),
                user_id=body.get("user_id"),
                data={str(k): str(v) for k, v in data.items()},
                created_at=datetime.now(UTC),
                # The caller's trace continues through the notification (W3C Trace Context),
                # through the publish span when tracing is on.
                traceparent=span.traceparent if span else caller or new_traceparent(),
            )
            try:
                value, ref = self.publisher.serde.encode(NOTIFICATION_INTENT, intent.to_avro())
            except RecordValidationError as e:
                raise InvalidRequest("Invalid Notification", str(e), e.fields) from e
            hdrs = h.for_record(
                schema_ref=ref,
                event_type="direct",
                event_id=event_id,
                notification_id=intent.notification_id,
                traceparent=intent.traceparent,
            )
            record = OutgoingRecord(self.topics.notifications(channel), recipient, value, hdrs)
            try:
                self.publisher.check_size(record)
            except OversizedRecordError as e:
                raise RecordTooLarge(e) from e
            answer = {
                "notification_id": intent.notification_id,
                "status": "accepted",
                **(answer_extra or {}),
            }
            return await self._write(record, answer, idem)

    async def deliveries(self, nid: str) -> list[LedgerEntry]:
        """What the ledger has for notification ``nid``, by generation. NotFound while it has
        nothing (the notification may still be queued)."""
        try:
            uuid.UUID(nid)
        except ValueError:
            raise BadRequest("Bad Request", "a notification id is a UUID") from None
        keys = [(nid, g) for g in range(GENERATIONS)]
        try:
            entries = await asyncio.to_thread(self.ledger.lookup, keys)
        except LedgerError as e:
            log.warning("ledger lookup failed: %s", e)
            raise Unavailable("the delivery ledger is down; retry") from e
        found = [entries[k] for k in keys if k in entries]
        if not found:
            raise NotFound("Not Found", "no delivery recorded yet (it may still be queued)")
        return found

    async def _write(
        self, record: OutgoingRecord, answer: dict[str, Any], idem: Idempotency | None
    ) -> Accepted:
        """Produce ``record`` once Kafka acknowledged it, minding the request's key: a key
        first used for another request is refused with nothing produced; a repeat of an
        acknowledged request is answered from the ledger."""
        if idem is None:
            await self._produce(record)
            return Accepted(answer)
        now = datetime.now(UTC)
        try:
            claim = await asyncio.to_thread(
                self.ledger.claim_idempotency_key,
                idem.scope,
                idem.key,
                idem.fingerprint,
                json.dumps(answer),
                now,
                now - self.retention,
            )
        except LedgerError as e:
            log.warning("idempotency key store unavailable: %s", e)
            raise Unavailable("the idempotency key store is down; retry") from e
        first = claim.record
        if not claim.matches(idem.fingerprint):
            raise IdempotencyKeyReused(idem.key, idem.scope, first.created_at)
        stored: dict[str, Any] = json.loads(first.response)
        if first.completed_at is not None:
            return Accepted(stored, replayed=True)
        await self._produce(record)
        try:
            await asyncio.to_thread(
                self.ledger.complete_idempotency_key,
                idem.scope,
                idem.key,
                idem.fingerprint,
                datetime.now(UTC),
            )
        except LedgerError as e:  # written all the same: a retry writes it once more
            log.warning("could not mark an idempotency key as done: %s", e)
        return Accepted(stored)

    async def _produce(self, record: OutgoingRecord) -> None:
        try:
            await asyncio.to_thread(self.publisher.write_sync, record)
        except PublishError as e:
            log.warning("publish failed: %s", e)
            raise Unavailable("Kafka did not accept the record; retry") from e
        metrics.PUBLISHED.labels(record.topic).inc()

    async def ready(self) -> tuple[bool, str]:
        """Whether Kafka answers (the API's readiness): a metadata request, 2 s at most."""
        reachable = await asyncio.to_thread(self.publisher.reachable, 2.0)
        return (True, "Kafka answers") if reachable else (False, "no Kafka broker answers")

    def purge_expired_keys(self) -> int:
        """Delete expired idempotency keys; returns how many. Claims do not depend on it (a
        claim forgets an expired key itself): it only keeps the table small. Blocking."""
        return self.ledger.purge_idempotency_keys(datetime.now(UTC) - self.retention)

    def close(self, timeout: float = 10.0) -> None:
        """Wait for outstanding records, then close the ledger. Blocking."""
        self.publisher.close(timeout)
        self.ledger.close()
