"""The gRPC API (proto/herald/v1/notifications.proto): PublishEvent, SendNotification and
GetNotification are the HTTP API's operations, run by the same service (pipeline/service.py):
the same validation, Idempotency-Key store, record limit and ledger. Served by
``herald run api`` on HERALD_GRPC_HOST:HERALD_GRPC_PORT (127.0.0.1:50051; 0 turns it off) in
the HTTP API's event loop, in plaintext like the HTTP API: terminate TLS in front of it.

Metadata: ``authorization: Bearer <token>`` (when HERALD_API_TOKEN is set),
``idempotency-key`` (PublishEvent, SendNotification), ``traceparent``. A retry answered from
the ledger carries the trailing metadata ``idempotent-replayed: true``.

A refusal is a status code with details that say what is wrong, and trailing metadata with
what an HTTP problem document would carry besides (``herald-problem-type``,
``herald-fields``, ``herald-idempotency-key``, ``herald-size``, ``herald-limit``):

    a field missing or wrong, an unknown event type,   INVALID_ARGUMENT  (details name it)
      a malformed idempotency key or notification id
    a record over HERALD_MAX_RECORD_BYTES              RESOURCE_EXHAUSTED (as gRPC itself
                                                       answers a message over its limit,
                                                       twice HERALD_MAX_RECORD_BYTES)
    an idempotency key used for another request        ALREADY_EXISTS (nothing written)
    no delivery recorded                               NOT_FOUND
    Kafka or the ledger did not answer                 UNAVAILABLE (retry as it is)
    no token, a wrong one, or not "Bearer"             UNAUTHENTICATED
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Never, TypeVar

try:
    import grpc
    from google.protobuf import json_format
    from grpc import aio
except ImportError as e:
    raise ImportError(
        "the gRPC API needs grpcio and protobuf: pip install 'herald[grpc]' "
        "(or set HERALD_GRPC_PORT=0 to serve HTTP only)"
    ) from e

from pipeline import metrics
from pipeline.proto.herald.v1 import notifications_pb2 as pb
from pipeline.proto.herald.v1 import notifications_pb2_grpc as pb_grpc
from pipeline.records import DeliveryState
from pipeline.service import (
    BadRequest,
    BodyTooLarge,
    Idempotency,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    NotificationService,
    RecordTooLarge,
    ServiceError,
    Unavailable,
    UnknownEventType,
    authorized,
    parse_idempotency_key,
)
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import LedgerEntry

__all__ = ["SERVICE", "NotificationServicer", "start_grpc_server"]

log = logging.getLogger(__name__)

SERVICE = "herald.v1.NotificationService"

# The status of each refusal (the first class in an error's MRO that is listed).
STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownEventType: grpc.StatusCode.INVALID_ARGUMENT,
    RecordTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BodyTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

STATES = {
    DeliveryState.SENT: pb.DELIVERY_STATE_SENT,
    DeliveryState.RETRYING: pb.DELIVERY_STATE_RETRYING,
    DeliveryState.REJECTED: pb.DELIVERY_STATE_REJECTED,
    DeliveryState.DEAD: pb.DELIVERY_STATE_DEAD,
}

Context = aio.ServicerContext[Any, Any]


def _metadata(context: Context) -> dict[str, str]:
    """The request's text metadata (names are lower case on the wire)."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


async def _refuse(context: Context, e: ServiceError) -> Never:
    """End the call with the status of ``e``."""
    code = next(STATUS[c] for c in type(e).__mro__ if c in STATUS)
    details = f"event_type: {e.detail}" if isinstance(e, UnknownEventType) else e.detail
    trailing = []
    if e.problem_type != "about:blank":
        trailing.append(("herald-problem-type", e.problem_type))
    for name, value in e.extra().items():
        text = ",".join(value) if isinstance(value, list) else str(value)
        trailing.append((f"herald-{name.replace('_', '-')}", text))
    await context.abort(code, details, trailing_metadata=tuple(trailing))


R = TypeVar("R")
Rpc = Callable[[Any, Any, Context], Awaitable[R]]


def _measured(rpc: Rpc[R]) -> Rpc[R]:
    """Count the call in herald_grpc_requests{method, status}."""

    @functools.wraps(rpc)
    async def measured(self: Any, request: Any, context: Context) -> R:
        status = "UNKNOWN"
        try:
            response = await rpc(self, request, context)
            status = "OK"
            return response
        except BaseException:
            code = context.code()  # set by abort()
            if isinstance(code, grpc.StatusCode):
                status = code.name
            raise
        finally:
            metrics.GRPC_REQUESTS.labels(rpc.__name__, status).inc()

    return measured


def _integral(value: Any) -> Any:
    """A Struct's value with its integral numbers as ints (a Struct has only doubles; Avro
    int and long fields refuse 7.0, double fields take 7)."""
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _event_data(request: pb.PublishEventRequest) -> dict[str, Any]:
    which = request.WhichOneof("data")
    if which == "fields":
        data: Any = _integral(json_format.MessageToDict(request.fields))
    elif which == "json":
        try:
            data = json.loads(request.json)
        except json.JSONDecodeError as e:
            raise InvalidRequest("Invalid Event", f"json is not JSON: {e}", ["json"]) from None
        if not isinstance(data, dict):
            raise InvalidRequest("Invalid Event", "json must be a JSON object", ["json"])
    else:
        data = {}
    return dict(data)


