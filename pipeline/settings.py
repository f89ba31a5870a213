"""Herald's settings: one pydantic-settings model, read from the environment.

Setting names are the same on every path (local broker, docker-compose, an existing cluster):
``KAFKA_BOOTSTRAP_SERVERS`` and ``SCHEMA_REGISTRY_URL`` follow the ecosystem's names, every
other setting is ``HERALD_*``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["HeraldSettings", "SmtpSecurity", "project_root"]


def project_root() -> Path:
    """The source checkout (where schemas/ and config/ live)."""
    return Path(__file__).resolve().parent.parent


class SmtpSecurity(StrEnum):
    NONE = "none"  # plain SMTP: only for local catchers and tests
    STARTTLS = "starttls"
    TLS = "tls"  # implicit TLS (SMTPS, port 465)


class HeraldSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_", extra="ignore", populate_by_name=True)

    # Kafka
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "HERALD_KAFKA_BOOTSTRAP_SERVERS"),
    )
    topic_prefix: str = ""
    topic_partitions: int = 3
    topic_replication_factor: int = 1
    client_id: str = "herald"

    # Serialization: no registry URL means Avro single-object encoding against schemas/.
    schema_registry_url: str | None = Field(
        None, validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "HERALD_SCHEMA_REGISTRY_URL")
    )
    schemas_dir: Path = project_root() / "schemas"
    max_record_bytes: int = 1_000_000

    # Router
    rules_file: Path = project_root() / "config" / "rules.toml"
    templates_dir: Path = project_root() / "config" / "templates"
    router_app_id: str = "herald-router"  # the router's consumer group
    # exactly_once: each batch's intents and its source offsets commit in one Kafka
    # transaction; at_least_once: intents are acknowledged before the offsets commit.
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    # confluent: router/loop.py, a transactional consume-transform-produce loop (holds
    # exactly_once). faust: router/app.py, the faust-streaming agent (at-least-once whatever
    # the guarantee says: its transactions carry the offsets but not the sends). Switch
    # with every router of the group stopped: the two use different assignors.
    router_engine: Literal["confluent", "faust"] = "confluent"
    router_data_dir: Path = project_root() / ".herald" / "router"
    router_session_timeout_s: float = 10.0
    # While the schema registry cannot answer, the router holds the event and retries after
    # this long, doubling up to the maximum.
    router_retry_backoff_ms: int = 200
    router_retry_backoff_max_ms: int = 30_000

    # Sinks
    # Where sinks record outcomes and offsets. SQLite for one host; PostgreSQL for sinks on
    # several hosts sharing a consumer group.
    # A PostgreSQL URL may hold a password, hence SecretStr.
    ledger_url: SecretStr = SecretStr("sqlite:///" + str(project_root() / ".herald" / "ledger.db"))
    sink_group_prefix: str = "herald-sink"
    # Per partition: records being sent or waiting for their outcome to be recorded. A crash
    # resends at most this many per partition (with the same idempotency key).
    sink_max_in_flight: int = 32
    sink_max_attempts: int = 8
    sink_retry_tiers: int = 3  # notifications.<channel>.retry.1 .. .N
    sink_retry_backoff_ms: int = 1_000
    sink_retry_backoff_max_ms: int = 300_000
    sink_commit_interval_ms: int = 50  # group commit of outcomes and offsets
    # A crashed sink's partitions wait this long before another member takes them over...
    sink_session_timeout_ms: int = 10_000
    # ...unless it comes back with the same static member id (Kafka static membership),
    # which gets its partitions back at once. Set per process, e.g. "sink-email-1".
    sink_instance_id: str | None = None
    breaker_failure_threshold: int = 20  # consecutive retryable failures that open it
    breaker_open_ms: int = 5_000  # first pause; doubles while probes fail
    breaker_open_max_ms: int = 60_000

    # HTTP API (herald run api)
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_token: SecretStr | None = None  # when set, /v1 requests need "Bearer <token>"

    # Email
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_security: SmtpSecurity = SmtpSecurity.NONE
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_ca_file: Path | None = None
    smtp_timeout_s: float = 30.0
    smtp_connections: int = 4
    email_from: str = "Herald <notifications@herald.localhost>"
    message_id_domain: str = "herald.localhost"

    # Local broker provisioned from Maven Central (herald kafka up)
    kafka_home: Path = project_root() / ".herald" / "kafka"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093

    def producer_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings for an idempotent producer."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": max(self.max_record_bytes + 64 * 1024, 1_000_000),
        }
        conf.update(extra)
        return conf

    def consumer_config(self, group_id: str, **extra: Any) -> dict[str, Any]:
        """librdkafka settings for a sink consumer: manual commits, committed reads only."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "client.id": self.client_id,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.sink_session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.sink_session_timeout_ms // 5),
        }
        if self.sink_instance_id:
            conf["group.instance.id"] = self.sink_instance_id
        conf.update(extra)
        return conf

    def router_consumer_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings for the router's consumer: no automatic commits (offsets
        go with the transaction, or after the outputs are acknowledged), committed reads."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "client.id": self.client_id,
            "group.id": self.router_app_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(self.router_session_timeout_s * 1000),
            "heartbeat.interval.ms": max(500, int(self.router_session_timeout_s * 200)),
        }
        conf.update(extra)
        return conf

    def admin_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.kafka_bootstrap_servers, "client.id": self.client_id}
