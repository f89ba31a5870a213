"""Herald's settings: one pydantic-settings model, read from the environment.

Setting names are the same on every path (local broker, docker-compose, an existing cluster):
``KAFKA_BOOTSTRAP_SERVERS`` and ``SCHEMA_REGISTRY_URL`` follow the ecosystem's names, every
other setting is ``HERALD_*``.

Where the defaults point: in a source checkout, at its ``schemas/`` and ``config/`` and at
``.herald/`` for state; in an installed package, at the copies of ``schemas/`` and
``config/`` packaged as ``pipeline/_data`` and at ``.herald/`` in the working directory.
Every one of them is a setting, so a deployment points them at its own files
(``herald init DIR`` writes an editable copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "ENV_PREFIX",
    "HeraldSettings",
    "KafkaSecurityProtocol",
    "SaslMechanism",
    "data_root",
    "in_checkout",
    "project_root",
    "state_dir",
]

ENV_PREFIX = "HERALD_"

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


def project_root() -> Path:
    """The source checkout (where schemas/ and config/ live), when running from one."""
    return Path(__file__).resolve().parent.parent


def in_checkout() -> bool:
    """True when this code runs from a source checkout rather than an installed package."""
    root = project_root()
    return (root / "pyproject.toml").is_file() and (root / "schemas").is_dir()


def data_root() -> Path:
    """Where the default schemas/ and config/ are: the checkout, or the packaged copies."""
    return project_root() if in_checkout() else Path(__file__).resolve().parent / "_data"


def state_dir() -> Path:
    """Where Herald keeps local state by default (router data, SQLite ledger, the local
    broker): the checkout's .herald/, or .herald/ in the working directory."""
    return (project_root() if in_checkout() else Path.cwd()) / ".herald"


