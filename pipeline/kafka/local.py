"""A local Apache Kafka broker run from the jars that kafka/pom.xml provisions.

One KRaft node in combined mode (broker and controller), listening on loopback only. Its
files live under one directory (``HERALD_KAFKA_HOME``, default ``.herald/kafka``)::

    lib/                 the classpath (``make kafka-jars`` copies it from Maven)
    config/              server.properties and log4j2.properties, written by ``up``
    data/                the log directory, formatted once with kafka.tools.StorageTool
    logs/server.log      broker output
    broker.pid           pid of the running broker

By default the node is a single-node quorum of its own (``--standalone``). The optional
fields make it one node of a static quorum instead (see devtools/cluster.py): its
``node_id``, the ``quorum_voters`` of all nodes, a shared ``cluster_id`` and ``lib_dir``, and
``properties`` that override or add to the server.properties written here.

A second client listener, SASL_SSL, is added by ``sasl_ssl_port`` with ``tls`` (the broker's
PEM certificate chain and PKCS#8 key) and ``scram_users`` (name -> password, created as
SCRAM-SHA-256 and SCRAM-SHA-512 credentials when the storage is formatted). The PLAINTEXT
listener stays: the controller, the brokers among themselves and the readiness probe use it,
all on loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BrokerTls",
    "KafkaNotProvisionedError",
    "KafkaStartError",
    "LocalKafka",
    "console_tools",
]

# Kafka's console tools, by the name `herald kafka NAME` gives them.
console_tools: dict[str, str] = {
    "console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "producer-perf-test": "org.apache.kafka.tools.ProducerPerformance",
    "get-offsets": "org.apache.kafka.tools.GetOffsetShell",
}

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""

_TOOLS_LOG4J2 = """\
status = error
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
"""


# Brokers started by this process, so they are reaped (no zombies, no ResourceWarning) when
# stopped from here. A broker started by another process is stopped through its pid file.
_children: dict[int, subprocess.Popen[bytes]] = {}


class KafkaNotProvisionedError(RuntimeError):
    """The broker's jars are missing: run ``make kafka-jars``."""


class KafkaStartError(RuntimeError):
    """The broker did not become ready; the message holds the tail of its log."""


@dataclass(frozen=True)
class BrokerTls:
    """The broker's TLS identity, PEM files."""

    certificate_chain: Path  # the broker's certificate, then any intermediates
    private_key: Path  # PKCS#8 ("BEGIN PRIVATE KEY"), unencrypted: Kafka's PEM keystore


# Characters StorageTool's --add-scram syntax (name=...,password=...]) cannot carry.
_SCRAM_UNSAFE = set(',[]="\\ ')


