"""The Avro schemas in schemas/, loaded once and indexed for encoding and decoding.

Layout: ``schemas/common/*.avsc`` holds named types shared by reference (the event envelope);
every other ``.avsc`` file is one version of one record, named ``<Name>.v<N>.avsc``. A schema
is used in its *expanded* form (shared types inlined), which is what gets fingerprinted and
registered, so a record can be read without knowing about schemas/ layout.

Event schemas carry Herald attributes (ignored by Avro): ``herald.event_type``,
``herald.domain`` (the events.<domain> topic) and ``herald.key`` (the field used as record key).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

__all__ = [
    "EventType",
    "Schema",
    "SchemaError",
    "SchemaSet",
    "load_schemas",
]

_VERSIONED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>\d+)\.avsc$")


class SchemaError(ValueError):
    """A schema file is invalid, or a schema was asked for that does not exist."""


@dataclass(frozen=True)
class Schema:
    """One version of one record schema."""

    full_name: str
    version: int
    path: Path
    definition: dict[str, Any]  # expanded JSON, as registered with a schema registry
    parsed: Any = field(repr=False, compare=False)  # fastavro's parsed form
    fingerprint: bytes  # CRC-64-AVRO of the Parsing Canonical Form, 8 bytes little-endian

    @property
    def canonical(self) -> str:
        return str(to_parsing_canonical_form(self.parsed))

    def to_json(self) -> str:
        return json.dumps(self.definition, separators=(",", ":"))


@dataclass(frozen=True)
class EventType:
    """A domain event type, as declared by the herald.* attributes of its schema."""

    name: str  # e.g. "user-registered"
    domain: str  # topic events.<domain>
    key_field: str  # record field used as the Kafka key
    full_name: str  # Avro full name, e.g. herald.events.UserRegistered


class SchemaSet:
    """All versions of all schemas, by name and by fingerprint."""

    def __init__(self, schemas: list[Schema]) -> None:
        self._by_name: dict[str, list[Schema]] = {}
        self._by_fingerprint: dict[bytes, Schema] = {}
        for s in schemas:
            self._by_name.setdefault(s.full_name, []).append(s)
            self._by_fingerprint[s.fingerprint] = s
        for versions in self._by_name.values():
            versions.sort(key=lambda s: s.version)
        self._event_types: dict[str, EventType] = {}
        for name, versions in self._by_name.items():
            latest = versions[-1].definition
            if "herald.event_type" in latest:
                et = EventType(
                    name=latest["herald.event_type"],
                    domain=latest["herald.domain"],
                    key_field=latest["herald.key"],
                    full_name=name,
                )
                self._event_types[et.name] = et

    def __iter__(self) -> Iterator[Schema]:
        for versions in self._by_name.values():
            yield from versions

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, full_name: str) -> list[Schema]:
        try:
            return list(self._by_name[full_name])
        except KeyError:
            raise SchemaError(
                f"no schema named {full_name!r} in schemas/; known: {', '.join(self.names())}"
            ) from None

    def latest(self, full_name: str) -> Schema:
        return self.versions(full_name)[-1]

    def by_fingerprint(self, fp: bytes) -> Schema | None:
        return self._by_fingerprint.get(fp)

    def event_type(self, name: str) -> EventType:
        try:
            return self._event_types[name]
        except KeyError:
            known = ", ".join(sorted(self._event_types))
            raise SchemaError(f"unknown event type {name!r}; known: {known}") from None

    def domains(self) -> list[str]:
        """The domains the event schemas declare: one events.<domain> topic each."""
        return sorted({et.domain for et in self._event_types.values()})

    def event_types(self) -> list[EventType]:
        return sorted(self._event_types.values(), key=lambda e: e.name)

    def event_type_of(self, full_name: str) -> EventType | None:
        for et in self._event_types.values():
            if et.full_name == full_name:
                return et
        return None


def _full_name(definition: dict[str, Any]) -> str:
    name = str(definition["name"])
    ns = definition.get("namespace")
    return name if "." in name or not ns else f"{ns}.{name}"


def _inline(node: Any, shared: dict[str, dict[str, Any]], seen: set[str]) -> Any:
    """Replace references to shared named types with their definitions (the first
    occurrence only: Avro forbids defining a name twice)."""
    if isinstance(node, str):
        if node in shared and node not in seen:
            seen.add(node)
            return _inline(copy.deepcopy(shared[node]), shared, seen)
        return node
    if isinstance(node, list):
        return [_inline(n, shared, seen) for n in node]
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out[k] = _inline(v, shared, seen) if k in ("type", "items", "values", "fields") else v
        return out
    return node


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("type") != "record":
        raise SchemaError(f"{path}: a schema file must hold one record schema")
    return data


@cache
def load_schemas(root: Path) -> SchemaSet:
    """Load and check every schema under ``root``. Cached per directory."""
    shared = {_full_name(d): d for d in map(_read, sorted((root / "common").glob("*.avsc")))}
    schemas: list[Schema] = []
    for path in sorted(root.rglob("*.avsc")):
        if path.parent == root / "common":
            continue
        m = _VERSIONED.match(path.name)
        if not m:
            raise SchemaError(f"{path}: schema files are named <Name>.v<N>.avsc")
        definition = _inline(_read(path), shared, set())
        if _full_name(definition).rsplit(".", 1)[-1] != m["name"]:
            raise SchemaError(
                f"{path}: file name does not match record name {_full_name(definition)}"
            )
        try:
            parsed = fastavro.parse_schema(definition, _write_hint=False)
        except Exception as e:
            raise SchemaError(f"{path}: invalid Avro schema: {e}") from e
        pcf = to_parsing_canonical_form(parsed)
        fp = bytes.fromhex(fingerprint(pcf, "CRC-64-AVRO"))
        # fastavro's hex is already the little-endian byte order that the single-object
        # encoding stores (checked against Avro's test vector: "int" -> 0x7275d51a3f395c8f).
        schemas.append(
            Schema(
                full_name=_full_name(definition),
                version=int(m["version"]),
                path=path,
                definition=definition,
                parsed=parsed,
                fingerprint=fp,
            )
        )
    return SchemaSet(schemas)