class HeraldSettings(BaseSettings):
    # An empty variable counts as unset (compose's ${NAME:-} placeholders give empty ones).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    # Kafka
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "HERALD_KAFKA_BOOTSTRAP_SERVERS"),
    )
    topic_prefix: str = ""
    topic_partitions: int = 3
    topic_replication_factor: int = 1
    client_id: str = "herald"

    # Kafka security: one group for every client Herald makes (librdkafka producers,
    # consumers and admin clients through the *_config methods below; the Faust router and
    # Kafka's console tools through pipeline/kafka/security.py).
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    # PLAIN and SCRAM-SHA-256/512.
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # OAUTHBEARER: tokens from an OAuth 2 token endpoint (client credentials grant, OIDC).
    kafka_oauth_token_url: str | None = None
    kafka_oauth_client_id: str | None = None
    kafka_oauth_client_secret: SecretStr | None = None
    kafka_oauth_scope: str | None = None
    # TLS (SSL and SASL_SSL): a CA bundle for a private CA (else the system's), and a client
    # certificate and key for mutual TLS. PEM files.
    kafka_ssl_ca_file: Path | None = None
    kafka_ssl_cert_file: Path | None = None
    kafka_ssl_key_file: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None

    # Serialization: no registry URL means Avro single-object encoding against schemas/.
    schema_registry_url: str | None = Field(
        None, validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "HERALD_SCHEMA_REGISTRY_URL")
    )
    # How Herald authenticates to the registry and checks its certificate. The user info
    # ("user:password") and the token are secrets: never logged, never in error messages.
    # A bearer token also needs the logical cluster (Confluent Cloud's lsrc-..., sent as
    # target-sr-cluster; any other registry ignores it) and optionally an identity pool.
    schema_registry_basic_auth_user_info: SecretStr | None = None
    schema_registry_bearer_token: SecretStr | None = None
    schema_registry_bearer_logical_cluster: str = ""
    schema_registry_bearer_identity_pool: str | None = None
    # A PEM file of the CAs that sign an https registry's certificate; unset = the system's.
    schema_registry_ca_file: Path | None = None
    schemas_dir: Path = Field(default_factory=lambda: data_root() / "schemas")
    max_record_bytes: int = 1_000_000

    # Router
    rules_file: Path = Field(default_factory=lambda: data_root() / "config" / "rules.toml")
    templates_dir: Path = Field(default_factory=lambda: data_root() / "config" / "templates")
    router_app_id: str = "herald-router"  # the router's consumer group
    # exactly_once: each batch's intents and its source offsets commit in one Kafka
    # transaction; at_least_once: intents are acknowledged before the offsets commit.
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    # confluent: router/loop.py, a transactional consume-transform-produce loop (holds
    # exactly_once). faust: router/app.py, the faust-streaming agent (at-least-once whatever
    # the guarantee says: its transactions carry the offsets but not the sends). Switch
    # with every router of the group stopped: the two use different assignors.
    router_engine: Literal["confluent", "faust"] = "confluent"
    router_data_dir: Path = Field(default_factory=lambda: state_dir() / "router")
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
    ledger_url: SecretStr = Field(
        default_factory=lambda: SecretStr("sqlite:///" + str(state_dir() / "ledger.db"))
    )
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

    # Observability (pipeline/observe.py, pipeline/logs.py, pipeline/tracing.py)
    # /metrics, /healthz and /readyz of the router and sink processes (`herald run all` serves
    # one for both); 0 turns them off. The HTTP API serves them on its own port.
    observe_host: str = "127.0.0.1"
    observe_port: int = 9464
    # librdkafka statistics (consumer lag per partition, broker reachability); 0 turns off.
    kafka_stats_interval_ms: int = 5_000
    log_format: Literal["text", "json"] = "text"  # read by `herald` before anything else
    # One INFO line per sink outcome (sent, retrying, ...): off by default, for high volume.
    log_outcomes: bool = False
    # OpenTelemetry spans (the `otel` extra): None = on when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    otel_enabled: bool | None = None

    # Each channel's settings belong to its connector (connectors/<channel>.py), e.g.
    # HERALD_SMTP_* to EmailSettings.

    # Local broker provisioned from Maven Central (herald kafka up)
    kafka_home: Path = Field(default_factory=lambda: state_dir() / "kafka")
    kafka_port: int = 9092
    kafka_controller_port: int = 9093

    @model_validator(mode="after")
    def _check_kafka_security(self) -> HeraldSettings:
        """Refuse a security group that cannot work, at start, naming the variable."""
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        tls = protocol.endswith("SSL")
        mechanism = self.kafka_sasl_mechanism
        set_ = _set_names(self)
        if sasl and mechanism is None:
            raise ValueError(
                f"HERALD_KAFKA_SASL_MECHANISM is required with "
                f"HERALD_KAFKA_SECURITY_PROTOCOL={protocol} "
                "(PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)"
            )
        if not sasl:
            stray = [n for n in set_ if n.startswith(("sasl_", "oauth_"))]
            if stray:
                raise ValueError(
                    f"{_env(stray[0])} is set but HERALD_KAFKA_SECURITY_PROTOCOL={protocol} "
                    "does not use SASL (use SASL_SSL or SASL_PLAINTEXT)"
                )
        if not tls:
            stray = [n for n in set_ if n.startswith("ssl_")]
            if stray:
                raise ValueError(
                    f"{_env(stray[0])} is set but HERALD_KAFKA_SECURITY_PROTOCOL={protocol} "
                    "does not use TLS (use SSL or SASL_SSL)"
                )
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            for name in ("sasl_username", "sasl_password"):
                if name not in set_:
                    raise ValueError(f"{_env(name)} is required with SASL mechanism {mechanism}")
        if mechanism == "OAUTHBEARER":
            for name in ("oauth_token_url", "oauth_client_id", "oauth_client_secret"):
                if name not in set_:
                    raise ValueError(f"{_env(name)} is required with SASL mechanism OAUTHBEARER")
        if ("ssl_cert_file" in set_) != ("ssl_key_file" in set_):
            raise ValueError(
                "HERALD_KAFKA_SSL_CERT_FILE and HERALD_KAFKA_SSL_KEY_FILE go together "
                "(a client certificate and its key)"
            )
        for name in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file"):
            path = getattr(self, f"kafka_{name}")
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{_env(name)}: no such file {path}")
        return self

    def kafka_security_config(self) -> dict[str, Any]:
        """The librdkafka settings of the security group. Holds secrets: never log it."""
        conf: dict[str, Any] = {"security.protocol": self.kafka_security_protocol}
        mechanism = self.kafka_sasl_mechanism
        if self.kafka_security_protocol.startswith("SASL_") and mechanism is not None:
            conf["sasl.mechanism"] = mechanism
            if mechanism == "OAUTHBEARER":
                # librdkafka fetches and refreshes tokens itself (client credentials grant).
                conf["sasl.oauthbearer.method"] = "oidc"
                conf["sasl.oauthbearer.token.endpoint.url"] = self.kafka_oauth_token_url
                conf["sasl.oauthbearer.client.id"] = self.kafka_oauth_client_id
                conf["sasl.oauthbearer.client.secret"] = _secret(self.kafka_oauth_client_secret)
                if self.kafka_oauth_scope:
                    conf["sasl.oauthbearer.scope"] = self.kafka_oauth_scope
            else:
                conf["sasl.username"] = self.kafka_sasl_username
                conf["sasl.password"] = _secret(self.kafka_sasl_password)
        if self.kafka_security_protocol.endswith("SSL"):
            if self.kafka_ssl_ca_file is not None:
                conf["ssl.ca.location"] = str(self.kafka_ssl_ca_file)
            if self.kafka_ssl_cert_file is not None:
                conf["ssl.certificate.location"] = str(self.kafka_ssl_cert_file)
            if self.kafka_ssl_key_file is not None:
                conf["ssl.key.location"] = str(self.kafka_ssl_key_file)
            if self.kafka_ssl_key_password is not None:
                conf["ssl.key.password"] = _secret(self.kafka_ssl_key_password)
        return conf

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings every Herald client starts from: the cluster, the client id
        and the security group; ``extra`` adds or overrides."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "client.id": self.client_id,
            **self.kafka_security_config(),
        }
        conf.update(extra)
        return conf

    def producer_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings for an idempotent producer."""
        conf: dict[str, Any] = {
            **self.client_config(),
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
            **self.client_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.sink_session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.sink_session_timeout_ms // 5),
            **PREFETCH,
        }
        if self.sink_instance_id:
            conf["group.instance.id"] = self.sink_instance_id
        conf.update(extra)
        return conf

    def schema_registry_config(self) -> dict[str, Any]:
        """SchemaRegistryClient settings for SCHEMA_REGISTRY_URL, with the secrets in clear:
        for the client only, never to be logged. A short timeout and no retries of the
        client's own: the caller (router, sink) holds the record and retries with backoff,
        without blocking its event loop for long."""
        if not self.schema_registry_url:
            raise ValueError("SCHEMA_REGISTRY_URL is not set")
        basic, token = self.schema_registry_basic_auth_user_info, self.schema_registry_bearer_token
        if basic is not None and token is not None:
            raise ValueError(
                "set HERALD_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO or "
                "HERALD_SCHEMA_REGISTRY_BEARER_TOKEN, not both"
            )
        # Credentials in the URL (https://user:password@host) become basic auth: the HTTP
        # client logs every request's URL, which must not carry them.
        url, url_user_info = _without_user_info(self.schema_registry_url)
        conf: dict[str, Any] = {"url": url, "timeout": 5, "max.retries": 0}
        if url_user_info is not None:
            if basic is not None or token is not None:
                raise ValueError(
                    "SCHEMA_REGISTRY_URL holds credentials and so does "
                    "HERALD_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO or _BEARER_TOKEN: keep one"
                )
            conf["basic.auth.user.info"] = url_user_info
        if basic is not None:
            user_info = basic.get_secret_value()
            if ":" not in user_info:
                raise ValueError("HERALD_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO is USER:PASSWORD")
            conf["basic.auth.user.info"] = user_info
        if token is not None:
            conf["bearer.auth.credentials.source"] = "STATIC_TOKEN"
            conf["bearer.auth.token"] = token.get_secret_value()
            conf["bearer.auth.logical.cluster"] = self.schema_registry_bearer_logical_cluster
            if self.schema_registry_bearer_identity_pool:
                conf["bearer.auth.identity.pool.id"] = self.schema_registry_bearer_identity_pool
        if self.schema_registry_ca_file is not None:
            conf["ssl.ca.location"] = str(self.schema_registry_ca_file)
        return conf

    def router_consumer_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings for the router's consumer: no automatic commits (offsets
        go with the transaction, or after the outputs are acknowledged), committed reads."""
        conf: dict[str, Any] = {
            **self.client_config(),
            "group.id": self.router_app_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(self.router_session_timeout_s * 1000),
            "heartbeat.interval.ms": max(500, int(self.router_session_timeout_s * 200)),
            **PREFETCH,
        }
        conf.update(extra)
        return conf

    def admin_config(self, **extra: Any) -> dict[str, Any]:
        return self.client_config(**extra)