def _direct(request: pb.SendNotificationRequest) -> dict[str, Any]:
    """The request as the body of POST /v1/notifications."""
    body: dict[str, Any] = {
        "channel": request.channel,
        "recipient": request.recipient,
        "body_text": request.body_text,
        "data": dict(request.data),
    }
    for name in ("subject", "body_html", "user_id"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    return body


def _delivery(e: LedgerEntry) -> pb.Delivery:
    delivery = pb.Delivery(
        generation=e.generation,
        channel=e.channel,
        recipient=e.recipient,
        state=STATES.get(e.state, pb.DELIVERY_STATE_UNSPECIFIED),
        attempts=e.attempts,
    )
    if e.response is not None:
        delivery.provider_response = e.response
    if e.error_class is not None:
        delivery.error_class = e.error_class
    delivery.first_attempt_at.FromDatetime(e.first_attempt_at)
    delivery.updated_at.FromDatetime(e.updated_at)
    return delivery


class NotificationServicer(pb_grpc.NotificationServiceServicer):
    """herald.v1.NotificationService over the notification service."""

    def __init__(self, service: NotificationService) -> None:
        self.service = service

    async def _begin(self, context: Context) -> dict[str, str]:
        """The call's metadata, once the caller is authorized; else UNAUTHENTICATED."""
        metadata = _metadata(context)
        if not authorized(metadata.get("authorization"), self.service.token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "authorization metadata with a valid token is required: Bearer <token>",
            )
        return metadata

    @staticmethod
    def _idempotency(metadata: dict[str, str], rpc: str, request: Any) -> Idempotency | None:
        """The call's idempotency-key, scoped by the RPC, with a fingerprint of the request
        (as canonical JSON)."""
        raw = metadata.get("idempotency-key")
        if raw is None:
            return None
        return Idempotency.of(parse_idempotency_key(raw), "gRPC", f"/{SERVICE}/{rpc}", request)

    @_measured
    async def PublishEvent(
        self, request: pb.PublishEventRequest, context: Context
    ) -> pb.PublishEventResponse:
        metadata = await self._begin(context)
        try:
            data = _event_data(request)
            producer = request.producer or "grpc-api"
            # The fingerprint is of the data, not of its form: a Struct and the same JSON
            # text are one request.
            fingerprinted = {"event_type": request.event_type, "data": data, "producer": producer}
            idem = self._idempotency(metadata, "PublishEvent", fingerprinted)
            if not request.event_type:
                raise InvalidRequest("Invalid Event", "event_type is required", ["event_type"])
            accepted = await self.service.publish_event(
                request.event_type,
                data,
                idem=idem,
                traceparent=metadata.get("traceparent"),
                producer=producer,
            )
        except ServiceError as e:
            await _refuse(context, e)
        if accepted.replayed:
            context.set_trailing_metadata((("idempotent-replayed", "true"),))
        return pb.PublishEventResponse(**accepted.answer)

    @_measured
    async def SendNotification(
        self, request: pb.SendNotificationRequest, context: Context
    ) -> pb.SendNotificationResponse:
        metadata = await self._begin(context)
        try:
            body = _direct(request)
            idem = self._idempotency(metadata, "SendNotification", body)
            accepted = await self.service.send_notification(
                body, idem=idem, traceparent=metadata.get("traceparent")
            )
        except ServiceError as e:
            await _refuse(context, e)
        if accepted.replayed:
            context.set_trailing_metadata((("idempotent-replayed", "true"),))
        return pb.SendNotificationResponse(**accepted.answer)

    @_measured
    async def GetNotification(
        self, request: pb.GetNotificationRequest, context: Context
    ) -> pb.GetNotificationResponse:
        await self._begin(context)
        try:
            found = await self.service.deliveries(request.notification_id)
        except ServiceError as e:
            await _refuse(context, e)
        return pb.GetNotificationResponse(
            notification_id=request.notification_id,
            deliveries=[_delivery(e) for e in found],
        )


async def start_grpc_server(service: NotificationService, settings: HeraldSettings) -> aio.Server:
    """Start serving on HERALD_GRPC_HOST:HERALD_GRPC_PORT in the running event loop; the
    caller stops it (``await server.stop(grace)``). Raises RuntimeError when the address
    cannot be bound."""
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", service.request_limit),
            # gRPC binds with SO_REUSEPORT by default, so a second server on the port would
            # share it silently instead of failing.
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_NotificationServiceServicer_to_server(NotificationServicer(service), server)
    host = f"[{settings.grpc_host}]" if ":" in settings.grpc_host else settings.grpc_host
    address = f"{host}:{settings.grpc_port}"
    server.add_insecure_port(address)
    await server.start()
    log.info("gRPC API (%s) on %s", SERVICE, address)
    return server
