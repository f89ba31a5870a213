"""Backward transitive compatibility, generically over schemas/: every version of every
record reads data written with every older (and its own) version. A new .avsc file is
covered without touching this test."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest
from fastavro.validation import validate

from pipeline.schemas import Schema, SchemaSet, load_schemas
from pipeline.serialization import SINGLE_OBJECT_MAGIC, AvroSerde
from tests.unit.unit_helpers import SCHEMAS_DIR, sample_record


def _pairs() -> list[tuple[Schema, Schema]]:
    schemas = load_schemas(SCHEMAS_DIR)
    return [
        (writer, reader)
        for name in schemas.names()
        for reader in schemas.versions(name)
        for writer in schemas.versions(name)
        if writer.version <= reader.version
    ]


def _id(pair: tuple[Schema, Schema]) -> str:
    writer, reader = pair
    return f"{writer.full_name}:v{writer.version}->v{reader.version}"


PAIRS = _pairs()


def test_there_is_at_least_one_evolved_schema() -> None:
    assert any(w.version < r.version for w, r in PAIRS), "no schema has two versions"


def _write(schema: Schema, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def _normalize(value: Any) -> Any:
    """Compare logical values as text (uuid strings come back as UUID objects)."""
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if value.__class__.__name__ == "UUID":
        return str(value)
    return value


def _fields(schema: Schema) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in schema.parsed["fields"]}


@pytest.mark.parametrize("use_defaults", [False, True], ids=["typical", "defaults"])
@pytest.mark.parametrize("pair", PAIRS, ids=[_id(p) for p in PAIRS])
def test_newer_version_reads_older_data(pair: tuple[Schema, Schema], use_defaults: bool) -> None:
    writer, reader = pair
    record = sample_record(writer.parsed, use_defaults=use_defaults)
    assert validate(record, writer.parsed, raise_errors=True)
    data = _write(writer, record)

    buf = io.BytesIO(data)
    read = fastavro.schemaless_reader(buf, writer.parsed, reader.parsed)
    assert buf.tell() == len(data)

    assert set(read) == set(_fields(reader))
    written = _normalize(record)
    for name, field in _fields(reader).items():
        if name in written:
            assert _normalize(read[name]) == written[name], name
        else:
            assert "default" in field, f"{reader.path}: new field {name!r} has no default"
            assert _normalize(read[name]) == _normalize(field["default"]), name


@pytest.mark.parametrize("pair", PAIRS, ids=[_id(p) for p in PAIRS])
def test_serde_reads_every_version_into_the_newest(
    schemas: SchemaSet, pair: tuple[Schema, Schema]
) -> None:
    """The single-object reader resolves any known writer version to the newest version."""
    writer, _ = pair
    data = SINGLE_OBJECT_MAGIC + writer.fingerprint + _write(writer, sample_record(writer.parsed))
    decoded = AvroSerde(schemas).decode(data)
    assert decoded.schema == schemas.latest(writer.full_name)
    assert decoded.writer == f"{writer.full_name}@{writer.fingerprint.hex()}"
    assert set(decoded.record) == set(_fields(schemas.latest(writer.full_name)))


def _enums(schema: Schema) -> dict[str, dict[str, Any]]:
    """Top-level fields whose type is an enum, by field name."""
    return {
        name: f["type"]
        for name, f in _fields(schema).items()
        if isinstance(f["type"], dict) and f["type"].get("type") == "enum"
    }


@pytest.mark.parametrize("pair", PAIRS, ids=[_id(p) for p in PAIRS])
def test_every_enum_symbol_an_older_version_writes_is_read_by_newer_ones(
    pair: tuple[Schema, Schema],
) -> None:
    """The sample records above carry only an enum's first symbol; try every one."""
    writer, reader = pair
    for name, enum in _enums(writer).items():
        for symbol in enum["symbols"]:
            record = {**sample_record(writer.parsed), name: symbol}
            read = fastavro.schemaless_reader(
                io.BytesIO(_write(writer, record)), writer.parsed, reader.parsed
            )
            assert read[name] == symbol


@pytest.mark.parametrize("pair", PAIRS, ids=[_id(p) for p in PAIRS])
def test_an_enum_that_gains_symbols_has_a_default_from_then_on(
    pair: tuple[Schema, Schema],
) -> None:
    """Avro resolves a symbol the reader does not know to the READER's enum default, and
    fails without one. A reader without a default can never be helped afterwards, so the
    version that first adds a symbol also adds a default, and later additions are readable
    by every version from then on."""
    writer, reader = pair
    for name, enum in _enums(reader).items():
        older = _enums(writer).get(name)
        if older is not None and set(enum["symbols"]) - set(older["symbols"]):
            assert enum.get("default") in enum["symbols"], f"{reader.path}: {name} has no default"
