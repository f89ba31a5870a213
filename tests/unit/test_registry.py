"""The connector registry, from the herald.connectors entry points."""

from __future__ import annotations

import pytest

from connectors.base import Connector
from connectors.email import EmailConnector
from connectors.registry import UnknownChannelError, connector_class, load_connectors


def test_email_connector_is_registered() -> None:
    connectors = load_connectors()
    assert connectors["email"] is EmailConnector
    assert all(issubclass(c, Connector) for c in connectors.values())
    assert all(name == c.channel for name, c in connectors.items())


def test_connector_class() -> None:
    assert connector_class("email") is EmailConnector
    with pytest.raises(UnknownChannelError, match="pigeon"):
        connector_class("pigeon")
