"""The probe and metrics endpoints of the router and the sinks, for Prometheus and Kubernetes.

    GET /metrics   Prometheus text format: every metric of pipeline/metrics.py
    GET /healthz   200 while the process's event loop answers (liveness)
    GET /readyz    200 when every registered component is ready, else 503 (readiness)

Served on ``HERALD_OBSERVE_HOST:HERALD_OBSERVE_PORT`` (127.0.0.1:9464; port 0 turns it off)
by ``herald run router``, ``herald run sink`` and ``herald run all`` (one server for the whole
process). The HTTP API serves the same three paths on its own port.

Readiness is computed when asked, from a callback each component registers with
:func:`register_readiness`: a sink is ready when it has its group assignment, a broker
answers and its circuit breaker is not open; a router loop registers its own. Each callback
returns ``(ready, detail)``; ``/readyz`` answers JSON with every component's state. With no
component registered the process is not ready.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

__all__ = [
    "Check",
    "ObserveServer",
    "Readiness",
    "add_routes",
    "create_app",
    "register_readiness",
    "serve",
    "unregister_readiness",
]

log = logging.getLogger(__name__)

Result = tuple[bool, str]
Check = Callable[[], Result | Awaitable[Result]]


class Readiness:
    """Named readiness checks; ready when there is at least one and all pass."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def register(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def unregister(self, name: str) -> None:
        self._checks.pop(name, None)

    async def evaluate(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        states: dict[str, dict[str, Any]] = {}
        for name, check in list(self._checks.items()):
            try:
                result = check()
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, 5)
                ok, detail = result
            except Exception as e:  # a check that fails says "not ready", never 500
                ok, detail = False, f"check failed: {type(e).__name__}: {e}"
            states[name] = {"ready": bool(ok), "detail": detail}
        ready = bool(states) and all(s["ready"] for s in states.values())
        return ready, states


# The process's components (router loop, sink workers) register here.
READINESS = Readiness()


def register_readiness(name: str, check: Check) -> None:
    """Make ``check`` part of this process's ``/readyz``: a callable (sync or async)
    returning ``(ready, detail)``, called on each probe, so it must be cheap."""
    READINESS.register(name, check)


def unregister_readiness(name: str) -> None:
    READINESS.unregister(name)


def add_routes(
    app: web.Application,
    readiness: Readiness | None = None,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Add /metrics, /healthz and /readyz to ``app`` (the HTTP API adds them to its own)."""
    checks = readiness or READINESS

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, states = await checks.evaluate()
        body = {"status": "ready" if ready else "not ready", "components": states}
        return web.json_response(body, status=200 if ready else 503)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def create_app(readiness: Readiness | None = None) -> web.Application:
    app = web.Application()
    add_routes(app, readiness)
    return app


class ObserveServer:
    """The running server; ``close()`` stops it."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(host: str, port: int, readiness: Readiness | None = None) -> ObserveServer | None:
    """Serve the endpoints on ``host:port`` in the running loop; None when ``port`` is 0.

    A port already taken (two Herald processes on one host with the default port) is logged
    and the process goes on without the endpoints: metrics must not stop deliveries. Give
    each process its own HERALD_OBSERVE_PORT there."""
    if port == 0:
        return None
    runner = web.AppRunner(create_app(readiness), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        log.warning(
            "cannot serve /metrics, /healthz and /readyz on %s:%d (%s); "
            "set HERALD_OBSERVE_PORT to a free port, or 0 to turn them off",
            host,
            port,
            e,
        )
        return None
    log.info("serving /metrics, /healthz and /readyz on http://%s:%d", host, port)
    return ObserveServer(runner, port)
