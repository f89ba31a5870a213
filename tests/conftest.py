"""Shared fixtures: one real Kafka broker for the session.

Which broker: KAFKA_BOOTSTRAP_SERVERS if set; else a Kafka container through testcontainers
when a Docker engine answers; else a local Apache Kafka broker run from the jars that
`make kafka-jars` provisioned, in a temporary directory on free loopback ports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from devtools.procs import free_port
from pipeline.settings import HeraldSettings, project_root
from tests import pg


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from pipeline.kafka.local import LocalKafka

    home = tmp_path_factory.mktemp("kafka")
    (home / "lib").mkdir()
    for jar in (project_root() / ".herald" / "kafka" / "lib").glob("*.jar"):
        (home / "lib" / jar.name).symlink_to(jar.resolve())
    kafka = LocalKafka(home, port=free_port(), controller_port=free_port())
    kafka.start()
    try:
        yield kafka.bootstrap_servers
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def local_kafka_home(kafka_bootstrap: str) -> Path:
    """Where Kafka's console tools come from (the provisioned jars)."""
    return project_root() / ".herald" / "kafka"


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path) -> HeraldSettings:
    """Settings on the session broker, with topics and groups of this test's own."""
    prefix = unique_prefix()
    return HeraldSettings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        router_app_id=f"{prefix}router",
        sink_group_prefix=f"{prefix}sink",
        router_data_dir=tmp_path / "router",
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A superuser DSN on a throwaway server for the session (or HERALD_TEST_POSTGRES_URL)."""
    try:
        server = pg.postgres_server()
        url = server.__enter__()
    except pg.PostgresUnavailable as exc:
        # A missing server is a failure, never a quiet skip: `make test` installs one.
        pytest.fail(f"{exc} (run `make postgres`)")
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


@pytest.fixture
def fresh_postgres_database(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(postgres_url, name)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Measurements that tests recorded with ``record_property``, one line per test."""
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            props = getattr(report, "user_properties", None)
            if getattr(report, "when", None) == "call" and props:
                values = " ".join(f"{name}={value}" for name, value in props)
                lines.append(f"{report.nodeid}: {values}")
    if lines:
        terminalreporter.section("measurements")
        for line in lines:
            terminalreporter.write_line(line)
