"""The HTTP notification API other services call. It only writes to Kafka: no provider is
called in the request path, so a slow provider never slows a caller.

    POST /v1/events/{event_type}     a domain event (JSON fields of its schema)   -> 202
    POST /v1/notifications           a direct notification                        -> 202
    GET  /v1/notifications/{id}      its delivery state, from the sinks' ledger    -> 200 / 404
    GET  /healthz

Requests may carry ``Idempotency-Key``: the same key (and body) always yields the same ids,
so a caller that retries a POST does not notify anyone twice. With ``HERALD_API_TOKEN`` set,
every /v1 request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from pipeline import headers as h
from pipeline.publisher import CONTENT_TYPE, Publisher, PublishError
from pipeline.records import NOTIFICATION_INTENT, NotificationIntent, notification_id
from pipeline.schemas import SchemaError
from pipeline.serialization import RecordValidationError
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import Ledger, open_ledger
from pipeline.topics import Topics

__all__ = ["create_api"]

log = logging.getLogger(__name__)

_API_NS = uuid.UUID("0d6c1a52-3c1e-5b0f-8a4e-7b2f9c1d3e5a")  # fixed forever, like ids


def _problem(status: int, title: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem document."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return web.json_response(body, status=status, content_type="application/problem+json")


@functools.cache
def _channels() -> list[str]:
    """The installed connectors' channels (read once: packages do not change under a running
    process)."""
    from connectors.registry import installed_channels

    return installed_channels()


class NotificationApi:
    def __init__(
        self, settings: HeraldSettings, publisher: Publisher, ledger: Ledger | None
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.ledger = ledger
        self.topics = Topics(settings.topic_prefix)
        token = settings.api_token.get_secret_value() if settings.api_token else None
        self._token = token.encode() if token else None

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._token is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, self._token):
                return _problem(401, "Unauthorized", "a valid bearer token is required")
        response: web.StreamResponse = await handler(request)
        return response

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if request.content_length and request.content_length > self.settings.max_record_bytes:
            return _problem(413, "Payload Too Large", "the body is over HERALD_MAX_RECORD_BYTES")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _problem(400, "Bad Request", "the body is not JSON")
        if not isinstance(body, dict):
            return _problem(400, "Bad Request", "the body must be a JSON object")
        return body

    async def post_event(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        key = request.headers.get("Idempotency-Key")
        event_type = request.match_info["event_type"]
        envelope = dict(body.get("envelope") or {})
        if key:  # the same key: the same event id, hence the same notification ids
            envelope.setdefault("event_id", str(uuid.uuid5(_API_NS, f"event:{event_type}:{key}")))
        envelope.setdefault("producer", request.headers.get("X-Producer", "http-api"))
        body["envelope"] = envelope
        try:
            event = await asyncio.to_thread(self.publisher.publish_sync, event_type, body)
        except SchemaError as e:
            return _problem(404, "Unknown Event Type", str(e))
        except RecordValidationError as e:
            return _problem(422, "Invalid Event", str(e), fields=e.fields)
        except PublishError as e:
            log.warning("publish failed: %s", e)
            return _problem(503, "Unavailable", "Kafka did not accept the event; retry")
        return web.json_response(
            {"event_id": event.event_id, "topic": event.topic, "status": "accepted"}, status=202
        )

    async def post_notification(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
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
        key = request.headers.get("Idempotency-Key") or str(uuid.uuid4())
        event_id = str(uuid.uuid5(_API_NS, f"direct:{key}"))
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
        )
        try:
            value, ref = self.publisher.serde.encode(NOTIFICATION_INTENT, intent.to_avro())
        except RecordValidationError as e:
            return _problem(422, "Invalid Notification", str(e), fields=e.fields)
        hdrs: h.Headers = [
            (h.EVENT_TYPE, b"direct"),
            (h.EVENT_ID, event_id.encode()),
            (h.NOTIFICATION_ID, intent.notification_id.encode()),
            (h.CONTENT_TYPE, CONTENT_TYPE.encode()),
            (h.SCHEMA, ref.encode()),
        ]
        topic = self.topics.notifications(channel)
        try:
            await asyncio.to_thread(self._produce_sync, topic, recipient, value, hdrs)
        except PublishError as e:
            log.warning("publish failed: %s", e)
            return _problem(503, "Unavailable", "Kafka did not accept the notification; retry")
        return web.json_response(
            {"notification_id": intent.notification_id, "status": "accepted"}, status=202
        )

    def _produce_sync(self, topic: str, key: str, value: bytes, hdrs: h.Headers) -> None:
        result: list[Any] = []
        producer = self.publisher._producer
        producer.produce(
            topic, value, key.encode(), headers=hdrs, on_delivery=lambda e, m: result.append(e)
        )
        producer.flush(30)
        if not result or result[0] is not None:
            raise PublishError(f"{topic}: {result[0] if result else 'no acknowledgement'}")

    async def get_notification(self, request: web.Request) -> web.Response:
        nid = request.match_info["notification_id"]
        try:
            uuid.UUID(nid)
        except ValueError:
            return _problem(400, "Bad Request", "a notification id is a UUID")
        if self.ledger is None:
            return _problem(503, "Unavailable", "no delivery ledger is configured")
        ledger = self.ledger
        # Generation 0 and the redeliveries a replay --force may have made.
        keys = [(nid, g) for g in range(16)]
        entries = await asyncio.to_thread(ledger.lookup, keys)
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


def create_api(settings: HeraldSettings, ledger: Ledger | None = None) -> web.Application:
    if ledger is None:
        ledger = open_ledger(settings.ledger_url.get_secret_value())
    api = NotificationApi(settings, Publisher(settings, producer_name="http-api"), ledger)
    app = web.Application(middlewares=[api.auth], client_max_size=settings.max_record_bytes)
    app.router.add_post("/v1/events/{event_type}", api.post_event)
    app.router.add_post("/v1/notifications", api.post_notification)
    app.router.add_get("/v1/notifications/{notification_id}", api.get_notification)
    app.router.add_get("/healthz", api.healthz)

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(api.publisher.flush, 10)
        if api.ledger is not None:
            api.ledger.close()

    app.on_cleanup.append(close)
    return app
