"""schemas/: every file parses, event types are declared, fingerprints are right and unique."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastavro.schema import fingerprint

from pipeline.schemas import SchemaError, SchemaSet, load_schemas
from tests.unit.unit_helpers import SCHEMAS_DIR

# Avro specification, "Schema Fingerprints": the 64-bit Rabin fingerprint.
_EMPTY64 = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro spec's reference implementation computes it."""
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_reference_implementation_matches_avro_test_vector() -> None:
    # share/test/data/schema-tests.txt in apache/avro: "int" -> 8247732601305521295
    assert crc64_avro(b'"int"') == 0x7275D51A3F395C8F == 8247732601305521295


def test_fastavro_fingerprint_hex_is_little_endian_crc64_avro() -> None:
    """load_schemas stores bytes.fromhex(fastavro's hex) as the single-object fingerprint,
    which the Avro spec says is the 64-bit fingerprint in little-endian order."""
    raw = bytes.fromhex(fingerprint('"int"', "CRC-64-AVRO"))
    assert len(raw) == 8
    assert int.from_bytes(raw, "little") == 0x7275D51A3F395C8F
    assert raw == (0x7275D51A3F395C8F).to_bytes(8, "little")


def test_every_schema_file_parses(schemas: SchemaSet) -> None:
    files = sorted(p for p in SCHEMAS_DIR.rglob("*.avsc") if p.parent.name != "common")
    assert files, "no schemas found"
    assert sorted(s.path for s in schemas) == files


def test_every_schema_is_self_contained(schemas: SchemaSet) -> None:
    """The expanded definition names no shared type by reference: it can be registered and
    read without schemas/common."""
    for s in schemas:
        assert "herald.Envelope" not in json.dumps(s.definition).replace(
            '"namespace": "herald"', ""
        ), s.path


@pytest.mark.parametrize(
    ("event_type", "full_name", "domain", "key_field"),
    [
        ("user-registered", "herald.events.UserRegistered", "user", "user_id"),
        ("password-reset-requested", "herald.events.PasswordResetRequested", "user", "user_id"),
        ("order-shipped", "herald.events.OrderShipped", "order", "user_id"),
    ],
)
def test_event_types_are_declared(
    schemas: SchemaSet, event_type: str, full_name: str, domain: str, key_field: str
) -> None:
    et = schemas.event_type(event_type)
    assert (et.name, et.full_name, et.domain, et.key_field) == (
        event_type,
        full_name,
        domain,
        key_field,
    )
    assert schemas.event_type_of(full_name) == et


def test_every_event_type_has_a_known_domain_and_key_field(schemas: SchemaSet) -> None:
    assert schemas.event_types()
    for et in schemas.event_types():
        assert et.domain in schemas.domains(), et
        assert et.domain.isidentifier(), et  # it names a topic: events.<domain>
        fields = {f["name"] for f in schemas.latest(et.full_name).definition["fields"]}
        assert et.key_field in fields, et
        assert "envelope" in fields, et


def test_notification_records_are_not_event_types(schemas: SchemaSet) -> None:
    assert schemas.event_type_of("herald.notifications.NotificationIntent") is None
    with pytest.raises(SchemaError, match="unknown event type 'nope'"):
        schemas.event_type("nope")
    with pytest.raises(SchemaError, match="no schema named"):
        schemas.versions("herald.Nope")


def test_fingerprints_are_unique(schemas: SchemaSet) -> None:
    fps = [s.fingerprint for s in schemas]
    assert len(fps) == len(set(fps))
    for s in schemas:
        assert schemas.by_fingerprint(s.fingerprint) is s


def test_fingerprints_are_crc64_avro_of_the_canonical_form(schemas: SchemaSet) -> None:
    for s in schemas:
        assert len(s.fingerprint) == 8
        assert s.fingerprint == crc64_avro(s.canonical.encode()).to_bytes(8, "little"), s.path


def test_versions_are_sorted_and_latest_is_newest(schemas: SchemaSet) -> None:
    for name in schemas.names():
        versions = [s.version for s in schemas.versions(name)]
        assert versions == sorted(versions)
        assert len(versions) == len(set(versions)), f"{name} has a version twice"
        assert schemas.latest(name).version == versions[-1]
    assert schemas.latest("herald.events.UserRegistered").version == 3


# -- invalid schema directories -------------------------------------------------------------

_RECORD = {"type": "record", "name": "Thing", "namespace": "t", "fields": []}


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("Thing.avsc", json.dumps(_RECORD), "named <Name>.v<N>.avsc"),
        ("Other.v1.avsc", json.dumps(_RECORD), "does not match record name"),
        ("Thing.v1.avsc", "{not json", "not valid JSON"),
        ("Thing.v1.avsc", '"string"', "one record schema"),
        (
            "Thing.v1.avsc",
            json.dumps({**_RECORD, "fields": [{"name": "x", "type": "nope"}]}),
            "invalid Avro schema",
        ),
    ],
    ids=["unversioned-name", "name-mismatch", "bad-json", "not-a-record", "bad-avro"],
)
def test_invalid_schema_files_raise_schema_error(
    tmp_path: Path, filename: str, content: str, message: str
) -> None:
    (tmp_path / "common").mkdir()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / filename).write_text(content)
    with pytest.raises(SchemaError, match=message) as info:
        load_schemas(tmp_path)
    assert filename in str(info.value)


def test_relative_schemas_dir_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SCHEMAS_DIR.parent)
    relative = load_schemas(Path("schemas"))
    assert {(s.full_name, s.version) for s in relative} == {
        (s.full_name, s.version) for s in load_schemas(SCHEMAS_DIR)
    }
