"""Plausible example records built from an Avro schema, in the form the readers decode them
to (timestamps as datetimes, uuids as strings), for checking rules and templates before any
real event arrives.

Strings are "example" (or an address, a phone number, a URL when the field's name says so),
numbers 1, booleans true, enums their first symbol, arrays and maps one item. Optional fields
(a union with null) are null in the ``minimal`` record and filled in the ``full`` one, so a
template is tried both on the fields an event must have and on all it may have.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

__all__ = ["example_record"]

_NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def example_record(definition: dict[str, Any], *, full: bool = False) -> dict[str, Any]:
    """An example of the record schema ``definition`` (named types inlined, as
    pipeline.schemas keeps them). ``full``: optional fields get values instead of null."""
    value = _Examples(full).value(definition, "")
    if not isinstance(value, dict):
        raise ValueError("example_record takes a record schema")
    return value


class _Examples:
    def __init__(self, full: bool) -> None:
        self.full = full
        self.named: dict[str, Any] = {}

    def value(self, schema: Any, field: str, namespace: str | None = None) -> Any:
        if isinstance(schema, list):
            branches = [b for b in schema if b != "null"]
            if "null" in schema and (not self.full or not branches):
                return None
            return self.value(branches[0], field, namespace)
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return self._primitive(schema, field, None)
            name = schema if "." in schema or not namespace else f"{namespace}.{schema}"
            target = self.named.get(name, self.named.get(schema))
            if target is None:
                raise ValueError(f"unknown named type {schema!r}")
            return self.value(target, field, namespace)
        kind = schema.get("type")
        if kind in ("record", "enum", "fixed"):
            ns = schema.get("namespace", namespace)
            name = str(schema["name"])
            self.named[name if "." in name or not ns else f"{ns}.{name}"] = schema
            if kind == "enum":
                return schema["symbols"][0]
            if kind == "fixed":
                return b"\0" * int(schema["size"])
            return {
                f["name"]: self.value(f["type"], f["name"], ns) for f in schema.get("fields", [])
            }
        if kind == "array":
            return [self.value(schema["items"], field, namespace)]
        if kind == "map":
            return {"key": self.value(schema["values"], field, namespace)}
        if isinstance(kind, list | dict):
            return self.value(kind, field, namespace)
        return self._primitive(str(kind), field, schema.get("logicalType"))

    @staticmethod
    def _primitive(kind: str, field: str, logical: str | None) -> Any:
        if logical in ("timestamp-millis", "timestamp-micros"):
            return _NOW
        if logical == "date":
            return date(2026, 1, 2)
        if logical == "decimal":
            return Decimal(1)
        if logical == "uuid":
            return str(uuid.UUID(int=1))
        name = field.lower()
        if kind == "string":
            if "email" in name:
                return "user@example.com"
            if "phone" in name:
                return "+14155550100"
            if name.endswith("url"):
                return "https://example.com/"
            return "example"
        return {
            "null": None,
            "boolean": True,
            "int": 1,
            "long": 1,
            "float": 1.0,
            "double": 1.0,
            "bytes": b"example",
        }[kind]
