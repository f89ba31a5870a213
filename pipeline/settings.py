"""Herald's settings: one pydantic-settings model, read from the environment.

Setting names are the same on every path (local broker, docker-compose, an existing cluster):
``KAFKA_BOOTSTRAP_SERVERS`` and ``SCHEMA_REGISTRY_URL`` follow the ecosystem's names, every
other setting is ``HERALD_*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["HeraldSettings", "project_root"]


def project_root() -> Path:
    """The source checkout (where schemas/ and config/ live)."""
    return Path(__file__).resolve().parent.parent


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
    router_app_id: str = "herald-router"
    processing_guarantee: str = "exactly_once"
    router_data_dir: Path = project_root() / ".herald" / "router"
    router_session_timeout_s: float = 10.0
    # While the schema registry cannot answer, the router holds the event and retries after
    # this long, doubling up to the maximum.
    router_retry_backoff_ms: int = 200
    # Low, so a held event goes on within seconds of the registry coming back (the sinks
    # hold their records with the same settings).
    router_retry_backoff_max_ms: int = 5_000

    # People (docs/architecture.md, "People"): workspace defaults of preferences and the
    # categories that bypass opt-outs (a TOML file); the locale templates fall back to.
    preferences_file: Path = project_root() / "config" / "preferences.toml"
    default_locale: str = "en"
    # One-click unsubscribe (RFC 8058): every non-critical email carries List-Unsubscribe with
    # <unsubscribe_url>/u/<token> and, when set, mailto:<unsubscribe_mailto>?subject=<token>.
    # The token is signed with the secret (HMAC-SHA256) and expires after the TTL. Without a
    # secret and a URL, emails carry no List-Unsubscribe.
    unsubscribe_secret: SecretStr | None = None
    unsubscribe_url: str | None = None  # the API's public base URL, e.g. https://notify.example.com
    unsubscribe_mailto: str | None = None  # e.g. unsubscribe@example.com
    unsubscribe_ttl_s: int = 60 * 86_400

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
    # Longest pause a provider's retry-after (HTTP 429/503 Retry-After, SMTP 421) may impose
    # on the whole channel. A longer one is an ordinary retryable failure: the record goes
    # to a retry topic due after that time, so "retry after a day" never freezes a sink.
    # 0: never pause, every retry-after goes through the retry topics.
    sink_max_throttle_ms: int = 60_000

    # HTTP API (herald run api)
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_token: SecretStr | None = None  # when set, /v1 requests need "Bearer <token>"
    # How long an Idempotency-Key is remembered (in the ledger's database): a retry within
    # it gets the first answer, a different request with the key is refused (422).
    api_idempotency_retention_s: int = 86_400
    # The gRPC API, served by the same process (proto/herald/v1/notifications.proto, the
    # `grpc` extra). Port 0 serves HTTP only.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051

    # Each channel's settings belong to its connector (connectors/<channel>.py), e.g.
    # HERALD_SMTP_* to EmailSettings.

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

    def admin_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.kafka_bootstrap_servers, "client.id": self.client_id}
