"""The chaos run's input: the records the harness writes to events.user, and what each must
become.

Every input has an index, a kind, the event id and address it was built from, the
Message-ID its welcome email would carry (notification ids are deterministic) and, once
Kafka acknowledged it, its coordinates. The kinds:

- ``normal``: a valid user-registered event. It must be delivered, never dead-lettered.
- ``oversize``: a valid user-registered event whose display name is 400,000 characters; the
  welcome template puts it in the subject, the text and the HTML, so its intent is over the
  record limit. The router must dead-letter the event (RecordTooLargeError, rule
  welcome-email).
- poison, written with a plain confluent-kafka Producer, past Herald's publisher, from the
  bytes of a valid event: ``bad-magic`` (first byte 0x07), ``truncated`` (the Avro datum cut
  in half), ``unknown-id`` (a registry id the registry does not have), ``unknown-fingerprint``
  (single-object framing with a fingerprint no schema has), ``too-large`` (padded past
  HERALD_MAX_RECORD_BYTES, under the broker's limit; its dead letter is cut to fit). The
  router must dead-letter each with the error class of its kind, and deliver none.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from pipeline.publisher import Publisher
from pipeline.records import notification_id
from pipeline.serialization import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics

__all__ = [
    "EXPECTED",
    "POISON_KINDS",
    "Expectation",
    "Input",
    "InputWriter",
    "display_name",
    "plan_kinds",
    "poison_value",
]

NORMAL = "normal"
OVERSIZE = "oversize"
POISON_KINDS = ("bad-magic", "truncated", "unknown-id", "unknown-fingerprint", "too-large")
RULE = "welcome-email"  # config/rules.toml: user-registered -> email, template "welcome"
# Three copies of the name (subject, text, HTML) make an intent of ~1.2 MB, over the default
# 1 MB limit, while the event itself (~400 KB) is well under it.
OVERSIZE_NAME_CHARS = 400_000
UNKNOWN_REGISTRY_ID = 999_999


@dataclass(frozen=True)
class Expectation:
    """How an input that must not be delivered is to be dead-lettered."""

    error_class: str
    rule: str | None = None
    truncated: bool = False  # the dead letter had to be cut to fit the record limit


EXPECTED: dict[str, Expectation] = {
    OVERSIZE: Expectation("RecordTooLargeError", rule=RULE),
    "bad-magic": Expectation("UnknownFramingError"),
    "truncated": Expectation("MalformedRecordError"),
    "unknown-id": Expectation("UnknownSchemaError"),
    "unknown-fingerprint": Expectation("UnknownSchemaError"),
    "too-large": Expectation("RecordTooLargeError", truncated=True),
}


@dataclass
class Input:
    index: int
    kind: str
    event_id: str
    email: str
    message_id: str  # <notification id@domain> of the welcome email it would yield
    coords: tuple[str, int, int] | None = None  # set when Kafka acknowledges it
    in_kafka: bool | None = None  # found in the events topic when read back (None: not read)

    @property
    def key(self) -> str:
        """The record key it is written with (the user id)."""
        return f"u{self.index}"

    @property
    def expectation(self) -> Expectation | None:
        """None: it must be delivered."""
        return EXPECTED.get(self.kind)

    def describe(self) -> str:
        where = f"{self.coords[0]}[{self.coords[1]}]@{self.coords[2]}" if self.coords else "?"
        return f"input {self.index} ({self.kind}, event {self.event_id}, {where})"


def plan_kinds(n: int, poison_rate: float, oversize_rate: float, rng: random.Random) -> list[str]:
    """The kind of each of ``n`` inputs: round(n x rate) poison and oversize inputs at
    random places, the poison kinds taking turns so that each appears."""
    kinds = [NORMAL] * n
    n_poison = round(n * poison_rate)
    n_oversize = round(n * oversize_rate)
    spots = rng.sample(range(n), min(n, n_poison + n_oversize))
    for j, i in enumerate(spots[:n_poison]):
        kinds[i] = POISON_KINDS[j % len(POISON_KINDS)]
    for i in spots[n_poison:]:
        kinds[i] = OVERSIZE
    return kinds


def display_name(index: int, kind: str) -> str:
    name = f"User {index}"
    return name + " " + "x" * OVERSIZE_NAME_CHARS if kind == OVERSIZE else name


def poison_value(kind: str, value: bytes, *, max_record_bytes: int, rng: random.Random) -> bytes:
    """A poison record of ``kind`` made from ``value``, a valid event as Herald's serde
    frames it: 00 + 4-byte registry id, or C3 01 + 8-byte fingerprint, then the datum."""
    header = 5 if value.startswith(CONFLUENT_MAGIC) else 10
    datum = value[header:]
    if kind == "bad-magic":
        return b"\x07" + value[1:]
    if kind == "truncated":
        return value[: header + len(datum) // 2]
    if kind == "unknown-id":
        return CONFLUENT_MAGIC + struct.pack(">I", UNKNOWN_REGISTRY_ID) + datum
    if kind == "unknown-fingerprint":
        return SINGLE_OBJECT_MAGIC + rng.randbytes(8) + datum
    if kind == "too-large":
        return value + b"\x00" * (max_record_bytes + 10_000 - len(value))
    raise ValueError(f"unknown poison kind {kind!r}")


class InputWriter:
    """Writes inputs: valid events through Herald's Publisher (so registry-framed when
    SCHEMA_REGISTRY_URL is set), poison through a plain Producer of its own."""

    def __init__(
        self,
        settings: HeraldSettings,
        publisher: Publisher,
        message_id_domain: str,
        rng: random.Random,
    ) -> None:
        self.publisher = publisher
        self.domain = message_id_domain
        self.rng = rng
        self.topic = Topics(settings.topic_prefix).events("user")
        self.max_record_bytes = settings.max_record_bytes
        self.raw = Producer(settings.producer_config(**{"client.id": "chaos-poison"}))
        self.errors: list[str] = []  # inputs Kafka did not acknowledge

    def write(self, index: int, kind: str) -> Input:
        email = f"user{index}@example.com"
        data = {"user_id": f"u{index}", "email": email, "display_name": display_name(index, kind)}
        et, record = self.publisher.build("user-registered", data)
        event_id = str(record["envelope"]["event_id"])
        nid = notification_id(event_id, RULE, "email", email)
        item = Input(index, kind, event_id, email, f"<{nid}@{self.domain}>")

        def acked(err: KafkaError | None, msg: Message) -> None:
            offset = msg.offset()
            if err is not None:
                self.errors.append(f"{item.describe()}: {err}")
            elif offset is not None:  # None: persisted, says the producer, offset unknown
                item.coords = (str(msg.topic()), int(msg.partition() or 0), offset)

        if kind in (NORMAL, OVERSIZE):
            self.publisher.publish("user-registered", record, on_delivery=acked)
        else:
            value, _ = self.publisher.serde.encode(et.full_name, record)
            poison = poison_value(kind, value, max_record_bytes=self.max_record_bytes, rng=self.rng)
            self._produce(poison, f"u{index}".encode(), acked)
        return item

    def _produce(self, value: bytes, key: bytes, cb: Any) -> None:
        while True:
            try:
                self.raw.produce(self.topic, value, key, on_delivery=cb)
                return
            except BufferError:
                self.raw.poll(0.1)

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for every input's acknowledgement; returns how many are still waiting."""
        return int(self.publisher.flush(timeout)) + int(self.raw.flush(timeout))
