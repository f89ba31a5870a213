"""Run one sink worker for a connector class given by import path, for a connector that is
written but not yet registered as a ``herald.connectors`` entry point (``pip install -e .``
registers it; ``herald run sink CHANNEL`` is what the benchmark runs once it is):

    python -m bench.sinkrun connectors.webhook:WebhookConnector
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys

from pipeline.kafka.admin import ensure_topics
from pipeline.settings import HeraldSettings
from pipeline.sink.runtime import SinkWorker


async def run(path: str) -> None:
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    settings = HeraldSettings()
    ensure_topics(settings)
    worker = SinkWorker(settings, cls.from_env())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await worker.connector.aclose()


def main() -> int:
    logging.basicConfig(level=os.environ.get("HERALD_LOG_LEVEL", "INFO"))
    asyncio.run(run(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
