"""The HTTP notification API other services call. It only writes to Kafka: no provider is
called in the request path, so a slow provider never slows a caller.

    POST /v1/events/{event_type}     a domain event (JSON fields of its schema)   -> 202
    POST /v1/notifications           a direct notification                        -> 202
    GET  /v1/notifications/{id}      its delivery state, from the sinks' ledger    -> 200 / 404
    POST /api/notification           the seed service's request (pipeline/seed.py) -> 202
    PUT|GET|DELETE /v1/subscribers/{id}           a subscriber record (people.subscribers)
    POST /v1/subscribers/{id}/devices             register a push address
    GET|PUT /v1/subscribers/{id}/preferences      choices per category and channel
    GET|POST /u/{token}              one-click unsubscribe (RFC 8058), no bearer token
    GET  /healthz                    alive                                         -> 200
    GET  /readyz                     Kafka answers                                 -> 200 / 503
    GET  /metrics                    Prometheus metrics (requests by route and status, ...)

The operations, their validation and the Idempotency-Key store are pipeline/service.py's,
shared with the gRPC API (pipeline/grpc_api.py, served alongside when ``grpc=True``); this
module is HTTP: bodies, headers, statuses and problem documents.

With ``HERALD_API_TOKEN`` set, every /v1 and /api request needs
``Authorization: Bearer <token>``. Every error, whatever its cause (a bad body, an unknown
route, a body over the limit), is an RFC 9457 problem document (``application/problem+json``).

Idempotency-Key. A POST may carry a key (1 to 255 printable ASCII characters; a quoted
structured-field string is read without its quotes), scoped by method and path and compared
by a fingerprint of method, path and canonical JSON body: the same request again answers 202
with the same ids (``Idempotent-Replayed: true`` once the first was written), a different
request with the key answers 422 and writes nothing. See pipeline/service.py.

Every record is checked at its encoded size (Avro value, key and headers) against
``HERALD_MAX_RECORD_BYTES`` before anything is produced: 413 otherwise. Bodies are read up to
twice that limit, since JSON may be larger than the record it becomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from html import escape
from http import HTTPStatus
from typing import Any

from aiohttp import web

from pipeline import metrics, observe
from pipeline.people.policy import PreferencePolicy
from pipeline.people.records import Subscriber
from pipeline.people.service import PeopleService
from pipeline.people.store import PeopleStore
from pipeline.people.unsubscribe import ExpiredToken, TokenError
from pipeline.publisher import Publisher
from pipeline.router.rules import load_rules
from pipeline.router.templates import Templates
from pipeline.seed import to_direct
from pipeline.service import (
    IDEMPOTENCY_KEY_REUSED,
    Accepted,
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
    installed_channels,
    parse_idempotency_key,
    request_fingerprint,
)
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import Ledger, LedgerError, open_ledger

__all__ = ["IDEMPOTENCY_KEY_REUSED", "create_api", "request_fingerprint"]

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 600.0  # expired idempotency keys are deleted this often
PROTECTED = ("/v1/", "/api/")  # the paths HERALD_API_TOKEN guards (probes are open)
# Methods counted by name; any other is "other" (a client chooses the method: unbounded).
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The HTTP status of each refusal (the first class in an error's MRO that is listed).
STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    InvalidRequest: 422,
    UnknownEventType: 404,
    NotFound: 404,
    RecordTooLarge: 413,
    BodyTooLarge: 413,
    IdempotencyKeyReused: 422,
    Unavailable: 503,
}


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


def _refusal(e: ServiceError) -> web.Response:
    """The problem document of a refused request."""
    status = next(STATUS[c] for c in type(e).__mro__ if c in STATUS)
    return _problem(status, e.title, e.detail, type_=e.problem_type, **e.extra())


def _accepted(accepted: Accepted) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if accepted.replayed else None
    return web.json_response(accepted.answer, status=202, headers=headers)


# Problem types of the unsubscribe endpoint.
INVALID_LINK = "tag:herald,2025:problems/invalid-unsubscribe-link"
EXPIRED_LINK = "tag:herald,2025:problems/expired-unsubscribe-link"


def _page(status: int, title: str, body: str) -> web.Response:
    """A small HTML page (the unsubscribe endpoint is for people)."""
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title></head>\n<body><h1>{escape(title)}</h1>\n{body}\n"
        "</body></html>\n"
    )
    return web.Response(
        status=status,
        text=html,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


class NotificationApi:
    def __init__(
        self,
        service: NotificationService,
        templates: Templates,
        people: PeopleService | None = None,
    ) -> None:
        self.service = service
        self.templates = templates
        self.people = people

    # -- middlewares -------------------------------------------------------------------------

    @web.middleware
    async def measure(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Requests by method, route pattern (never the path: it may hold ids) and status,
        their duration and how many are in flight."""
        started = time.perf_counter()
        metrics.API_IN_FLIGHT.inc()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            metrics.API_IN_FLIGHT.dec()
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            method = request.method if request.method in _METHODS else "other"
            metrics.API_REQUESTS.labels(method, route, str(status)).inc()
            metrics.API_REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)

    @web.middleware
    async def problems(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A refused request, and whatever aiohttp raises (404 and 405 from the router, 413
        from a body over the limit), becomes a problem document; so does an unexpected
        failure, without details."""
        try:
            return await handler(request)
        except ServiceError as e:
            return _refusal(e)
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
        if request.path.startswith(PROTECTED) and not authorized(
            request.headers.get("Authorization"), self.service.token
        ):
            return _problem(
                401,
                "Unauthorized",
                "an Authorization: Bearer <token> header with a valid token is required",
                headers={"WWW-Authenticate": 'Bearer realm="herald"'},
            )
        return await handler(request)

    # -- requests ----------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        limit = self.service.request_limit
        too_large = BodyTooLarge(
            "Content Too Large", f"the body is over {limit} bytes (twice HERALD_MAX_RECORD_BYTES)"
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            raw = await request.read()  # a chunked body is cut off at client_max_size
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("Bad Request", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("Bad Request", "the body must be a JSON object")
        return body

    def _idempotency(self, request: web.Request, body: dict[str, Any]) -> Idempotency | None:
        """The request's Idempotency-Key, scoped by method and path. With one API token there
        is one tenant; an API with several would put the caller's tenant id first."""
        raw = request.headers.get("Idempotency-Key")
        if raw is None:
            return None
        return Idempotency.of(parse_idempotency_key(raw), request.method, request.path, body)

    async def post_event(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        idem = self._idempotency(request, body)
        accepted = await self.service.publish_event(
            request.match_info["event_type"],
            body,
            idem=idem,
            traceparent=request.headers.get("traceparent"),
            producer=request.headers.get("X-Producer", "http-api"),
        )
        return _accepted(accepted)

    async def post_notification(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        idem = self._idempotency(request, body)
        accepted = await self.service.send_notification(
            body, idem=idem, traceparent=request.headers.get("traceparent")
        )
        return _accepted(accepted)

    async def post_seed_notification(self, request: web.Request) -> web.Response:
        """The seed service's ``{"receiver": ..., "content": ...}``, as a direct
        notification. The key's fingerprint is of the body as the caller sent it."""
        body = await self._body(request)
        idem = self._idempotency(request, body)
        direct = to_direct(body, installed_channels(), self.templates)
        accepted = await self.service.send_notification(
            direct,
            idem=idem,
            traceparent=request.headers.get("traceparent"),
            answer_extra={"channel": direct["channel"]},
        )
        return _accepted(accepted)

    async def get_trace(self, request: web.Request) -> web.Response:
        """What `herald trace ID` prints, as JSON: every record about an event or a
        notification across the topics and the ledger, in time order (``?since=2h`` reads
        less). It reads the topics, so it takes as long as they are long."""
        from pipeline.replay import ReplayError, parse_duration
        from pipeline.trace import trace

        ident = request.match_info["id"]
        since = None
        if request.query.get("since"):
            try:
                since = datetime.now(UTC) - parse_duration(request.query["since"])
            except ReplayError as e:
                raise BadRequest("Bad Request", str(e)) from None
        service = self.service
        entries = await asyncio.to_thread(
            trace,
            service.settings,
            service.publisher.serde,
            service.ledger,
            ident,
            installed_channels(),
            since,
        )
        if not entries:
            raise NotFound("Not Found", f"nothing about {ident!r} in Herald's topics or ledger")
        return web.json_response({"id": ident, "records": [e.to_json() for e in entries]})

    async def get_notification(self, request: web.Request) -> web.Response:
        nid = request.match_info["notification_id"]
        found = await self.service.deliveries(nid)
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

    # -- people ------------------------------------------------------------------------------

    def _people(self) -> PeopleService:
        if self.people is None:  # pragma: no cover - create_api always builds one
            raise NotFound("Not Found", "people are not served here")
        return self.people

    async def put_subscriber(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        uid = request.match_info["user_id"]
        sub = await asyncio.to_thread(self._people().put_subscriber, uid, body, "api")
        return web.json_response(sub.to_json())

    async def get_subscriber(self, request: web.Request) -> web.Response:
        uid = request.match_info["user_id"]
        sub: Subscriber = await asyncio.to_thread(self._people().get_subscriber, uid)
        return web.json_response(sub.to_json())

    async def delete_subscriber(self, request: web.Request) -> web.Response:
        uid = request.match_info["user_id"]
        await asyncio.to_thread(self._people().delete_subscriber, uid)
        return web.Response(status=204)

    async def post_device(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        uid = request.match_info["user_id"]
        sub = await asyncio.to_thread(self._people().add_device, uid, body, "api")
        return web.json_response(sub.to_json(), status=201)

    async def get_preferences(self, request: web.Request) -> web.Response:
        people = self._people()
        prefs = await asyncio.to_thread(people.get_preferences, request.match_info["user_id"])
        return web.json_response(people.describe_preferences(prefs))

    async def put_preferences(self, request: web.Request) -> web.Response:
        people = self._people()
        body = await self._body(request)
        uid = request.match_info["user_id"]
        prefs = await asyncio.to_thread(people.put_preferences, uid, body, "api")
        return web.json_response(people.describe_preferences(prefs))

    def _token_refused(self, request: web.Request, e: TokenError) -> web.Response:
        """A forged or expired link: nothing changes. HTML for a browser, else a problem."""
        expired = isinstance(e, ExpiredToken)
        status = 410 if expired else 400
        if "text/html" in request.headers.get("Accept", ""):
            text = (
                "This unsubscribe link has expired. The link in a more recent message works."
                if expired
                else "This is not a valid unsubscribe link."
            )
            return _page(status, "Unsubscribe", f"<p>{escape(text)}</p>")
        return _problem(
            status,
            "Expired Unsubscribe Link" if expired else "Invalid Unsubscribe Link",
            str(e),
            type_=EXPIRED_LINK if expired else INVALID_LINK,
        )

    async def unsubscribe_page(self, request: web.Request) -> web.Response:
        """A confirmation page with a form; visiting it (or a link scanner fetching it)
        changes nothing."""
        try:
            found = self._people().check_token(request.match_info["token"])
        except TokenError as e:
            return self._token_refused(request, e)
        what = f"<strong>{escape(found.category)}</strong> messages by {escape(found.channel)}"
        return _page(
            200,
            "Unsubscribe",
            f"<p>Stop receiving {what}?</p>\n"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" '
            'value="One-Click"><button type="submit">Unsubscribe</button></form>',
        )

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """RFC 8058 one-click: a POST with ``List-Unsubscribe=One-Click`` in its form body
        (urlencoded or multipart), from a mail client or from the confirmation page."""
        people = self._people()
        token = request.match_info["token"]
        try:
            people.check_token(token)
        except TokenError as e:
            return self._token_refused(request, e)
        form = await request.post()
        if form.get("List-Unsubscribe") != "One-Click":
            raise BadRequest(
                "Bad Request", "a one-click unsubscribe POST carries List-Unsubscribe=One-Click"
            )
        try:
            found = await asyncio.to_thread(people.unsubscribe, token)
        except TokenError as e:  # expired between the two checks
            return self._token_refused(request, e)
        what = f"<strong>{escape(found.category)}</strong> messages by {escape(found.channel)}"
        return _page(200, "Unsubscribed", f"<p>You will not receive {what} any more.</p>")

    async def purge_expired_keys(self) -> None:
        """Delete expired idempotency keys now and every PURGE_INTERVAL_S."""
        while True:
            try:
                n = await asyncio.to_thread(self.service.purge_expired_keys)
                log.debug("purged %d expired idempotency keys", n)
            except LedgerError as e:
                log.warning("could not purge expired idempotency keys: %s", e)
            await asyncio.sleep(PURGE_INTERVAL_S)


def _http_detail(e: web.HTTPException, request: web.Request) -> str:
    if isinstance(e, web.HTTPNotFound):
        return f"no route for {request.path}"
    if isinstance(e, web.HTTPMethodNotAllowed):
        return f"{request.method} is not allowed on {request.path}"
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return "the body is over the size limit"
    return HTTPStatus(e.status).description


def create_api(
    settings: HeraldSettings, ledger: Ledger | None = None, *, grpc: bool = False
) -> web.Application:
    """The aiohttp application. ``ledger`` defaults to the one ``HERALD_LEDGER_URL`` names;
    it is closed when the application is cleaned up. With ``grpc``, the gRPC API is served
    too, on HERALD_GRPC_HOST:HERALD_GRPC_PORT in the same event loop, by the same service
    (one producer, one ledger), started and stopped with the application."""
    if ledger is None:
        ledger = open_ledger(settings.ledger_url.get_secret_value())
    publisher = Publisher(settings, producer_name="http-api")
    service = NotificationService(settings, publisher, ledger)
    people = PeopleService(
        settings,
        PeopleStore(settings, publisher.serde),
        PreferencePolicy.load(settings.preferences_file),
        installed_channels(),
        load_rules(settings.rules_file),
    )
    api = NotificationApi(service, Templates(settings.templates_dir), people)
    app = web.Application(
        middlewares=[api.measure, api.problems, api.auth], client_max_size=service.request_limit
    )
    app.router.add_post("/v1/events/{event_type}", api.post_event)
    app.router.add_post("/v1/notifications", api.post_notification)
    app.router.add_get("/v1/notifications/{notification_id}", api.get_notification)
    app.router.add_get("/v1/trace/{id}", api.get_trace)
    app.router.add_post("/api/notification", api.post_seed_notification)
    subscriber = "/v1/subscribers/{user_id}"
    app.router.add_put(subscriber, api.put_subscriber)
    app.router.add_get(subscriber, api.get_subscriber)
    app.router.add_delete(subscriber, api.delete_subscriber)
    app.router.add_post(f"{subscriber}/devices", api.post_device)
    app.router.add_get(f"{subscriber}/preferences", api.get_preferences)
    app.router.add_put(f"{subscriber}/preferences", api.put_preferences)
    app.router.add_get("/u/{token}", api.unsubscribe_page)
    app.router.add_post("/u/{token}", api.unsubscribe)
    readiness = observe.Readiness()
    readiness.register("api", service.ready)
    observe.add_routes(app, readiness)  # /metrics, /healthz, /readyz

    async def purge(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(api.purge_expired_keys())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def serve_grpc(app: web.Application) -> AsyncIterator[None]:
        from pipeline.grpc_api import start_grpc_server

        server = await start_grpc_server(service, settings)
        yield
        await server.stop(grace=5.0)

    async def close(app: web.Application) -> None:
        await asyncio.to_thread(people.store.close)
        await asyncio.to_thread(service.close, 10)

    app.cleanup_ctx.append(purge)
    if grpc:
        app.cleanup_ctx.append(serve_grpc)
    app.on_cleanup.append(close)
    return app
