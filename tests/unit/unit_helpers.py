"""Sample data and paths shared by the unit tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.settings import project_root

ROOT = project_root()
SCHEMAS_DIR = ROOT / "schemas"
RULES_FILE = ROOT / "config" / "rules.toml"
TEMPLATES_DIR = ROOT / "config" / "templates"

USER_REGISTERED = "herald.events.UserRegistered"
RESET_REQUESTED = "herald.events.PasswordResetRequested"
ORDER_SHIPPED = "herald.events.OrderShipped"

# A fixed instant with whole milliseconds, so it survives timestamp-millis unchanged.
NOW = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)


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
        "phone": None,
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
    files = {"subject": "subject.txt", "body_txt": "body.txt", "body_html": "body.html"}
    for part, text in parts.items():
        (target / files[part]).write_text(text)


# -- sample records generated from a schema ------------------------------------------------

_TYPICAL: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "int": 7,
    "long": 1_234_567_890_123,
    "float": 1.5,
    "double": 2.25,
    "bytes": b"\x00bytes\xff",
    "string": "typical text",
}

_LOGICAL: dict[str, Any] = {
    "uuid": str(uuid.UUID("8a3e4f1c-2b6d-4c9e-8f7a-1b2c3d4e5f60")),
    "timestamp-millis": NOW,
    "timestamp-micros": NOW,
    "local-timestamp-millis": NOW.replace(tzinfo=None),
    "local-timestamp-micros": NOW.replace(tzinfo=None),
    "date": NOW.date(),
    "time-millis": NOW.time().replace(tzinfo=None),
    "time-micros": NOW.time().replace(tzinfo=None),
}


def sample_record(parsed_schema: Any, *, use_defaults: bool = False) -> Any:
    """A value for a fastavro-parsed schema. ``use_defaults`` takes each field's default when
    it has one (the smallest record); otherwise every field gets a typical non-null value, so
    unions, arrays and maps are exercised with content."""
    named: dict[str, Any] = {}

    def collect(schema: Any) -> None:
        if isinstance(schema, list):
            for branch in schema:
                collect(branch)
        elif isinstance(schema, dict):
            if schema.get("type") in ("record", "error", "enum", "fixed") and "name" in schema:
                named[schema["name"]] = schema
            for f in schema.get("fields", ()):
                collect(f["type"])
            for key in ("items", "values"):
                if key in schema:
                    collect(schema[key])

    collect(parsed_schema)

    def gen(schema: Any) -> Any:
        if isinstance(schema, str):
            if schema in _TYPICAL:
                return _TYPICAL[schema]
            return gen(named[schema])
        if isinstance(schema, list):  # union: first non-null branch
            branches = [b for b in schema if b != "null"] or ["null"]
            return gen(branches[0])
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical in _LOGICAL:
            return _LOGICAL[logical]
        if logical == "decimal":
            from decimal import Decimal

            return Decimal(1).scaleb(-int(schema.get("scale", 0)))
        if kind in ("record", "error"):
            out = {}
            for f in schema["fields"]:
                out[f["name"]] = f["default"] if use_defaults and "default" in f else gen(f["type"])
            return out
        if kind == "enum":
            return schema["symbols"][0]
        if kind == "array":
            return [gen(schema["items"])]
        if kind == "map":
            return {"key": gen(schema["values"])}
        if kind == "fixed":
            return b"\x01" * schema["size"]
        return gen(kind)  # {"type": "string"} and the like

    return gen(parsed_schema)
