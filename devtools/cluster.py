"""A local Apache Kafka cluster of N KRaft nodes, for fault tests.

Each node is a :class:`~pipeline.kafka.local.LocalKafka` in combined mode (broker and
controller) on loopback, with its own ports and directory; all share one jar directory::

    <home>/lib/          the classpath (unless another lib dir is given)
    <home>/node-1/       config/, data/, logs/, broker.pid of node 1 (node.id=1)
    <home>/node-2/       ...

The quorum is static: every node has ``controller.quorum.voters=1@127.0.0.1:c1,2@...`` and
its storage is formatted with the same cluster id and neither ``--standalone`` nor
``--initial-controllers`` (StorageTool refuses them alongside the voters), i.e. kraft.version 0.

Nodes are numbered 1..N everywhere (``node(i)``, ``kill_node(i)``, ``start_node(i)``), the
same numbers as their ``node.id``, so a partition leader from metadata names its node.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pipeline.kafka.local import KafkaStartError, LocalKafka

__all__ = ["DURABLE_DEFAULTS", "LocalKafkaCluster", "cluster_from_home"]

_T = TypeVar("_T")

# Broker defaults of the cluster: nothing acknowledged with acks=all is lost when one node of
# three dies, and nothing is created by accident.
DURABLE_DEFAULTS: dict[str, str] = {
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    "unclean.leader.election.enable": "false",
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "false",
}


class LocalKafkaCluster:
    """N combined-mode KRaft nodes on loopback sharing one static controller quorum."""

    def __init__(
        self,
        home: Path,
        nodes: int = 3,
        *,
        ports: Sequence[tuple[int, int]] | None = None,
        base_port: int = 29092,
        lib: Path | None = None,
        properties: Mapping[str, str] | None = None,
        java: str = "java",
        heap: str = "512m",
    ) -> None:
        """``ports``: (broker port, controller port) per node; by default node i listens on
        ``base_port + 2(i-1)`` and its controller on the port after it. ``lib``: the jar
        directory (default ``home/lib``). ``properties``: server.properties entries for every
        node, over :data:`DURABLE_DEFAULTS`."""
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, not {nodes}")
        if ports is None:
            ports = [(base_port + 2 * i, base_port + 2 * i + 1) for i in range(nodes)]
        if len(ports) != nodes:
            raise ValueError(f"{len(ports)} port pairs for {nodes} nodes")
        self.home = home
        self.lib = lib if lib is not None else home / "lib"
        self.quorum_voters = ",".join(
            f"{i}@127.0.0.1:{controller}" for i, (_, controller) in enumerate(ports, start=1)
        )
        cluster_id = self._existing_cluster_id(nodes) or _random_cluster_id()
        props = {**DURABLE_DEFAULTS, **(properties or {})}
        self._nodes = [
            LocalKafka(
                home / f"node-{i}",
                port=port,
                controller_port=controller,
                java=java,
                heap=heap,
                node_id=i,
                quorum_voters=self.quorum_voters,
                cluster_id=cluster_id,
                lib_dir=self.lib,
                properties=props,
            )
            for i, (port, controller) in enumerate(ports, start=1)
        ]
        self.cluster_id = cluster_id

    # -- nodes -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._nodes)

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, len(self._nodes) + 1))

    def node(self, i: int) -> LocalKafka:
        """Node ``i`` (1..N, its node.id)."""
        if not 1 <= i <= len(self._nodes):
            raise IndexError(f"no node {i}: nodes are 1..{len(self._nodes)}")
        return self._nodes[i - 1]

    @property
    def nodes(self) -> list[LocalKafka]:
        return list(self._nodes)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.bootstrap_servers for n in self._nodes)

    def running(self) -> list[int]:
        """Ids of the nodes whose process is alive."""
        return [i for i, n in enumerate(self._nodes, start=1) if n.pid() is not None]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> float:
        """Start every node concurrently (formatting storage on first use), then wait until
        the cluster answers metadata listing all N brokers. Returns the seconds it took;
        0.0 when every node was already running. On failure every node is stopped."""
        if len(self.running()) == len(self._nodes):
            return 0.0
        started = time.monotonic()
        deadline = started + timeout
        try:
            # A node is ready only once a majority of controllers is up, so one thread each.
            _each(self._nodes, lambda n: n.start(timeout))
            self._wait_for_brokers(set(self.node_ids), deadline)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop every node concurrently (SIGTERM, SIGKILL after ``timeout``). Returns False
        when none was running."""
        return any(_each(self._nodes, lambda n: n.stop(timeout)))

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i``: a crash, for fault tests."""
        self.node(i).kill()

    def start_node(self, i: int, timeout: float = 90.0) -> float:
        """(Re)start node ``i`` and wait until the cluster lists it among its brokers.
        Returns the seconds it took."""
        started = time.monotonic()
        self.node(i).start(timeout)
        self._wait_for_brokers({i}, started + timeout)
        return time.monotonic() - started

    def brokers(self, timeout: float = 2.0) -> set[int]:
        """Ids of the brokers the cluster's metadata lists (empty when it does not answer)."""
        from confluent_kafka.admin import AdminClient

        live = [n for n in self._nodes if n.is_ready()]
        if not live:
            return set()
        admin = AdminClient(
            {
                "bootstrap.servers": ",".join(n.bootstrap_servers for n in live),
                "socket.timeout.ms": int(timeout * 1000),
                # A probe: refused connections to a stopped node are expected, not news.
                "log_level": 0,
            }
        )
        try:
            md = admin.list_topics(timeout=timeout)
        except Exception:
            return set()
        return {int(b) for b in md.brokers}

    # -- internals -------------------------------------------------------------------------

    def _wait_for_brokers(self, wanted: set[int], deadline: float) -> None:
        seen: set[int] = set()
        while time.monotonic() < deadline:
            seen = self.brokers()
            if wanted <= seen:
                return
            time.sleep(0.2)
        raise KafkaStartError(
            f"cluster metadata lists brokers {sorted(seen)}, waiting for {sorted(wanted)}"
        )

    def _existing_cluster_id(self, nodes: int) -> str | None:
        """The cluster id a node of this home was formatted with, so that a node formatted
        later joins the same cluster."""
        for i in range(1, nodes + 1):
            meta = self.home / f"node-{i}" / "data" / "meta.properties"
            if meta.exists():
                for line in meta.read_text().splitlines():
                    if line.startswith("cluster.id="):
                        return line.removeprefix("cluster.id=").strip()
        return None


def cluster_from_home(
    home: Path, nodes: int = 3, base_port: int = 29092, *, lib: Path | None = None
) -> LocalKafkaCluster:
    """The cluster whose nodes live in ``home/node-1..N``, node i on ports
    ``base_port + 2(i-1)`` (broker) and the next one (controller), jars from ``lib``
    (default ``home/lib``, as for LocalKafka: with ``settings.kafka_home`` both share them)."""
    return LocalKafkaCluster(home, nodes, base_port=base_port, lib=lib)


def _random_cluster_id() -> str:
    """What ``StorageTool random-uuid`` prints (a Kafka Uuid: 16 random bytes in URL-safe
    base64 without padding), without starting a JVM. Like Kafka, no id starting with '-'."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _each(nodes: Sequence[LocalKafka], action: Callable[[LocalKafka], _T]) -> list[_T]:
    """``action`` on every node at once; the first failure is raised after all finished."""
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = [pool.submit(action, n) for n in nodes]
    return [f.result() for f in futures]
