"""Avro serialization with two framings behind one interface.

- Avro single-object encoding (``C3 01`` + 8-byte CRC-64-AVRO fingerprint + datum), resolved
  against schemas/. The default: no registry server needed.
- Confluent wire format (``00`` + 4-byte big-endian schema id + datum) with any
  Confluent-compatible Schema Registry. Subjects follow RecordNameStrategy (the record's full
  name), because one events.<domain> topic carries several event types.

Readers detect the framing from the first bytes, so a topic may hold both (for example while
migrating to a registry). A record is always read into the newest local version of its
schema (Avro schema resolution), so code sees one shape however old the data is.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar

import fastavro
from fastavro.validation import ValidationError as _FastavroValidationError

from pipeline.schemas import Schema, SchemaError, SchemaSet

if TYPE_CHECKING:
    from pipeline.settings import HeraldSettings

__all__ = [
    "CONFLUENT_MAGIC",
    "SINGLE_OBJECT_MAGIC",
    "AvroSerde",
    "DecodeError",
    "Decoded",
    "MalformedRecordError",
    "RecordTooLargeError",
    "RecordValidationError",
    "RegistryUnavailableError",
    "SchemaRegistry",
    "UnexpectedSchemaError",
    "UnknownFramingError",
    "UnknownSchemaError",
    "serde_from_settings",
    "through_registry_outage",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


class _Where(TypedDict):
    topic: str | None
    partition: int | None
    offset: int | None


class DecodeError(Exception):
    """A record's bytes could not be read. Says where the record is and what was wrong."""

    def __init__(
        self,
        reason: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        schema: str | None = None,
    ) -> None:
        self.reason = reason
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.schema = schema
        super().__init__(self._message())

    @property
    def where(self) -> str:
        if self.topic is None:
            return "record"
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def _message(self) -> str:
        schema = f" (schema {self.schema})" if self.schema else ""
        return f"{self.where}{schema}: {self.reason}"


class UnknownFramingError(DecodeError):
    """The first bytes are neither single-object encoding (C3 01) nor Confluent (00)."""


class UnknownSchemaError(DecodeError):
    """The fingerprint or registry id names a schema we cannot find."""


class MalformedRecordError(DecodeError):
    """The framing is fine but the Avro datum is truncated or corrupt."""


class RecordTooLargeError(DecodeError):
    """The record is over HERALD_MAX_RECORD_BYTES."""


class UnexpectedSchemaError(DecodeError):
    """A well-formed record of a type this reader does not take (e.g. an intent on an
    events topic)."""


class RegistryUnavailableError(Exception):
    """The schema registry could not answer (unreachable, timing out, 5xx, refusing our
    credentials). Transient: the record is fine, so a reader holds it and tries again
    instead of dead-lettering it."""

    def __init__(self, doing: str, cause: BaseException) -> None:
        self.doing = doing
        super().__init__(f"schema registry unavailable while {doing}: {_describe_failure(cause)}")


def _describe_failure(e: BaseException) -> str:
    # The registry client's errors may quote the URL, which can carry credentials
    # (https://user:secret@host): name the error class, the HTTP status and the registry's
    # own message, or the TLS failure's reason, never the exception's text.
    status = getattr(e, "http_status_code", None)
    if status is not None:
        hint = (
            "; check HERALD_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO or _BEARER_TOKEN"
            if status in (401, 403)
            else ""
        )
        return f"{type(e).__name__} (HTTP {status}, {getattr(e, 'error_message', '')}{hint})"
    tls = _tls_error(e)
    if tls is not None:
        return (
            f"{type(e).__name__} (TLS: {tls.reason or type(tls).__name__}; is "
            "HERALD_SCHEMA_REGISTRY_CA_FILE the CA that signed the registry's certificate?)"
        )
    return type(e).__name__


