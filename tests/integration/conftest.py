"""A running pipeline (`herald run all`) on the session broker, delivering to a real SMTP
server, shared by the tests of one module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.smtp_catcher import SmtpCatcher
from pipeline.kafka.admin import ensure_topics
from pipeline.publisher import Publisher
from pipeline.settings import HeraldSettings
from tests.conftest import unique_prefix

RULES = """
[[rules]]
name = "welcome-email"
event = "user-registered"
channel = "email"
recipient = "email"
template = "welcome"

[[rules]]
name = "order-shipped-email"
event = "order-shipped"
channel = "email"
recipient = "email"
template = "order-shipped"
when = "carrier != 'pickup'"
"""  # no rule for password-reset-requested, on purpose


@dataclass
class RunningPipeline:
    settings: HeraldSettings
    smtp: SmtpCatcher
    publisher: Publisher
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def pipeline(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningPipeline]:
    tmp = tmp_path_factory.mktemp("pipeline")
    rules = tmp / "rules.toml"
    rules.write_text(RULES)
    prefix = unique_prefix()
    with SmtpCatcher() as smtp:
        settings = HeraldSettings(
            kafka_bootstrap_servers=kafka_bootstrap,
            topic_prefix=prefix,
            router_app_id=f"{prefix}router",
            sink_group_prefix=f"{prefix}sink",
            router_data_dir=tmp / "router",
            rules_file=rules,
            sink_max_attempts=3,
            sink_retry_backoff_ms=50,
        )
        ensure_topics(settings)
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "HERALD_TOPIC_PREFIX": prefix,
            "HERALD_ROUTER_APP_ID": settings.router_app_id,
            "HERALD_SINK_GROUP_PREFIX": settings.sink_group_prefix,
            "HERALD_ROUTER_DATA_DIR": str(settings.router_data_dir),
            "HERALD_RULES_FILE": str(rules),
            "HERALD_SMTP_HOST": "127.0.0.1",
            "HERALD_SMTP_PORT": str(smtp.port),
            "HERALD_SMTP_SECURITY": "none",
            "HERALD_SINK_MAX_ATTEMPTS": "3",
            "HERALD_SINK_RETRY_BACKOFF_MS": "50",
            "HERALD_LEDGER_URL": f"sqlite:///{tmp / 'ledger.db'}",
        }
        log = tmp / "run-all.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "run", "all", "email"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running = RunningPipeline(
            settings, smtp, Publisher(settings, producer_name="tests"), proc, log
        )
        try:
            yield running
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
