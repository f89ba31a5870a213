"""What the benchmark feeds the pipeline, and how it counts what comes out.

Everything here is deterministic in ``(run, i)``: the preloaded Kafka records and the bare
loops' in-memory copies are the same events, intents and bodies, because both are built by
the functions below from the same numbers.

- ``event(i)``: a domain event as a producing service publishes it (3 user-registered to 1
  password-reset-requested, all on events.user, keyed by user id).
- ``intent(i, channel)``: a notification intent as the router writes it for user-registered
  (welcome template: subject, text and HTML bodies).
- ``preload_events`` / ``preload_intents``: write n of them to a topic quickly (Avro without
  per-record validation: the records are built to match the schema).
- ``TopicCounter``: a read_committed consumer thread that counts the records of a topic, so
  transactional output is counted once it is committed (what a downstream reader sees);
  optionally it notes when it saw each record (by the value of one of its headers).
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from pipeline import headers as h
from pipeline.publisher import CONTENT_TYPE
from pipeline.records import NOTIFICATION_INTENT, NotificationIntent, notification_id
from pipeline.schemas import SchemaSet, load_schemas
from pipeline.serialization import SINGLE_OBJECT_MAGIC
from pipeline.settings import HeraldSettings

_NS = uuid.UUID("2d1f6c1e-8a8e-4f43-9a70-6a3c0f0b8e11")
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)

WELCOME_TEXT = (
    "Hi {name}, your account is ready.\n\n"
    "You signed up with {email}. If that wasn't you, reply to this message."
)
WELCOME_HTML = (
    "<p>Hi {name}, your account is ready.</p>\n"
    "<p>You signed up with {email}. If that wasn&#39;t you, reply to this message.</p>"
)


def event_id(run: str, i: int) -> str:
    return str(uuid.uuid5(_NS, f"{run}/{i}"))


def event(run: str, i: int) -> tuple[str, dict[str, Any]]:
    """(event type, record) of event ``i``."""
    eid = event_id(run, i)
    envelope = {
        "event_id": eid,
        "occurred_at": BASE_TIME + timedelta(milliseconds=i),
        "producer": "bench",
        "traceparent": f"00-{uuid.uuid5(_NS, eid).hex}-{eid.replace('-', '')[:16]}-01",
    }
    user = f"u{i}"
    email = f"user{i}@example.com"
    if i % 4 == 3:
        return "password-reset-requested", {
            "envelope": envelope,
            "user_id": user,
            "email": email,
            "reset_url": f"https://accounts.example.com/reset/{eid}",
            "expires_at": BASE_TIME + timedelta(hours=1),
            "requested_ip": None,
        }
    return "user-registered", {
        "envelope": envelope,
        "user_id": user,
        "email": email,
        "display_name": f"User {i}",
        "locale": None,
    }


def webhook_url(base: str, i: int) -> str:
    return f"{base}/hooks/{i % 97}"


def intent(run: str, i: int, channel: str = "email", url_base: str = "") -> NotificationIntent:
    """The intent the router makes of a user-registered event ``i``: for email the recipient
    is the address, for webhook a URL under ``url_base``."""
    name, email = f"User {i}", f"user{i}@example.com"
    eid = event_id(run, i)
    recipient = email if channel == "email" else webhook_url(url_base, i)
    rule = f"welcome-{channel}"
    return NotificationIntent(
        notification_id=notification_id(eid, rule, channel, recipient),
        event_id=eid,
        event_type="user-registered",
        rule=rule,
        channel=channel,
        recipient=recipient,
        subject=f"Welcome to Herald, {name}!",
        body_text=WELCOME_TEXT.format(name=name, email=email),
        body_html=WELCOME_HTML.format(name=name, email=email),
        user_id=f"u{i}",
        data={},
        created_at=BASE_TIME + timedelta(milliseconds=i),
        traceparent=None,
    )


class Encoder:
    """Avro single-object encoding of Herald records without per-record validation (the
    pipeline's AvroSerde validates; the benchmark's records are built to be valid)."""

    def __init__(self, settings: HeraldSettings) -> None:
        self.schemas: SchemaSet = load_schemas(settings.schemas_dir.resolve())
        self._cache: dict[str, tuple[Any, bytes, bytes]] = {}

    def encode(self, full_name: str, record: dict[str, Any]) -> tuple[bytes, bytes]:
        """(value, herald-schema header value)."""
        entry = self._cache.get(full_name)
        if entry is None:
            schema = self.schemas.latest(full_name)
            ref = f"{full_name}@{schema.fingerprint.hex()}".encode()
            entry = self._cache[full_name] = (
                schema.parsed,
                SINGLE_OBJECT_MAGIC + schema.fingerprint,
                ref,
            )
        parsed, prefix, ref = entry
        buf = io.BytesIO()
        buf.write(prefix)
        fastavro.schemaless_writer(buf, parsed, record)
        return buf.getvalue(), ref


def event_records(
    settings: HeraldSettings, run: str, start: int, n: int
) -> Iterator[tuple[str, bytes, bytes, h.Headers]]:
    """(topic, key, value, headers) of events start..start+n-1, as the Publisher writes them."""
    from pipeline.topics import Topics

    enc = Encoder(settings)
    topics = Topics(settings.topic_prefix)
    types = {t.name: t for t in enc.schemas.event_types()}
    for i in range(start, start + n):
        name, record = event(run, i)
        et = types[name]
        value, ref = enc.encode(et.full_name, record)
        env = record["envelope"]
        hdrs: h.Headers = [
            (h.EVENT_TYPE, name.encode()),
            (h.EVENT_ID, env["event_id"].encode()),
            (h.CONTENT_TYPE, CONTENT_TYPE.encode()),
            (h.SCHEMA, ref),
            (h.TRACEPARENT, env["traceparent"].encode()),
        ]
        yield topics.events(et.domain), record["user_id"].encode(), value, hdrs


def intent_records(
    settings: HeraldSettings, run: str, n: int, channel: str, url_base: str = ""
) -> Iterator[tuple[str, bytes, bytes, h.Headers]]:
    """(topic, key, value, headers) of intents 0..n-1, as the router writes them."""
    from pipeline.topics import Topics

    enc = Encoder(settings)
    topic = Topics(settings.topic_prefix).notifications(channel)
    for i in range(n):
        it = intent(run, i, channel, url_base)
        value, ref = enc.encode(NOTIFICATION_INTENT, it.to_avro())
        hdrs: h.Headers = [
            (h.EVENT_TYPE, it.event_type.encode()),
            (h.EVENT_ID, it.event_id.encode()),
            (h.NOTIFICATION_ID, it.notification_id.encode()),
            (h.CONTENT_TYPE, CONTENT_TYPE.encode()),
            (h.SCHEMA, ref),
        ]
        yield topic, it.recipient.encode(), value, hdrs


def produce_all(
    settings: HeraldSettings,
    records: Iterator[tuple[str, bytes, bytes, h.Headers]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write records with an idempotent producer; returns how many were acknowledged."""
    producer = Producer(settings.producer_config(**{"linger.ms": 20, "batch.size": 1_000_000}))
    acked = 0
    failed: list[str] = []

    def done(err: Any, _msg: Any) -> None:
        nonlocal acked
        if err is None:
            acked += 1
        else:
            failed.append(str(err))

    for n, (topic, key, value, hdrs) in enumerate(records, 1):
        while True:
            try:
                producer.produce(topic, value, key, headers=hdrs, on_delivery=done)
                break
            except BufferError:
                producer.poll(0.05)
        if n % 1000 == 0:
            producer.poll(0)
        if progress is not None and n % 100_000 == 0:
            progress(n)
    if producer.flush(120) or failed:
        raise RuntimeError(f"preload not acknowledged: {failed[:3]}")
    return acked


