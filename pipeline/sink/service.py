"""Running sink workers: standalone (``herald run sink``), or beside the router in one
process (``herald run all``): with the router loop in the same event loop, or as a service
of the Faust worker (``HERALD_ROUTER_ENGINE=faust``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Protocol

import mode

from connectors.base import Connector
from connectors.registry import connector_class
from pipeline import observe
from pipeline.kafka.admin import ensure_topics
from pipeline.settings import HeraldSettings
from pipeline.sink.runtime import SinkWorker

__all__ = ["Runner", "SinkService", "build_workers", "run_sinks"]

log = logging.getLogger(__name__)


def build_workers(settings: HeraldSettings, channels: list[str]) -> list[SinkWorker]:
    workers = []
    for channel in channels:
        connector: Connector = connector_class(channel).from_env()
        workers.append(SinkWorker(settings, connector))
    return workers


async def _run_and_close(worker: SinkWorker) -> None:
    try:
        await worker.run()
    finally:
        await worker.connector.aclose()


class Runner(Protocol):
    """Something that runs until asked to stop, e.g. the router loop."""

    async def run(self) -> None: ...

    def stop(self) -> None: ...


async def run_sinks(
    settings: HeraldSettings, channels: list[str], *, beside: Runner | None = None
) -> None:
    """Run sink workers (and ``beside``, for ``herald run all``) until SIGINT or SIGTERM;
    each finishes and commits its batch. If one of them fails, the others are stopped the
    same way and the failure is raised. Serves /metrics, /healthz and /readyz on
    HERALD_OBSERVE_HOST:HERALD_OBSERVE_PORT meanwhile."""
    ensure_topics(settings)
    workers = build_workers(settings, channels)
    runners: list[Runner] = [*workers] + ([beside] if beside is not None else [])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_all, runners)
    server = await observe.serve(settings.observe_host, settings.observe_port)
    tasks = [asyncio.ensure_future(_run_and_close(w)) for w in workers]
    if beside is not None:
        tasks.append(asyncio.ensure_future(beside.run()))
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    errors = [e for t in done if (e := t.exception()) is not None]
    if errors:
        _stop_all(runners)
    await asyncio.gather(*tasks, return_exceptions=True)
    if server is not None:
        await server.close()
    if errors:
        raise errors[0]


def _stop_all(runners: list[Runner]) -> None:
    for r in runners:
        r.stop()


class SinkService(mode.Service):
    """Sink workers as a service of the Faust worker: started with it, and on stop asked to
    finish their batch before the worker exits."""

    def __init__(self, settings: HeraldSettings, channels: list[str], **kwargs: Any) -> None:
        self.workers = build_workers(settings, channels)
        self._runs: list[asyncio.Task[None]] = []
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        self._runs = [asyncio.ensure_future(self._guard(w)) for w in self.workers]

    async def _guard(self, worker: SinkWorker) -> None:
        try:
            await _run_and_close(worker)
        except Exception as e:
            log.exception("%s sink failed", worker.channel)
            await self.crash(e)

    async def on_stop(self) -> None:
        for w in self.workers:
            w.stop()
        await asyncio.gather(*self._runs, return_exceptions=True)
