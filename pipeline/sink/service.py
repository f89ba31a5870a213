"""Running sink workers: standalone (``herald run sink``) or beside the router inside the
Faust worker (``herald run all``)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import mode

from connectors.base import Connector
from connectors.registry import connector_class
from pipeline import observe
from pipeline.kafka.admin import ensure_topics
from pipeline.settings import HeraldSettings
from pipeline.sink.runtime import SinkWorker

__all__ = ["SinkService", "build_workers", "run_sinks"]

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


async def run_sinks(settings: HeraldSettings, channels: list[str]) -> None:
    """Run sink workers until SIGINT or SIGTERM; each finishes and commits its batch. Serves
    /metrics, /healthz and /readyz on HERALD_OBSERVE_HOST:HERALD_OBSERVE_PORT meanwhile."""
    ensure_topics(settings)
    workers = build_workers(settings, channels)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_all, workers)
    server = await observe.serve(settings.observe_host, settings.observe_port)
    try:
        await asyncio.gather(*(_run_and_close(w) for w in workers))
    finally:
        if server is not None:
            await server.close()


def _stop_all(workers: list[SinkWorker]) -> None:
    for w in workers:
        w.stop()


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
