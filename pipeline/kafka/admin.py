"""Reaching the cluster, and topic administration: Herald creates its topics with their
intended settings.

Every process that talks to Kafka reaches it first through ``connect_admin`` (the router and
the sinks by way of ``ensure_topics``, the API, tail and replay directly), so a wrong
password, an untrusted certificate or an unreachable cluster stops it at start with one
line that names the setting to fix, instead of clients retrying in the background.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from confluent_kafka import IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec  # what confluent_kafka.admin re-exports
from confluent_kafka.cimpl import NewTopic

from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = [
    "KafkaAccessError",
    "KafkaAuthenticationError",
    "KafkaTlsError",
    "KafkaUnreachableError",
    "connect_admin",
    "ensure_topics",
    "herald_topics",
    "list_offsets",
    "wait_writable",
]

log = logging.getLogger(__name__)


class KafkaAccessError(RuntimeError):
    """Herald could not use the cluster with its settings; the message names them."""


class KafkaAuthenticationError(KafkaAccessError):
    """The brokers refused the SASL credentials."""


class KafkaTlsError(KafkaAccessError):
    """The TLS handshake failed (an untrusted certificate, a host name that does not match,
    or a TLS client talking to a plaintext listener)."""


class KafkaUnreachableError(KafkaAccessError):
    """No broker answered in time."""


def _credentials(settings: HeraldSettings) -> str:
    if settings.kafka_sasl_mechanism == "OAUTHBEARER":
        return (
            f"the OAuth client HERALD_KAFKA_OAUTH_CLIENT_ID={settings.kafka_oauth_client_id} "
            "with HERALD_KAFKA_OAUTH_CLIENT_SECRET (token endpoint "
            f"HERALD_KAFKA_OAUTH_TOKEN_URL={settings.kafka_oauth_token_url})"
        )
    return (
        f"HERALD_KAFKA_SASL_USERNAME={settings.kafka_sasl_username} with HERALD_KAFKA_SASL_PASSWORD"
    )


def _reason(error: KafkaError) -> str:
    """librdkafka's message without its broker prefix and timing suffix."""
    text = error.str()
    text = re.sub(r"^(?:\w+://)?[\w.\-\[\]:]+/\w+: ", "", text)
    text = re.sub(r" \(after \d+ms in state [A-Z_]+\)", "", text)
    return re.sub(r"\s+\(after .*\)$", "", text)


def connect_admin(settings: HeraldSettings, timeout: float = 30.0) -> AdminClient:
    """An admin client that has fetched the cluster's metadata with Herald's settings.
    Raises KafkaAuthenticationError, KafkaTlsError or KafkaUnreachableError, whose one-line
    message names the settings to check (never a secret)."""
    errors: list[KafkaError] = []
    # librdkafka's own log would print each failed attempt on stderr; its errors reach
    # error_cb, and this function turns them into one exception.
    admin = AdminClient(settings.admin_config(error_cb=errors.append, log_level=0))
    servers = f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}"
    deadline = time.monotonic() + timeout
    last: KafkaError | None = None
    while True:
        try:
            admin.list_topics(timeout=1)
            return admin
        except KafkaException as e:
            last = e.args[0]
        admin.poll(0)
        for error in errors:
            if error.code() == KafkaError._AUTHENTICATION:
                mech = settings.kafka_sasl_mechanism
                raise KafkaAuthenticationError(
                    f"Kafka refused the credentials: {_credentials(settings)} "
                    f"(SASL {mech} on {settings.kafka_security_protocol}, {servers}): "
                    f"{_reason(error)}"
                    if mech
                    else f"Kafka refused the connection ({servers}, "
                    f"HERALD_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}): "
                    f"{_reason(error)}"
                )
            if error.code() == KafkaError._SSL:
                raise KafkaTlsError(
                    f"TLS with Kafka failed ({servers}, HERALD_KAFKA_SECURITY_PROTOCOL="
                    f"{settings.kafka_security_protocol}, HERALD_KAFKA_SSL_CA_FILE="
                    f"{settings.kafka_ssl_ca_file or '(system CAs)'}): {_reason(error)}"
                )
        if errors:
            last = errors[-1]
        errors.clear()
        if time.monotonic() >= deadline:
            why = _reason(last) if last is not None else "no answer"
            raise KafkaUnreachableError(
                f"no Kafka broker answered within {timeout:.0f}s ({servers}, "
                f"HERALD_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}): {why}"
            )


def herald_topics(settings: HeraldSettings) -> list[str]:
    """Every topic this deployment needs: an event topic per domain of the schemas, and the
    topics of every installed connector's channel."""
    from connectors.registry import installed_channels
    from pipeline.schemas import load_schemas

    domains = load_schemas(settings.schemas_dir.resolve()).domains()
    return Topics(settings.topic_prefix).all(
        domains, installed_channels(), retry_tiers=settings.sink_retry_tiers
    )


