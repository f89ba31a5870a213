"""Channel connectors: one module per channel, each a Connector subclass.

A connector turns a NotificationIntent into one provider call and says how it went. It knows
nothing of Kafka, offsets, retries or the ledger: those belong to the sink runtime.
"""

from connectors.base import Connector, DeliveryResult, Outcome
from connectors.registry import DuplicateChannelError, UnknownChannelError, load_connectors

__all__ = [
    "Connector",
    "DeliveryResult",
    "DuplicateChannelError",
    "Outcome",
    "UnknownChannelError",
    "load_connectors",
]