class TopicCounter:
    """Counts committed records of one topic (all partitions, from the beginning) in a
    thread, sampling (monotonic time, count) for rate computations. With ``stamp_header``
    it also keeps, per value of that header, the wall-clock time it read the record."""

    def __init__(self, bootstrap: str, topic: str, stamp_header: str | None = None) -> None:
        self.topic = topic
        self.count = 0
        self.stamp_header = stamp_header
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-counter-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 20,
                "log_level": 2,  # quiet when the broker goes away at the end of a run
            }
        )
        # A topic created a moment ago may not be in this client's metadata yet.
        deadline = time.monotonic() + 30
        while True:
            md = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            if md is not None and md.error is None and md.partitions:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} has no partitions in the metadata")
            time.sleep(0.2)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.partitions])
        self._thread = threading.Thread(target=self._run, name=f"count-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msgs = self._consumer.consume(10_000, 0.005)
            now = time.time()
            for msg in msgs:
                if msg.error() is None:
                    self.count += 1
                    if self.stamp_header is not None:
                        stamp = h.as_dict(msg.headers()).get(self.stamp_header)
                        if stamp is not None:
                            self.seen.setdefault(stamp, now)
        self._consumer.close()

    def __call__(self) -> int:
        return self.count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_count(
    counter: Callable[[], int],
    target: int,
    *,
    stall_s: float = 60.0,
    limit_s: float = 1800.0,
    every_s: float = 0.01,
    on_sample: Callable[[], bool | None] | None = None,
) -> list[tuple[float, int]]:
    """Sample ``counter`` until it reaches ``target``, stalls for ``stall_s``, ``limit_s``
    passes or ``on_sample`` returns True. Returns the (monotonic time, count) samples."""
    samples = [(time.monotonic(), counter())]
    last_change = samples[0][0]
    while samples[-1][1] < target:
        time.sleep(every_s)
        now, c = time.monotonic(), counter()
        if c != samples[-1][1]:
            last_change = now
        samples.append((now, c))
        if on_sample is not None and on_sample():
            break
        if now - last_change > stall_s or now - samples[0][0] > limit_s:
            break
    return samples


def steady_window(
    samples: list[tuple[float, int]], target: int, lo: float = 0.1, hi: float = 0.9
) -> tuple[tuple[float, int], tuple[float, int]] | None:
    """The (time, count) samples at which the count passed lo and hi of ``target``:
    start-up (connecting, joining the group) and the tail are left out, the same way for
    every contender."""
    base = samples[0][1]
    done = [(t, c - base) for t, c in samples]
    # A run stopped by its time limit is measured over the same fractions of what it did.
    target = min(target, done[-1][1])
    start = next(((t, c) for t, c in done if c >= lo * target), None)
    end = next(((t, c) for t, c in done if c >= hi * target), None)
    if start is None or end is None or end[0] <= start[0]:
        return None
    return start, end


def steady_rate(samples: list[tuple[float, int]], target: int) -> float:
    """Records per second over the steady window (see ``steady_window``)."""
    window = steady_window(samples, target)
    if window is None:
        return 0.0
    (t0, c0), (t1, c1) = window
    return (c1 - c0) / (t1 - t0)