# What a consumer fetches ahead of its application. librdkafka's defaults (100,000 records
# per partition, 64 MiB) let a router or sink facing a backlog of small records hold hundreds
# of thousands of them in memory, which buys nothing once a batch is always waiting: at most
# 2,000 per partition and 8 MiB in all (still several records of the largest size Herald
# writes, HERALD_MAX_RECORD_BYTES). A partition over those bounds is fetched again after
# fetch.queue.backoff.ms, by default a second: which a sink whose window drains its queue
# in milliseconds would add to every notification's latency.
PREFETCH: dict[str, Any] = {
    "queued.min.messages": 2000,
    "queued.max.messages.kbytes": 8192,
    "fetch.queue.backoff.ms": 10,
}


def _without_user_info(urls: str) -> tuple[str, str | None]:
    """``urls`` (comma-separated, as the registry client takes them) without user info, and
    the user info ("user:password", percent-decoded) they held, if any."""
    found: set[str] = set()
    out = []
    for url in urls.split(","):
        parts = urlsplit(url.strip())
        if parts.username is not None or parts.password is not None:
            found.add(f"{unquote(parts.username or '')}:{unquote(parts.password or '')}")
            netloc = parts.netloc.rpartition("@")[2]
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        out.append(url.strip())
    if len(found) > 1:
        raise ValueError("SCHEMA_REGISTRY_URL holds different credentials for its URLs")
    return ",".join(out), next(iter(found), None)


def _env(name: str) -> str:
    """The variable of a security setting named without its kafka_ prefix."""
    return f"{ENV_PREFIX}KAFKA_{name.upper()}"


def _set_names(settings: HeraldSettings) -> list[str]:
    """Security settings that hold a value, without their kafka_ prefix."""
    names = []
    for field in type(settings).model_fields:
        if field.startswith(("kafka_sasl_", "kafka_oauth_", "kafka_ssl_")):
            value = getattr(settings, field)
            if value is not None and value != "":
                names.append(field.removeprefix("kafka_"))
    return names


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
