"""The HTTP notification API other services call. It only writes to Kafka: no provider is
called in the request path, so a slow provider never slows a caller.

    POST /v1/events/{event_type}     a domain event (JSON fields of its schema)   -> 202
    POST /v1/notifications           a direct notification                        -> 202
    GET  /v1/notifications/{id}      its delivery state, from the sinks' ledger    -> 200 / 404
    GET  /healthz

With ``HERALD_API_TOKEN`` set, every /v1 request needs ``Authorization: Bearer <token>``.
Every error, whatever its cause (a bad body, an unknown route, a body over the limit), is an
RFC 9457 problem document (``application/problem+json``).

Idempotency-Key. A POST may carry a key (1 to 255 printable ASCII characters; a quoted
structured-field string is read without its quotes). The first request with a key is stored
in the ledger's database with its fingerprint (method, path and canonical JSON body), scoped by
method and path, for ``HERALD_API_IDEMPOTENCY_RETENTION_S`` (24 h):

- the same key with the same request answers 202 with the same ids. Once the first request
  was acknowledged by Kafka, nothing is written again (the answer carries
  ``Idempotent-Replayed: true``); while it is not (in flight, or Kafka refused it), the record
  is written again under the same ids, which the router and sinks absorb;
- the same key with a different request answers 422 and writes nothing: a second, different
  notification must not go out under the first one's ids.

The ids a key yields are uuid5 of the key and the fingerprint, so once a key has expired a
different request with it gets ids of its own rather than colliding with the first one's
(which the sinks would skip as already sent).

Every record is checked at its encoded size (Avro value, key and headers) against
``HERALD_MAX_RECORD_BYTES`` before anything is produced: 413 otherwise. Bodies are read up to
twice that limit, since JSON may be larger than the record it becomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

from aiohttp import web

from pipeline import headers as h
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
from pipeline.sink.ledger import Ledger, LedgerError, open_ledger
from pipeline.topics import Topics

__all__ = ["IDEMPOTENCY_KEY_REUSED", "create_api", "request_fingerprint"]

log = logging.getLogger(__name__)

_API_NS = uuid.UUID("0d6c1a52-3c1e-5b0f-8a4e-7b2f9c1d3e5a")  # fixed forever, like ids

# The problem type of a key reused with a different request (a tag URI: an identifier that
# needs no registration and is not meant to be fetched).
IDEMPOTENCY_KEY_REUSED = "tag:herald,2025:problems/idempotency-key-reused"

MAX_KEY_LENGTH = 255  # Stripe's limit; the IETF draft sets none
# JSON can be larger than the Avro record it becomes (field names, escapes, numbers as text):
# bodies are read up to this many times the record limit, and the record is what is checked.
BODY_LIMIT_FACTOR = 2
PURGE_INTERVAL_S = 600.0  # expired idempotency keys are deleted this often

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _problem(
    status: int,
    title: str,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """An RFC 9457 problem document."""
    body = {"type": type_, "title": title, "status": status, "detail": detail, **extra}
    return web.json_response(
        body, status=status, content_type="application/problem+json", headers=headers
    )


def request_fingerprint(method: str, path: str, body: Any) -> str:
    """What makes two requests "the same" for an Idempotency-Key: method, path and the body
    as canonical JSON (keys sorted, no insignificant whitespace, UTF-8), so spacing and key
    order do not matter and any other difference does."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{method}\n{path}\n{canonical}".encode()).hexdigest()
    return f"sha256:{digest}"


@dataclass(frozen=True)
class _Idempotency:
    """The Idempotency-Key of one request, with what it is scoped to and the request's
    fingerprint."""

    scope: str
    key: str
    fingerprint: str

    def ids_seed(self) -> str:
        return f"{self.key}\x1f{self.fingerprint}"


def _idempotency_key(request: web.Request) -> str | web.Response | None:
    """The request's key, None without one, or a 400 problem for a malformed one."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key.startswith('"') and key.endswith('"'):
        key = key[1:-1].replace('\\"', '"').replace("\\\\", "\\")  # an sf-string
    if not 0 < len(key) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        return _problem(
            400,
            "Bad Request",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return key


def _scope(request: web.Request) -> str:
    """What a key is scoped to: the method and path. With one API token there is one tenant;
    an API with several would put the caller's tenant id first."""
    return f"{request.method} {request.path}"


def _bearer(authorization: str) -> bytes | None:
    """The credentials of ``Bearer <token>`` (scheme case-insensitive, RFC 9110), or None for
    anything else, a bare token included."""
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return None
    try:
        return credentials.encode()
    except UnicodeEncodeError:  # lone surrogates: not our token, whatever they are
        return None


def _traceparent(request: web.Request) -> str:
    """The request's W3C traceparent header when valid, else a new trace."""
    return h.valid_traceparent(request.headers.get("traceparent")) or new_traceparent()