@dataclass(frozen=True)
class LocalKafka:
    home: Path
    port: int = 9092
    controller_port: int = 9093
    java: str = "java"
    heap: str = "512m"
    node_id: int = 1
    # "1@127.0.0.1:9093,2@...": a static quorum (controller.quorum.voters), formatted without
    # --standalone. None: this node alone is the quorum (controller.quorum.bootstrap.servers).
    quorum_voters: str | None = None
    # Formats the storage with this cluster id; None: a new random one.
    cluster_id: str | None = None
    # The jars, when shared with other nodes; None: home/lib.
    lib_dir: Path | None = None
    # server.properties entries that override or add to the defaults.
    properties: Mapping[str, str] = field(default_factory=dict, hash=False)
    # A SASL_SSL listener for clients on this port (needs tls and scram_users).
    sasl_ssl_port: int | None = None
    tls: BrokerTls | None = None
    scram_users: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.sasl_ssl_port is not None:
            if self.tls is None or not self.scram_users:
                raise ValueError("a SASL_SSL listener needs tls and at least one SCRAM user")
            for name, password in self.scram_users.items():
                if _SCRAM_UNSAFE & set(name + password):
                    raise ValueError(
                        f"SCRAM user {name!r}: names and passwords for the local broker "
                        f"cannot hold any of {''.join(sorted(_SCRAM_UNSAFE))!r}"
                    )

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_ssl_bootstrap_servers(self) -> str:
        if self.sasl_ssl_port is None:
            raise ValueError("this broker has no SASL_SSL listener")
        return f"127.0.0.1:{self.sasl_ssl_port}"

    @property
    def lib(self) -> Path:
        return self.lib_dir if self.lib_dir is not None else self.home / "lib"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "server.log"

    @property
    def _pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def _data(self) -> Path:
        return self.home / "data"

    @property
    def _config(self) -> Path:
        return self.home / "config"

    def classpath(self) -> str:
        jars = sorted(self.lib.glob("*.jar")) if self.lib.is_dir() else []
        if not any(j.name.startswith("kafka_2.13-") for j in jars):
            raise KafkaNotProvisionedError(
                f"no Kafka jars in {self.lib}: run `make kafka-jars` "
                "(mvn -f kafka/pom.xml dependency:copy-dependencies)"
            )
        return os.pathsep.join(str(j) for j in jars)

    def version(self) -> str:
        for jar in self.lib.glob("kafka_2.13-*.jar"):
            return jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")
        return "unknown"

    # -- lifecycle -------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The running broker's pid, or None (a stale pid file is removed)."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            self._pid_file.unlink(missing_ok=True)
            return None
        return pid

    def is_ready(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
        ):
            return True
        return False

    def start(self, timeout: float = 90.0) -> float:
        """Start the broker (formatting storage on first use) and wait until it serves
        requests. Returns the seconds it took. Already running: returns 0.0."""
        if self.pid() is not None:
            return 0.0
        started = time.monotonic()
        classpath = self.classpath()
        self._write_config()
        if not (self._data / "meta.properties").exists():
            self._format(classpath)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.home / "logs" / "stdout.log", "ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    self.java,
                    f"-Xmx{self.heap}",
                    f"-Xms{self.heap}",
                    "-XX:+UseG1GC",
                    "-XX:TieredStopAtLevel=1",
                    f"-Dlog4j2.configurationFile={self._config / 'log4j2.properties'}",
                    f"-Dkafka.logs.dir={self.log_file.parent}",
                    "-cp",
                    classpath,
                    "kafka.Kafka",
                    str(self._config / "server.properties"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the CLI; `down` stops it
            )
        self._pid_file.write_text(str(proc.pid))
        _children[proc.pid] = proc
        deadline = started + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                _children.pop(proc.pid, None)
                self._pid_file.unlink(missing_ok=True)
                raise KafkaStartError(
                    f"broker exited with code {proc.returncode}:\n{self._log_tail()}"
                )
            if self._broker_ready():
                return time.monotonic() - started
            time.sleep(0.2)
        self.stop()
        raise KafkaStartError(f"broker not ready after {timeout:.0f}s:\n{self._log_tail()}")

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker: SIGTERM for a controlled shutdown, SIGKILL after ``timeout``.
        Returns False when none was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        self._pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the broker: a crash, for fault tests."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
            self._pid_file.unlink(missing_ok=True)

    # -- console tools ---------------------------------------------------------------------

    def tool_command(
        self, tool: str, args: list[str], jvm_options: list[str] | None = None
    ) -> list[str]:
        """argv running one of Kafka's console tools from the broker's classpath."""
        try:
            main_class = console_tools[tool]
        except KeyError:
            raise ValueError(
                f"unknown Kafka tool {tool!r}; known: {', '.join(sorted(console_tools))}"
            ) from None
        self._config.mkdir(parents=True, exist_ok=True)
        tools_log = self._config / "tools-log4j2.properties"
        if not tools_log.exists():
            tools_log.write_text(_TOOLS_LOG4J2)
        return [
            self.java,
            "-Xmx256m",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={tools_log}",
            *(jvm_options or []),
            "-cp",
            self.classpath(),
            main_class,
            *args,
        ]

    # -- internals -------------------------------------------------------------------------

    def _broker_ready(self) -> bool:
        if not self.is_ready():
            return False
        # The port opens before the broker has caught up with the metadata log; ask for
        # metadata so "ready" means it answers requests.
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap_servers, "socket.timeout.ms": 2000}
        )
        try:
            md = admin.list_topics(timeout=2)
        except Exception:
            return False
        return bool(md.brokers)

    def _write_config(self) -> None:
        self._config.mkdir(parents=True, exist_ok=True)
        self._data.mkdir(parents=True, exist_ok=True)
        c = f"127.0.0.1:{self.controller_port}"
        quorum = (
            {"controller.quorum.voters": self.quorum_voters}
            if self.quorum_voters is not None
            else {"controller.quorum.bootstrap.servers": c}
        )
        listeners = f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://{c}"
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        secure: dict[str, str] = {}
        if self.sasl_ssl_port is not None:
            listeners += f",SASL_SSL://127.0.0.1:{self.sasl_ssl_port}"
            protocols += ",SASL_SSL:SASL_SSL"
            secure = self._sasl_ssl_properties()
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": listeners,
            "advertised.listeners": listeners,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            **secure,
            "log.dirs": str(self._data.resolve()),
            "num.partitions": "3",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Topics are created by Herald with their intended settings; a typo in a topic
            # name must fail loudly instead of creating a new topic.
            "auto.create.topics.enable": "false",
            "log.retention.hours": "168",
            **self.properties,
        }
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        (self._config / "server.properties").write_text(text)
        (self._config / "log4j2.properties").write_text(_LOG4J2.format(log=self.log_file.resolve()))

    def _sasl_ssl_properties(self) -> dict[str, str]:
        """The SASL_SSL listener: SCRAM over TLS with a PEM keystore (key and chain in one
        file, which Kafka's PEM keystore wants)."""
        assert self.tls is not None  # noqa: S101 - checked in __post_init__
        keystore = self._config / "broker-keystore.pem"
        keystore.write_bytes(
            self.tls.private_key.read_bytes() + b"\n" + self.tls.certificate_chain.read_bytes()
        )
        keystore.chmod(0o600)
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return {
            "sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
            "listener.name.sasl_ssl.ssl.keystore.location": str(keystore.resolve()),
        }

    def _format(self, classpath: str) -> None:
        base = [
            self.java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={self._config / 'log4j2.properties'}",
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
        ]
        cluster_id = self.cluster_id
        if cluster_id is None:
            cluster_id = subprocess.run(  # noqa: S603
                [*base, "random-uuid"], check=True, capture_output=True, text=True
            ).stdout.strip()
        # A static quorum (controller.quorum.voters) is formatted with neither --standalone
        # nor --initial-controllers: StorageTool refuses both alongside the voters.
        quorum = ["--standalone"] if self.quorum_voters is None else []
        scram = []
        for name, password in self.scram_users.items():
            for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
                scram += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        subprocess.run(  # noqa: S603
            [
                *base,
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self._config / "server.properties"),
                *quorum,
                *scram,
            ],
            check=True,
            capture_output=True,
            text=True,
        )

    def _log_tail(self, lines: int = 30) -> str:
        out = []
        for f in (self.home / "logs" / "stdout.log", self.log_file):
            if f.exists():
                out.extend(f.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out[-lines:])


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