def ensure_topics(settings: HeraldSettings, names: list[str] | None = None) -> list[str]:
    """Create whichever of Herald's topics (or ``names``) do not exist yet.
    Returns the names created. Safe to run from several processes at once."""
    wanted = names if names is not None else herald_topics(settings)
    admin = connect_admin(settings)
    metadata = admin.list_topics(timeout=15).topics
    existing = set(metadata)
    missing = [n for n in wanted if n not in existing]
    if not missing:
        # Perhaps created a moment ago by another process: served before anything writes.
        wait_writable(admin, wanted)
        return []
    topics = Topics(settings.topic_prefix)
    compacted = set(topics.people())
    # The people topics are co-partitioned with the event topics: same partition count (and
    # the same key, so the same partition for a user). Event topics that exist already decide.
    partitions = settings.topic_partitions
    counts = {
        len(md.partitions)
        for name, md in metadata.items()
        if name.startswith(topics.events("")) and name != topics.events_dlq
    }
    if len(counts) == 1:
        partitions = counts.pop()

    def config(name: str) -> dict[str, str]:
        conf = {"min.insync.replicas": str(min(2, settings.topic_replication_factor))}
        if name in compacted:
            conf["cleanup.policy"] = "compact"
        return conf

    futures = admin.create_topics(
        [
            NewTopic(
                n,
                num_partitions=partitions if n in compacted else settings.topic_partitions,
                replication_factor=settings.topic_replication_factor,
                config=config(n),
            )
            for n in missing
        ],
        operation_timeout=30,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    wait_writable(admin, wanted)
    if created:
        log.info("created topics: %s", ", ".join(sorted(created)))
    return created


def wait_writable(admin: AdminClient, names: list[str], timeout: float = 60.0) -> None:
    """Wait until the leader of every partition of ``names`` serves it.

    A broker announces a new partition's leader in its metadata before it has created the
    partition's log. A producer writing in that window gets NOT_LEADER_OR_FOLLOWER for its
    first request while a later request to the same partition may already be appended; an
    idempotent producer then cannot fill the sequence gap and its first records are lost
    although it reported them delivered (KAFKA-15591, seen here as a missing first record of
    a fresh partition). Asking each leader for the partition's end offset succeeds only once
    the log exists, so Herald creates topics and then waits for this before anything writes.
    """
    deadline = time.monotonic() + timeout
    pending: list[TopicPartition] = []
    unknown = set(names)  # not in the broker's metadata yet
    while unknown:
        topics = admin.list_topics(timeout=15).topics
        for name in sorted(unknown):
            md = topics.get(name)
            if md is not None and md.error is None and md.partitions:
                pending += [TopicPartition(name, p) for p in md.partitions]
                unknown.discard(name)
        if unknown and time.monotonic() >= deadline:
            raise KafkaUnreachableError(
                f"topics {', '.join(sorted(unknown))} are not in the cluster's metadata "
                f"{timeout:.0f}s after they were created"
            )
        if unknown:
            time.sleep(0.1)
    remaining = max(0.0, deadline - time.monotonic())
    list_offsets(admin, pending, OffsetSpec.latest(), timeout=remaining)  # type: ignore[no-untyped-call]


def list_offsets(
    admin: AdminClient,
    partitions: list[TopicPartition],
    spec: OffsetSpec,
    *,
    timeout: float = 60.0,
    stopping: Callable[[], bool] = lambda: False,
) -> dict[tuple[str, int], int]:
    """The partitions' offsets for ``spec`` (latest: the last stable offset, as a
    read_committed reader sees it), in one request per broker. Partitions whose leader
    cannot serve them yet (just created, a broker restarting) are asked again every 100 ms;
    after ``timeout`` (or once ``stopping()``) KafkaUnreachableError names them. Any other
    error is raised as the KafkaException it is."""
    deadline = time.monotonic() + timeout
    found: dict[tuple[str, int], int] = {}
    pending = list(partitions)
    while pending:
        futures = admin.list_offsets(
            {tp: spec for tp in pending},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=10,
        )
        waiting: list[TopicPartition] = []
        last: KafkaException | None = None
        for tp, fut in futures.items():
            try:
                found[(tp.topic, tp.partition)] = int(fut.result().offset)
            except KafkaException as e:
                if not e.args[0].retriable() and e.args[0].code() not in _NOT_READY:
                    raise
                waiting.append(tp)
                last = e
        pending = waiting
        if pending and (time.monotonic() >= deadline or stopping()):
            raise KafkaUnreachableError(
                f"{len(pending)} partitions (first {pending[0].topic}[{pending[0].partition}]) "
                f"are not served by their leader after {timeout:.0f}s: "
                f"{_reason(last.args[0]) if last else 'no answer'}"
            )
        if pending:
            time.sleep(0.1)
    return found


# What a cluster answers for a partition no leader serves yet: not created, leader not
# known or moving, or the request lost on the way. Asked again until the timeout.
_NOT_READY = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.UNKNOWN_TOPIC_ID,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._NOENT,  # no leader known for the partition (yet)
    }
)
