"""The contenders Herald is measured against, each run as a process of its own:

    python -m bench.baselines kafka-loop   ...   bare aiokafka consume -> produce
    python -m bench.baselines work-loop    ...   consume -> RouterHandler.handle -> produce,
                                                 one Kafka transaction per batch
    python -m bench.baselines http-loop    ...   bare aiohttp POSTs of prebuilt bodies
    python -m bench.baselines smtp-loop    ...   bare aiosmtplib sendmail of prebuilt messages
    python -m bench.baselines naive-http   ...   Kafka -> synchronous POST -> commit, per message
    python -m bench.baselines naive-smtp   ...   Kafka -> smtplib -> commit, per message

The work loop does Herald's own work on each event (decode, route, render, encode:
``RouterHandler.handle``, the router's whole per-event code) in the plainest transactional
loop, so that the router's framework is measured apart from Herald's work. The other bare
loops do the transport work only: the bodies and messages are built before the
clock starts, from the same intents the sinks read (bench/workload.py). The naive sinks do
everything a sink does in the plainest way: decode, build, send, commit, one at a time.
Every loop stops by itself: after ``--count`` records or ``--seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import smtplib
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from pipeline.settings import HeraldSettings


async def kafka_loop(args: argparse.Namespace) -> int:
    """Forward every record of the source topics to ``--dest``: consume a batch, send each
    record, wait for the acknowledgements, commit. At least once, no transactions."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        *args.source,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    await consumer.start()
    await producer.start()
    done, deadline = 0, time.monotonic() + args.seconds
    try:
        while done < args.count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            acks = []
            for records in batches.values():
                for r in records:
                    acks.append(
                        await producer.send(args.dest, r.value, key=r.key, headers=list(r.headers))
                    )
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit()
                done += len(acks)
    finally:
        await producer.stop()
        await consumer.stop()
    return 0


def _create_handler(settings: HeraldSettings) -> Any:
    """The router's handler as ``herald run router`` builds it (rules, templates, schemas
    checked), wherever the router package keeps the function."""
    try:
        from pipeline.router.handling import create_handler
    except ImportError:
        from pipeline.router.app import create_handler
    return create_handler(settings)


