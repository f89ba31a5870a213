"""The connector interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from pydantic_settings import BaseSettings

from pipeline.records import NotificationIntent

__all__ = ["Connector", "DeliveryResult", "Outcome"]


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
    retry_after: float | None = None  # seconds, when the provider said how long to wait

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

    Subclasses set ``channel`` and may declare their limits as class attributes; the sink
    runtime reads them. They implement ``send`` and, when they hold connections, ``aclose``.
    """

    #: The channel name, as in rules and topic names. Unique across installed connectors.
    channel: ClassVar[str]
    #: Most bytes of body the provider takes; larger intents are rejected before sending.
    max_body_bytes: ClassVar[int | None] = None
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
        """Deliver one intent. Called concurrently (up to the sink's in-flight limit) for
        intents of different partitions and of one partition. Must not raise for a provider
        failure: return RETRYABLE or REJECTED. An exception is treated as RETRYABLE."""

    def describe_recipient(self, recipient: str) -> str:
        """The recipient as statuses, the ledger and logs show it. Override when the
        address holds a secret (a push subscription carries its auth key)."""
        return recipient

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Called once when the sink stops."""
