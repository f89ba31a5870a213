"""Shared fixtures for the pure-logic unit tests: the real schemas/ and config/ of the
checkout, a serializer without a registry, and sample events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.router.rules import RuleSet, load_rules
from pipeline.router.templates import Templates
from pipeline.schemas import SchemaSet, load_schemas
from pipeline.serialization import AvroSerde
from pipeline.settings import project_root

ROOT = project_root()
SCHEMAS_DIR = ROOT / "schemas"
RULES_FILE = ROOT / "config" / "rules.toml"
TEMPLATES_DIR = ROOT / "config" / "templates"

USER_REGISTERED = "herald.events.UserRegistered"
PASSWORD_RESET = "herald.events.PasswordResetRequested"
ORDER_SHIPPED = "herald.events.OrderShipped"

# A fixed instant with whole milliseconds, so it survives timestamp-millis unchanged.
NOW = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)


@pytest.fixture(scope="session")
def schemas() -> SchemaSet:
    return load_schemas(SCHEMAS_DIR)


@pytest.fixture
def serde(schemas: SchemaSet) -> AvroSerde:
    return AvroSerde(schemas)


@pytest.fixture(scope="session")
def rules() -> RuleSet:
    return load_rules(RULES_FILE)


@pytest.fixture(scope="session")
def templates() -> Templates:
    return Templates(TEMPLATES_DIR)


def envelope(**overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "event_id": str(uuid.UUID("0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e")),
        "occurred_at": NOW,
        "producer": "unit-tests",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    env.update(overrides)
    return env


def user_registered(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "envelope": envelope(),
        "user_id": "u-42",
        "email": "ada@example.com",
        "display_name": "Ada",
        "locale": "en-GB",
    }
    record.update(overrides)
    return record


def order_shipped(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "envelope": envelope(),
        "order_id": "o-1",
        "user_id": "u-42",
        "email": "ada@example.com",
        "carrier": "DHL",
        "tracking_number": "TN123",
        "tracking_url": None,
        "items": [{"sku": "sku-1", "name": "Widget", "quantity": 2}],
    }
    record.update(overrides)
    return record


def write_template(directory: Path, name: str, **parts: str) -> None:
    """Write ``parts`` (subject="...", body_txt="...", body_html="...") as a template."""
    target = directory / name
    target.mkdir(parents=True, exist_ok=True)
    for part, text in parts.items():
        (target / part.replace("_", ".")).write_text(text)