def work_loop(args: argparse.Namespace) -> int:
    """Consume a batch of events (read_committed), hand each to ``RouterHandler.handle``,
    produce what it returns and commit the batch's offsets in the same Kafka transaction
    (confluent-kafka). The output topics are those of ``HERALD_TOPIC_PREFIX``."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from pipeline.kafka.admin import ensure_topics

    settings = HeraldSettings()
    ensure_topics(settings)
    handler = _create_handler(settings)
    consumer = Consumer(settings.consumer_config(args.group))
    consumer.subscribe(args.source)
    producer = Producer(settings.producer_config(**{"transactional.id": f"{args.group}-work"}))
    producer.init_transactions(30)

    # The Kafka client's calls in functions of their own, so that a profile tells them
    # apart from the handler's work (py-spy shows a call into C as its Python caller).
    def consume() -> list[Any]:
        return [m for m in consumer.consume(args.batch, 0.1) if m.error() is None]

    def produce(o: Any) -> None:
        while True:
            try:
                producer.produce(o.topic, o.value, o.key, headers=o.headers)
                return
            except BufferError:
                producer.poll(0.01)

    def commit(offsets: dict[tuple[str, int], int]) -> None:
        producer.send_offsets_to_transaction(
            [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
            consumer.consumer_group_metadata(),
            30,
        )
        producer.commit_transaction(30)

    done, deadline = 0, time.monotonic() + args.seconds
    try:
        while done < args.count and time.monotonic() < deadline:
            msgs = consume()
            if not msgs:
                continue
            producer.begin_transaction()
            offsets: dict[tuple[str, int], int] = {}
            for m in msgs:
                outputs = handler.handle(
                    key=m.key(),
                    value=m.value(),
                    headers=m.headers() or [],
                    topic=m.topic(),
                    partition=m.partition(),
                    offset=m.offset(),
                )
                for o in outputs:
                    produce(o)
                offsets[(m.topic(), m.partition())] = m.offset() + 1
            commit(offsets)
            done += len(msgs)
    finally:
        consumer.close()
    return 0


def _intents(args: argparse.Namespace) -> list[Any]:
    from bench.workload import intent

    return [intent(args.run, i, args.channel, args.url_base) for i in range(args.count)]


def _webhook_requests(args: argparse.Namespace) -> list[tuple[str, bytes, dict[str, str]]]:
    """(url, body, headers) per intent, as the webhook connector builds them."""
    from connectors.webhook import WebhookConnector, payload, sign

    connector = WebhookConnector.from_env()
    out = []
    now = int(time.time())
    for it in _intents(args):
        body = payload(it)
        key = it.idempotency_key
        out.append(
            (
                it.recipient,
                body,
                {
                    "content-type": "application/json",
                    "webhook-id": key,
                    "webhook-timestamp": str(now),
                    "webhook-signature": sign(connector.keys_for(it.recipient), key, now, body),
                    "idempotency-key": key,
                },
            )
        )
    return out


async def http_loop(args: argparse.Namespace) -> int:
    """``--concurrency`` workers POST the prebuilt requests over one aiohttp session."""
    import aiohttp

    requests = _webhook_requests(args)
    deadline = time.monotonic() + args.seconds
    it = iter(requests)
    failures = 0
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            for url, body, headers in it:
                if time.monotonic() > deadline:
                    return
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        failures += 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    if failures:
        print(f"http-loop: {failures} non-2xx answers", file=sys.stderr)
    return 0


async def smtp_loop(args: argparse.Namespace) -> int:
    """``--concurrency`` aiosmtplib connections, each sending prebuilt messages in turn."""
    import aiosmtplib

    from connectors.email import EmailSettings, build_message

    settings = EmailSettings()
    messages = [
        build_message(i, settings.email_from, settings.message_id_domain) for i in _intents(args)
    ]
    deadline = time.monotonic() + args.seconds
    it = iter(messages)

    async def connection() -> None:
        client = aiosmtplib.SMTP(hostname=args.host, port=args.port)
        await client.connect()
        for sender, recipient, data in it:
            if time.monotonic() > deadline:
                break
            await client.sendmail(sender, [recipient], data)
        await client.quit()

    await asyncio.gather(*(connection() for _ in range(args.concurrency)))
    return 0


def _naive(args: argparse.Namespace, send: Any) -> int:
    """Consume one record, decode it, deliver it with ``send(intent)``, commit it, repeat."""
    from confluent_kafka import Consumer

    from pipeline.records import NOTIFICATION_INTENT, NotificationIntent
    from pipeline.serialization import serde_from_settings

    settings = HeraldSettings()
    serde = serde_from_settings(settings)
    consumer = Consumer(settings.consumer_config(args.group))
    consumer.subscribe([args.topic])
    done, deadline = 0, time.monotonic() + args.seconds
    try:
        while done < args.count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            decoded = serde.decode(msg.value(), expect=NOTIFICATION_INTENT)
            send(NotificationIntent.from_avro(decoded.record))
            consumer.commit(message=msg, asynchronous=False)
            done += 1
    finally:
        consumer.close()
    return 0


def naive_http(args: argparse.Namespace) -> int:
    from connectors.webhook import WebhookConnector, payload, sign

    connector = WebhookConnector.from_env()
    conns: dict[str, http.client.HTTPConnection] = {}

    def send(intent: Any) -> None:
        url = urlsplit(intent.recipient)
        conn = conns.get(url.netloc)
        if conn is None:
            conn = conns[url.netloc] = http.client.HTTPConnection(url.netloc, timeout=30)
        body = payload(intent)
        now = int(time.time())
        key = intent.idempotency_key
        conn.request(
            "POST",
            url.path,
            body=body,
            headers={
                "content-type": "application/json",
                "webhook-id": key,
                "webhook-timestamp": str(now),
                "webhook-signature": sign(connector.keys_for(intent.recipient), key, now, body),
                "idempotency-key": key,
            },
        )
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"naive-http: {resp.status} {resp.reason}")

    return _naive(args, send)


def naive_smtp(args: argparse.Namespace) -> int:
    from connectors.email import EmailSettings, build_message

    settings = EmailSettings()
    client = smtplib.SMTP(args.host, args.port, timeout=30)

    def send(intent: Any) -> None:
        sender, recipient, data = build_message(
            intent, settings.email_from, settings.message_id_domain
        )
        client.sendmail(sender, [recipient], data)

    try:
        return _naive(args, send)
    finally:
        client.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.baselines")
    sub = p.add_subparsers(dest="loop", required=True)
    k = sub.add_parser("kafka-loop")
    k.add_argument("--bootstrap", required=True)
    k.add_argument("--source", nargs="+", required=True)
    k.add_argument("--dest", required=True)
    k.add_argument("--group", required=True)
    w = sub.add_parser("work-loop")
    w.add_argument("--source", nargs="+", required=True)
    w.add_argument("--group", required=True)
    w.add_argument("--batch", type=int, default=500, help="records per transaction, at most")
    for name in ("http-loop", "smtp-loop"):
        s = sub.add_parser(name)
        s.add_argument("--run", required=True, help="the workload's run name")
        s.add_argument("--concurrency", type=int, required=True)
    for name in ("naive-http", "naive-smtp"):
        s = sub.add_parser(name)
        s.add_argument("--topic", required=True)
        s.add_argument("--group", required=True)
    for s in sub.choices.values():
        s.add_argument("--count", type=int, required=True)
        s.add_argument("--seconds", type=float, default=600)
        s.add_argument("--channel", default="email")
        s.add_argument("--url-base", default="")
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    if args.loop == "kafka-loop":
        return asyncio.run(kafka_loop(args))
    if args.loop == "work-loop":
        return work_loop(args)
    if args.loop == "http-loop":
        return asyncio.run(http_loop(args))
    if args.loop == "smtp-loop":
        return asyncio.run(smtp_loop(args))
    if args.loop == "naive-http":
        return naive_http(args)
    return naive_smtp(args)


if __name__ == "__main__":
    sys.exit(main())