def _tls_error(e: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a connection failure (httpx wraps it twice), if any."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _registry_not_found(e: BaseException) -> bool:
    """A definite "no such schema" from the registry, as opposed to an outage."""
    return getattr(e, "http_status_code", None) == 404


class RecordValidationError(ValueError):
    """A record does not match its schema. ``fields`` names the offending field paths."""

    def __init__(self, schema: str, problems: list[tuple[str, str]]) -> None:
        self.schema = schema
        self.problems = problems
        self.fields = [field for field, _ in problems]
        super().__init__(f"invalid {schema}: " + "; ".join(f"{f}: {m}" for f, m in problems))


@dataclass(frozen=True)
class Decoded:
    schema: Schema  # the reader schema (newest local version of the writer's record)
    writer: str  # "<full name>@<fingerprint hex>" or "<full name>@registry:<id>"
    record: dict[str, Any]


class SchemaRegistry(Protocol):
    """The part of confluent_kafka's SchemaRegistryClient that Herald uses."""

    def register_schema(
        self, subject_name: str, schema: Any, normalize_schemas: bool = ...
    ) -> int: ...

    def get_schema(self, schema_id: int, *args: Any, **kwargs: Any) -> Any: ...


class AvroSerde:
    """Encodes and decodes Herald records. Thread-safe after construction, except for the
    registry id cache which only ever grows."""

    def __init__(
        self,
        schemas: SchemaSet,
        registry: SchemaRegistry | None = None,
        max_record_bytes: int = 1_000_000,
    ) -> None:
        self.schemas = schemas
        self.registry = registry
        self.max_record_bytes = max_record_bytes
        self._ids: dict[str, int] = {}  # full name -> registry id of our newest version
        self._by_id: dict[int, tuple[Schema, Any]] = {}  # registry id -> (reader, writer)
        self._marked: dict[bytes, Any] = {}  # fingerprint -> fastavro form with its marker

    def prepare(self, full_name: str) -> None:
        """Make sure ``full_name`` can be encoded without asking the registry later: registers
        it now when there is a registry. Raises RegistryUnavailableError."""
        if self.registry is not None:
            self._registry_id(self.schemas.latest(full_name))

    def close(self) -> None:
        """Close the registry client's connections (if there is one)."""
        close = getattr(self.registry, "close", None)
        if close is not None:
            close()

    # -- writing ---------------------------------------------------------------------------

    def validate(self, full_name: str, record: dict[str, Any]) -> Schema:
        schema = self.schemas.latest(full_name)
        # First without collecting errors: with raise_errors=True fastavro raises and
        # catches an exception for every union branch a value does not take (each
        # ["null", "string"] holding a string), which made validation ~6x slower. Only an
        # invalid record is validated again, to name its fields.
        parsed = self._fastavro(schema)
        if fastavro.validation.validate(record, parsed, raise_errors=False):
            return schema
        try:
            fastavro.validation.validate(record, parsed, raise_errors=True)
        except _FastavroValidationError as e:
            raise RecordValidationError(
                full_name, _problems(e, full_name, schema.definition)
            ) from None
        raise RecordValidationError(full_name, [("?", "does not match the schema")])

    def encode(self, full_name: str, record: dict[str, Any]) -> tuple[bytes, str]:
        """Encode ``record`` with the newest version of ``full_name``.
        Returns the bytes and the schema reference for the ``herald-schema`` header."""
        schema = self.validate(full_name, record)
        buf = io.BytesIO()
        if self.registry is None:
            buf.write(SINGLE_OBJECT_MAGIC)
            buf.write(schema.fingerprint)
            ref = f"{full_name}@{schema.fingerprint.hex()}"
        else:
            schema_id = self._registry_id(schema)
            buf.write(CONFLUENT_MAGIC)
            buf.write(struct.pack(">I", schema_id))
            ref = f"{full_name}@registry:{schema_id}"
        fastavro.schemaless_writer(buf, self._fastavro(schema), record)
        return buf.getvalue(), ref

    def _fastavro(self, schema: Schema) -> Any:
        """``schema`` as fastavro parses it for itself, with the marker that tells fastavro
        it is parsed already. Schema.parsed is kept without it, and fastavro parsed it again
        on every validate, write and read (~20 us each). The same schema always gives the
        same object, so reading a record written with the newest version skips schema
        resolution (fastavro compares writer and reader schema)."""
        marked = self._marked.get(schema.fingerprint)
        if marked is None:
            marked = self._marked[schema.fingerprint] = fastavro.parse_schema(schema.definition)
        return marked

    def _registry_id(self, schema: Schema) -> int:
        if schema.full_name not in self._ids:
            from confluent_kafka.schema_registry import Schema as RegistrySchema

            if self.registry is None:  # pragma: no cover - encode() checks first
                raise SchemaError("no schema registry configured")
            try:
                self._ids[schema.full_name] = self.registry.register_schema(
                    schema.full_name, RegistrySchema(schema.to_json(), "AVRO")
                )
            except Exception as e:
                # Refused (incompatible) or unreachable: either way every record of this
                # type would fail alike, so it is held, not dead-lettered.
                raise RegistryUnavailableError(f"registering {schema.full_name}", e) from None
        return self._ids[schema.full_name]

    # -- reading ---------------------------------------------------------------------------

    def decode(
        self,
        data: bytes | None,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        expect: str | None = None,
    ) -> Decoded:
        """Decode one record value. Raises a DecodeError subclass naming the record's
        coordinates when the bytes cannot be read, or when ``expect`` (a full name) is given
        and the record is of another type."""
        where: _Where = {"topic": topic, "partition": partition, "offset": offset}
        if data is None or len(data) == 0:
            raise MalformedRecordError("empty value (tombstone?)", **where)
        if len(data) > self.max_record_bytes:
            raise RecordTooLargeError(
                f"{len(data)} bytes, over the {self.max_record_bytes}-byte limit", **where
            )
        if data.startswith(SINGLE_OBJECT_MAGIC):
            if len(data) < 10:
                raise MalformedRecordError("truncated single-object header", **where)
            fp = data[2:10]
            writer = self.schemas.by_fingerprint(fp)
            if writer is None:
                raise UnknownSchemaError(
                    f"no schema in schemas/ has fingerprint {fp.hex()}: the producer used a "
                    "schema this deployment does not know; deploy its .avsc file",
                    **where,
                )
            reader = self.schemas.latest(writer.full_name)
            writer_parsed, body, ref = self._fastavro(writer), 10, f"{writer.full_name}@{fp.hex()}"
        elif data.startswith(CONFLUENT_MAGIC):
            if len(data) < 5:
                raise MalformedRecordError("truncated Confluent wire-format header", **where)
            (schema_id,) = struct.unpack(">I", data[1:5])
            reader, writer_parsed = self._from_registry(schema_id, where)
            body, ref = 5, f"{reader.full_name}@registry:{schema_id}"
        else:
            raise UnknownFramingError(
                f"unknown magic byte 0x{data[0]:02x}: not Avro single-object encoding (C3 01) "
                "nor the Confluent wire format (00)",
                **where,
            )
        if expect is not None and reader.full_name != expect:
            raise UnexpectedSchemaError(f"expected {expect}, got {reader.full_name}", **where)
        buf = io.BytesIO(data)
        buf.seek(body)
        try:
            record = fastavro.schemaless_reader(buf, writer_parsed, self._fastavro(reader))
        except Exception as e:  # fastavro raises EOFError, ValueError, IndexError, ...
            raise MalformedRecordError(
                f"corrupt or truncated Avro datum ({type(e).__name__}: {e})",
                schema=ref,
                **where,
            ) from None
        if buf.tell() != len(data):
            raise MalformedRecordError(
                f"{len(data) - buf.tell()} trailing bytes after the Avro datum", schema=ref, **where
            )
        if not isinstance(record, dict):
            raise MalformedRecordError("datum is not a record", schema=ref, **where)
        return Decoded(schema=reader, writer=ref, record=record)

    def _from_registry(self, schema_id: int, where: _Where) -> tuple[Schema, Any]:
        if schema_id in self._by_id:
            return self._by_id[schema_id]
        if self.registry is None:
            raise UnknownSchemaError(
                f"Confluent wire-format record (schema id {schema_id}) but no schema registry "
                "is configured: set SCHEMA_REGISTRY_URL",
                **where,
            )
        try:
            registered = self.registry.get_schema(schema_id)
        except Exception as e:
            if not _registry_not_found(e):
                raise RegistryUnavailableError(f"fetching schema id {schema_id}", e) from None
            raise UnknownSchemaError(
                f"schema id {schema_id} not found in the registry", **where
            ) from None
        definition = json.loads(registered.schema_str)
        writer_parsed: Any = fastavro.parse_schema(definition)  # with the marker: see _fastavro
        name = str(writer_parsed["name"])
        try:
            reader = self.schemas.latest(name)
        except SchemaError:
            raise UnknownSchemaError(
                f"schema id {schema_id} is {name}, which schemas/ does not define", **where
            ) from None
        self._by_id[schema_id] = (reader, writer_parsed)
        return reader, writer_parsed


def _problems(
    e: _FastavroValidationError, full_name: str, definition: dict[str, Any]
) -> list[tuple[str, str]]:
    """(field path, problem) pairs, e.g. ("envelope.producer", "missing or null, expected
    string"). Values are described by type only: a record may hold personal data or
    secrets, and errors end up in logs and dead-letter headers."""
    prefixes = _record_paths(definition, "", None)
    found: dict[str, tuple[str, list[str]]] = {}
    for err in getattr(e, "errors", ()):
        owner, _, name = str(err.field).rpartition(".")
        prefix = prefixes.get(owner)
        path = f"{prefix}.{name}".lstrip(".") if prefix is not None else str(err.field)
        got = "missing or null" if err.datum is None else f"got {type(err.datum).__name__}"
        # A union reports one error per branch: merge them into one line per field.
        expected = found.setdefault(path, (got, []))[1]
        expected.append(_type_name(err.schema))
    out = [(path, f"{got}, expected {' or '.join(exp)}") for path, (got, exp) in found.items()]
    return out or [("?", str(e))]


def _record_paths(schema: Any, path: str, namespace: str | None) -> dict[str, str]:
    """Full name of every record type in ``schema`` -> its field path from the root."""
    out: dict[str, str] = {}
    if isinstance(schema, list):
        for branch in schema:
            out.update(_record_paths(branch, path, namespace))
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "record":
            name = str(schema["name"])
            ns = schema.get("namespace", namespace)
            full = name if "." in name or not ns else f"{ns}.{name}"
            out[full] = path
            for f in schema.get("fields", []):
                child = f"{path}.{f['name']}".lstrip(".")
                out.update(_record_paths(f["type"], child, full.rpartition(".")[0] or None))
        elif kind == "array":
            out.update(_record_paths(schema["items"], f"{path}[]", namespace))
        elif kind == "map":
            out.update(_record_paths(schema["values"], f"{path}{{}}", namespace))
        elif isinstance(kind, dict | list):
            out.update(_record_paths(kind, path, namespace))
    return out


def _type_name(schema: Any) -> str:
    if isinstance(schema, dict):
        return str(schema.get("logicalType") or schema.get("name") or schema.get("type"))
    if isinstance(schema, list):
        return " or ".join(_type_name(s) for s in schema)
    return str(schema)


async def through_registry_outage(
    call: Callable[[], T],
    what: str,
    backoff_s: float = 0.2,
    max_backoff_s: float = 5.0,
) -> T:
    """``call()``, tried again while the schema registry cannot answer: the first try inline
    (it answers from cache nearly always), the next ones in a thread (so a registry that
    hangs until its timeout does not stall the event loop), with capped exponential backoff
    and jitter, for as long as it takes. ``what`` names what is held, for the log."""
    try:
        return call()
    except RegistryUnavailableError as e:
        error = e
    delay = backoff_s
    started = time.monotonic()
    while True:
        log.warning(
            "holding %s for %.1fs so far: %s; retrying in %.1fs",
            what,
            time.monotonic() - started,
            error,
            delay,
        )
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
        delay = min(delay * 2, max_backoff_s)
        try:
            result = await asyncio.to_thread(call)
        except RegistryUnavailableError as e:
            error = e
            continue
        log.warning("released %s after %.1fs", what, time.monotonic() - started)
        return result


def serde_from_settings(settings: HeraldSettings) -> AvroSerde:
    """The serializer a Herald process uses: single-object encoding against schemas/, or the
    Confluent wire format when SCHEMA_REGISTRY_URL is set."""
    from pipeline.schemas import load_schemas

    registry = None
    if settings.schema_registry_url:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        registry = SchemaRegistryClient(settings.schema_registry_config())
    return AvroSerde(
        load_schemas(settings.schemas_dir.resolve()),
        registry=registry,
        max_record_bytes=settings.max_record_bytes,
    )