@functools.cache
def _channels() -> list[str]:
    """The installed connectors' channels (read once: packages do not change under a running
    process)."""
    from connectors.registry import installed_channels

    return installed_channels()


class NotificationApi:
    def __init__(self, settings: HeraldSettings, publisher: Publisher, ledger: Ledger) -> None:
        self.settings = settings
        self.publisher = publisher
        self.ledger = ledger
        self.topics = Topics(settings.topic_prefix)
        self.body_limit = settings.max_record_bytes * BODY_LIMIT_FACTOR
        self.retention = timedelta(seconds=settings.api_idempotency_retention_s)
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self._token = token.encode() if token else None

    # -- middlewares -------------------------------------------------------------------------

    @web.middleware
    async def problems(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Whatever aiohttp raises (404 and 405 from the router, 413 from a body over the
        limit) becomes a problem document; so does an unexpected failure, without details."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            extra = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            title = HTTPStatus(e.status).phrase
            return _problem(e.status, title, _http_detail(e, request), headers=extra)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _problem(500, "Internal Server Error", "the request failed; see the API log")

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None and request.path.startswith("/v1/"):
            given = _bearer(request.headers.get("Authorization", ""))
            if given is None or not hmac.compare_digest(given, self._token):
                return _problem(
                    401,
                    "Unauthorized",
                    "an Authorization: Bearer <token> header with a valid token is required",
                    headers={"WWW-Authenticate": 'Bearer realm="herald"'},
                )
        return await handler(request)

    # -- requests ----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        too_large = _problem(
            413,
            "Content Too Large",
            f"the body is over {self.body_limit} bytes (twice HERALD_MAX_RECORD_BYTES)",
        )
        if request.content_length is not None and request.content_length > self.body_limit:
            return too_large
        try:
            raw = await request.read()  # a chunked body is cut off at client_max_size
        except web.HTTPRequestEntityTooLarge:
            return too_large
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _problem(400, "Bad Request", "the body is not JSON")
        if not isinstance(body, dict):
            return _problem(400, "Bad Request", "the body must be a JSON object")
        return body

    def _idempotency(
        self, request: web.Request, body: dict[str, Any]
    ) -> _Idempotency | web.Response | None:
        key = _idempotency_key(request)
        if key is None or isinstance(key, web.Response):
            return key
        fingerprint = request_fingerprint(request.method, request.path, body)
        return _Idempotency(_scope(request), key, fingerprint)

    async def post_event(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        idem = self._idempotency(request, body)  # before the body is filled in below
        if isinstance(idem, web.Response):
            return idem
        event_type = request.match_info["event_type"]
        envelope = body.get("envelope") or {}
        if not isinstance(envelope, dict):
            return _problem(422, "Invalid Event", "envelope must be an object")
        envelope = dict(envelope)
        if idem is not None:  # the same request: the same event id, hence notification ids
            seed = f"event:{event_type}:{idem.ids_seed()}"
            envelope.setdefault("event_id", str(uuid.uuid5(_API_NS, seed)))
        envelope.setdefault("producer", request.headers.get("X-Producer", "http-api"))
        envelope.setdefault("traceparent", _traceparent(request))
        body["envelope"] = envelope
        try:
            event, record = self.publisher.prepare(event_type, body)
        except SchemaError as e:
            return _problem(404, "Unknown Event Type", str(e))
        except RecordValidationError as e:
            return _problem(422, "Invalid Event", str(e), fields=e.fields)
        except OversizedRecordError as e:
            return _too_large(e)
        answer = {"event_id": event.event_id, "topic": event.topic, "status": "accepted"}
        return await self._write(record, answer, idem)

    async def post_notification(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        idem = self._idempotency(request, body)
        if isinstance(idem, web.Response):
            return idem
        problems = [
            f"{f} is required" for f in ("channel", "recipient", "body_text") if not body.get(f)
        ]
        channel = str(body.get("channel", ""))
        channels = _channels()
        if channel and channel not in channels:
            problems.append(f"channel must be one of {', '.join(channels)}")
        data = body.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            problems.append("data must be an object of strings")
        if problems:
            return _problem(422, "Invalid Notification", "; ".join(problems))
        if idem is not None:
            event_id = str(uuid.uuid5(_API_NS, f"direct:{idem.ids_seed()}"))
        else:
            event_id = str(uuid.uuid4())
        recipient = str(body["recipient"])
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
            # The caller's trace continues through the notification (W3C Trace Context).
            traceparent=_traceparent(request),
        )
        try:
            value, ref = self.publisher.serde.encode(NOTIFICATION_INTENT, intent.to_avro())
        except RecordValidationError as e:
            return _problem(422, "Invalid Notification", str(e), fields=e.fields)
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
            return _too_large(e)
        answer = {"notification_id": intent.notification_id, "status": "accepted"}
        return await self._write(record, answer, idem)

    async def _write(
        self, record: OutgoingRecord, answer: dict[str, Any], idem: _Idempotency | None
    ) -> web.Response:
        """Produce ``record`` and answer 202 once Kafka acknowledged it, minding the
        request's Idempotency-Key: a key first used for another request is refused with
        nothing produced; a repeat of an acknowledged request is answered from the ledger."""
        if idem is None:
            return await self._produce(record, answer)
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
            return _problem(503, "Service Unavailable", "the idempotency key store is down; retry")
        first = claim.record
        if not claim.matches(idem.fingerprint):
            return _problem(
                422,
                "Idempotency-Key reused",
                f"this Idempotency-Key was used at {first.created_at.isoformat()} for a "
                f"different request to {idem.scope}; a retry must repeat that request exactly, "
                "a new request needs a new key",
                type_=IDEMPOTENCY_KEY_REUSED,
                idempotency_key=idem.key,
            )
        stored: dict[str, Any] = json.loads(first.response)
        if first.completed_at is not None:
            return web.json_response(stored, status=202, headers={"Idempotent-Replayed": "true"})
        response = await self._produce(record, stored)
        if response.status == 202:
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
        return response

    async def _produce(self, record: OutgoingRecord, answer: dict[str, Any]) -> web.Response:
        try:
            await asyncio.to_thread(self.publisher.write_sync, record)
        except PublishError as e:
            log.warning("publish failed: %s", e)
            return _problem(503, "Service Unavailable", "Kafka did not accept the record; retry")
        return web.json_response(answer, status=202)

    async def get_notification(self, request: web.Request) -> web.Response:
        nid = request.match_info["notification_id"]
        try:
            uuid.UUID(nid)
        except ValueError:
            return _problem(400, "Bad Request", "a notification id is a UUID")
        # Generation 0, the redrives of dead letters and what replay --force made.
        keys = [(nid, g) for g in range(16)]
        try:
            entries = await asyncio.to_thread(self.ledger.lookup, keys)
        except LedgerError as e:
            log.warning("ledger lookup failed: %s", e)
            return _problem(503, "Service Unavailable", "the delivery ledger is down; retry")
        found = [entries[k] for k in keys if k in entries]
        if not found:
            return _problem(404, "Not Found", "no delivery recorded yet (it may still be queued)")
        return web.json_response(
            {
                "notification_id": nid,
                "deliveries": [
                    {
                        "generation": e.generation,
                        "channel": e.channel,
                        "recipient": e.recipient,
                        "state": e.state.value,
                        "attempts": e.attempts,
                        "provider_response": e.response,
                        "error_class": e.error_class,
                        "first_attempt_at": e.first_attempt_at.isoformat(),
                        "updated_at": e.updated_at.isoformat(),
                    }
                    for e in found
                ],
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def purge_expired_keys(self) -> None:
        """Delete expired idempotency keys now and every PURGE_INTERVAL_S. Claims do not
        depend on it (a claim forgets an expired key itself): it only keeps the table small."""
        while True:
            try:
                cutoff = datetime.now(UTC) - self.retention
                n = await asyncio.to_thread(self.ledger.purge_idempotency_keys, cutoff)
                log.debug("purged %d expired idempotency keys", n)
            except LedgerError as e:
                log.warning("could not purge expired idempotency keys: %s", e)
            await asyncio.sleep(PURGE_INTERVAL_S)


def _too_large(e: OversizedRecordError) -> web.Response:
    return _problem(413, "Content Too Large", str(e), size=e.size, limit=e.limit)


def _http_detail(e: web.HTTPException, request: web.Request) -> str:
    if isinstance(e, web.HTTPNotFound):
        return f"no route for {request.path}"
    if isinstance(e, web.HTTPMethodNotAllowed):
        return f"{request.method} is not allowed on {request.path}"
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return "the body is over the size limit"
    return HTTPStatus(e.status).description


def create_api(settings: HeraldSettings, ledger: Ledger | None = None) -> web.Application:
    """The aiohttp application. ``ledger`` defaults to the one ``HERALD_LEDGER_URL`` names;
    it is closed when the application is cleaned up."""
    if ledger is None:
        ledger = open_ledger(settings.ledger_url.get_secret_value())
    api = NotificationApi(settings, Publisher(settings, producer_name="http-api"), ledger)
    app = web.Application(middlewares=[api.problems, api.auth], client_max_size=api.body_limit)
    app.router.add_post("/v1/events/{event_type}", api.post_event)
    app.router.add_post("/v1/notifications", api.post_notification)
    app.router.add_get("/v1/notifications/{notification_id}", api.get_notification)
    app.router.add_get("/healthz", api.healthz)

    async def purge(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(api.purge_expired_keys())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(api.publisher.close, 10)
        api.ledger.close()

    app.cleanup_ctx.append(purge)
    app.on_cleanup.append(close)
    return app
