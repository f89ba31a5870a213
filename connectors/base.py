"""The connector interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from pydantic_settings import BaseSettings

from pipeline.records import NotificationIntent

__all__ = ["TRACEPARENT", "Connector", "DeliveryResult", "Outcome", "trace_headers"]

#: The W3C traceparent of the send in progress, set by the sink runtime around each
#: ``Connector.send`` (the span of that provider call when tracing is on, else the intent's
#: own). A connector puts it on its provider request where the protocol has a place for it:
#: the HTTP connectors send it as the ``traceparent`` header (connectors/http.py).
TRACEPARENT: ContextVar[str | None] = ContextVar("herald_traceparent", default=None)


def trace_headers() -> dict[str, str]:
    """``{"traceparent": ...}`` for the send in progress, or nothing."""
    value = TRACEPARENT.get()
    return {"traceparent": value} if value else {}


class Outcome(StrEnum):
    SENT = "sent"  # the provider accepted it; never send it again
    RETRYABLE = "retryable"  # a passing failure (4xx SMTP, 429/5xx HTTP, timeout, network)
    REJECTED = "rejected"  # the provider or our validation refused it for good


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Outcome
    response: str | None = None  # the provider's answer, as it said it
    provider_message_id: str | None = None
    error_class: str | None = None
    # Seconds, when the provider said how long to wait (HTTP Retry-After, SMTP 421): on a
    # RETRYABLE result the sink pauses the channel that long (see Connector.send).
    retry_after: float | None = None

    @classmethod
    def sent(cls, response: str | None = None, message_id: str | None = None) -> Self:
        return cls(Outcome.SENT, response, message_id)

    @classmethod
    def retryable(
        cls, error_class: str, response: str | None = None, retry_after: float | None = None
    ) -> Self:
        return cls(Outcome.RETRYABLE, response, None, error_class, retry_after)

    @classmethod
    def rejected(cls, error_class: str, response: str | None = None) -> Self:
        return cls(Outcome.REJECTED, response, None, error_class)


class Connector(ABC):
    """Delivers intents on one channel.

    Subclasses set ``channel`` and declare the provider's limits in the three attributes
    below; the sink runtime enforces them, the same way for every connector, so a connector
    holds no semaphore or rate limiter of its own. They implement ``send`` and, when they
    hold connections, ``aclose``.
    """

    #: The channel name, as in rules and topic names. Unique across installed connectors.
    channel: ClassVar[str]

    # Limits. Class attributes; a connector whose limit comes from its settings (a pool
    # size) may set one on the instance in __init__: the runtime reads them from the
    # instance once, when the sink worker is built. None means no limit.

    #: Most bytes the provider takes, as measured by ``body_bytes()``. Enforced by the sink
    #: runtime before any provider call: a larger intent is REJECTED with error class
    #: ``PayloadTooLarge`` (its size and this limit in the message) and dead-lettered.
    max_body_bytes: int | None = None
    #: Most sends in flight to the provider at once in one sink process, across all the
    #: partitions it holds. Enforced by the sink runtime around ``send()``; without it only
    #: the in-flight windows (``HERALD_SINK_MAX_IN_FLIGHT`` per partition) bound it.
    max_concurrency: int | None = None
    #: Most sends per second one sink process starts: a token bucket in the sink runtime
    #: holding one second's worth, so a burst after a quiet spell is at most
    #: ``max(1, rate_per_second)`` sends. Several sink processes each get this rate.
    rate_per_second: float | None = None

    #: The connector's own settings: a pydantic-settings class with its own env prefix
    #: (e.g. HERALD_WEBHOOK_), secrets as SecretStr. `herald connectors list` shows them.
    #: The connector is built from an instance of it and from nothing else: it never sees
    #: Herald's core settings (Kafka, ledger, topics).
    settings_class: ClassVar[type[BaseSettings]]

    def __init__(self, settings: Any) -> None:  # noqa: B027 - a signature for from_env
        """Subclasses take an instance of their ``settings_class``."""

    @classmethod
    def setting_names(cls) -> list[str]:
        """Environment variable names of the connector's settings."""
        prefix = str(cls.settings_class.model_config.get("env_prefix", ""))
        return [f"{prefix}{name}".upper() for name in cls.settings_class.model_fields]

    @classmethod
    def from_env(cls) -> Self:
        """Build the connector from its settings as the environment gives them. Called once
        per sink process, before consuming starts; invalid settings raise pydantic's
        ValidationError, which stops the process naming the variable."""
        return cls(cls.settings_class())

    @abstractmethod
    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        """Deliver one intent. Called concurrently, for intents of one partition and of
        several, up to ``max_concurrency`` at once and ``rate_per_second``, and never for an
        intent over ``max_body_bytes`` (the runtime rejects those). Must not raise for a
        provider failure: return RETRYABLE or REJECTED. An exception is treated as
        RETRYABLE. A RETRYABLE with ``retry_after`` (the provider said how long to wait)
        pauses the whole channel for that long, up to ``HERALD_SINK_MAX_THROTTLE_MS``, and
        the same attempt is sent again afterwards."""

    def body_bytes(self, intent: NotificationIntent) -> int:
        """The size checked against ``max_body_bytes``: the UTF-8 bytes of the subject, the
        text body and the HTML body. The one definition the runtime uses; a connector whose
        payload is larger (a JSON envelope) may override it to measure what it sends, never
        less than this."""
        return sum(
            len(part.encode("utf-8"))
            for part in (intent.subject, intent.body_text, intent.body_html)
            if part
        )

    @classmethod
    def describe_address(cls, recipient: str) -> str:
        """The recipient as statuses, the ledger and logs show it. Override when the
        address holds a secret (a push subscription carries its auth key). A class method:
        the router calls it without a connector (SUPPRESSED statuses, suppression keys)."""
        return recipient

    def describe_recipient(self, recipient: str) -> str:
        """``describe_address`` for this connector's intents (what the sink calls)."""
        return type(self).describe_address(recipient)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Called once when the sink stops."""
