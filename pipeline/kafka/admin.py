"""Topic administration: Herald creates its topics with their intended settings."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = ["ensure_topics"]

log = logging.getLogger(__name__)


def ensure_topics(settings: HeraldSettings, names: list[str] | None = None) -> list[str]:
    """Create whichever of Herald's topics (or ``names``) do not exist yet.
    Returns the names created. Safe to run from several processes at once."""
    topics = Topics(settings.topic_prefix)
    wanted = names if names is not None else topics.all(retry_tiers=settings.sink_retry_tiers)
    admin = AdminClient(settings.admin_config())
    existing = set(admin.list_topics(timeout=15).topics)
    missing = [n for n in wanted if n not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [
            NewTopic(
                n,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication_factor,
                config={"min.insync.replicas": str(min(2, settings.topic_replication_factor))},
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
