"""Connector registry: built from the ``herald.connectors`` entry points, so a package that
declares one adds a channel without touching Herald."""

from __future__ import annotations

from importlib.metadata import entry_points

from connectors.base import Connector

__all__ = [
    "DuplicateChannelError",
    "UnknownChannelError",
    "connector_class",
    "installed_channels",
    "load_connectors",
]

GROUP = "herald.connectors"


class DuplicateChannelError(RuntimeError):
    """Two installed connectors claim the same channel name."""


class UnknownChannelError(KeyError):
    """No installed connector serves the channel."""


def load_connectors() -> dict[str, type[Connector]]:
    found: dict[str, type[Connector]] = {}
    origin: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a Connector subclass")
        if cls.channel in found:
            raise DuplicateChannelError(
                f"channel {cls.channel!r} is claimed by both {origin[cls.channel]} and {ep.value}"
            )
        found[cls.channel] = cls
        origin[cls.channel] = ep.value
    return found


def installed_channels() -> list[str]:
    """The channels rules, the API and topic creation accept: one per installed connector."""
    return sorted(load_connectors())


def connector_class(channel: str) -> type[Connector]:
    connectors = load_connectors()
    try:
        return connectors[channel]
    except KeyError:
        raise UnknownChannelError(
            f"no connector for channel {channel!r}; installed: {', '.join(sorted(connectors))}"
        ) from None
