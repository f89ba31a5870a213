"""Topic administration: Herald creates its topics with their intended settings."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["ensure_topics", "herald_topics"]

log = logging.getLogger(__name__)


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
    admin = AdminClient(settings.admin_config())
    metadata = admin.list_topics(timeout=15).topics
    existing = set(metadata)
    missing = [n for n in wanted if n not in existing]
    if not missing:
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
    if created:
        log.info("created topics: %s", ", ".join(sorted(created)))
    return created
