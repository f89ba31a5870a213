"""``herald``: the command line.

herald kafka up | down | status             the local broker (Maven-provisioned jars)
herald kafka TOOL [ARGS...]                 Kafka's console tools from the same classpath
herald topics ensure                        create Herald's topics
herald publish EVENT_TYPE --data JSON       validate and publish one domain event
herald run router | sink CHANNEL... | all   the pipeline's processes
herald tail TOPIC                           decoded records as JSON lines
herald replay TOPIC [range] [filters]       write a topic's records again, for redelivery
herald connectors list                      installed channels and their settings
herald demo                                 the end-to-end sample flow
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from pipeline.settings import HeraldSettings

__all__ = ["main"]

log = logging.getLogger("herald")


def _local_kafka(settings: HeraldSettings) -> object:
    from pipeline.kafka.local import LocalKafka

    return LocalKafka(
        settings.kafka_home,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
    )


def cmd_kafka(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.kafka.local import KafkaNotProvisionedError, KafkaStartError, LocalKafka

    kafka = _local_kafka(settings)
    assert isinstance(kafka, LocalKafka)  # noqa: S101 - narrows for mypy
    try:
        if args.action == "up":
            seconds = kafka.start()
            if seconds == 0.0:
                print(
                    f"Kafka {kafka.version()} already running on {kafka.bootstrap_servers} "
                    f"(pid {kafka.pid()})"
                )
            else:
                print(
                    f"Kafka {kafka.version()} ready on {kafka.bootstrap_servers} in {seconds:.1f}s "
                    f"(pid {kafka.pid()}, log {kafka.log_file})"
                )
            settings = settings.model_copy(
                update={"kafka_bootstrap_servers": kafka.bootstrap_servers}
            )
            from pipeline.kafka.admin import ensure_topics

            created = ensure_topics(settings)
            if created:
                print(f"created {len(created)} topics")
            return 0
        if args.action == "down":
            print("stopped" if kafka.stop() else "not running")
            return 0
        if args.action == "status":
            pid = kafka.pid()
            if pid is None:
                print("not running")
                return 3
            state = "ready" if kafka.is_ready() else "starting"
            print(f"Kafka {kafka.version()} {state} on {kafka.bootstrap_servers} (pid {pid})")
            return 0
        # A console tool: pass the arguments through; add --bootstrap-server unless given.
        extra = list(args.args)
        if extra and extra[0] == "--":
            extra = extra[1:]
        if not any(a.startswith("--bootstrap-server") for a in extra):
            extra = ["--bootstrap-server", settings.kafka_bootstrap_servers, *extra]
        argv = kafka.tool_command(args.action, extra)
    except (KafkaNotProvisionedError, KafkaStartError, ValueError) as e:
        print(f"herald kafka: {e}", file=sys.stderr)
        return 1
    os.execvp(argv[0], argv)  # noqa: S606 - replaces this process with the Java tool


def cmd_topics(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.kafka.admin import ensure_topics

    created = ensure_topics(settings)
    print("\n".join(created) if created else "all topics exist")
    return 0


def cmd_publish(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.publisher import Publisher, PublishError
    from pipeline.schemas import SchemaError
    from pipeline.serialization import RecordValidationError

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as e:
        print(f"herald publish: --data is not valid JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print("herald publish: --data must be a JSON object", file=sys.stderr)
        return 2
    try:
        publisher = Publisher(settings, producer_name=args.producer)
        event = publisher.publish_sync(args.event_type, data)
    except (SchemaError, RecordValidationError) as e:
        print(f"herald publish: {e}", file=sys.stderr)
        return 2
    except PublishError as e:
        print(f"herald publish: {e}", file=sys.stderr)
        return 1
    print(
        f"published {event.event_type} {event.event_id} to "
        f"{event.topic}[{event.partition}]@{event.offset} key={event.key}"
    )
    return 0


def cmd_run(args: argparse.Namespace, settings: HeraldSettings) -> int:
    if args.component == "api":
        from aiohttp import web

        from pipeline.api import create_api

        web.run_app(create_api(settings), host=settings.api_host, port=settings.api_port)
        return 0
    channels = args.channels or ["email"]
    if args.component == "sink":
        from pipeline.sink.service import run_sinks

        asyncio.run(run_sinks(settings, channels))
        return 0
    if settings.router_engine == "confluent":
        from pipeline.router.loop import RouterLoop, run_router
        from pipeline.sink.service import run_sinks

        if args.component == "router":
            asyncio.run(run_router(settings))
        else:
            asyncio.run(run_sinks(settings, channels, beside=RouterLoop.from_settings(settings)))
        return 0
    import faust

    from pipeline.router.app import create_app

    app = create_app(settings)
    services = []
    if args.component == "all":
        from pipeline.sink.service import SinkService

        services.append(SinkService(settings, channels))
    worker = faust.Worker(app, *services, loglevel=args.log_level.lower(), override_logging=False)
    worker.execute_from_commandline()  # exits the process when the worker stops


def cmd_tail(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    from pipeline.inspect import message_to_json
    from pipeline.serialization import serde_from_settings

    serde = serde_from_settings(settings)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"herald-tail-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    md = consumer.list_topics(args.topic, timeout=10).topics.get(args.topic)
    if md is None or md.error is not None:
        print(f"herald tail: no topic {args.topic!r}", file=sys.stderr)
        return 1
    start = OFFSET_BEGINNING if args.from_beginning else OFFSET_END
    consumer.assign([TopicPartition(args.topic, p, start) for p in md.partitions])
    shown, idle = 0, 0.0
    try:
        while args.max is None or shown < args.max:
            msg = consumer.poll(0.5)
            if msg is None:
                idle += 0.5
                if args.idle_timeout is not None and idle >= args.idle_timeout:
                    break
                continue
            if msg.error():
                continue
            idle = 0.0
            print(message_to_json(msg, serde), flush=True)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def cmd_replay(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.replay import (
        ReplayError,
        ReplayOptions,
        parse_duration,
        parse_time,
        print_progress,
        replay,
    )
    from pipeline.serialization import serde_from_settings
    from pipeline.sink.ledger import LedgerError, open_ledger

    try:
        from_time = parse_time(args.from_time) if args.from_time else None
        if args.since:
            from_time = datetime.now(UTC) - parse_duration(args.since)
        options = ReplayOptions(
            source=args.topic,
            to=args.to,
            from_offset=args.from_offset,
            from_time=from_time,
            until_time=parse_time(args.until_time) if args.until_time else None,
            event_type=args.event_type,
            event_id=args.event_id,
            notification_id=args.notification_id,
            recipient=args.recipient,
            force=args.force,
            dry_run=args.dry_run,
            rate=args.rate,
            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            resume=args.resume,
        )
        ledger = None
        if not args.no_ledger:
            try:
                ledger = open_ledger(settings.ledger_url.get_secret_value())
            except LedgerError as e:
                print(f"herald replay: ledger unavailable ({e}); use --no-ledger", file=sys.stderr)
                return 1
        stats = replay(
            settings,
            options,
            serde_from_settings(settings),
            ledger,
            print_progress if sys.stderr.isatty() else None,
        )
    except ReplayError as e:
        print(f"herald replay: {e}", file=sys.stderr)
        return 2
    if sys.stderr.isatty():
        print(file=sys.stderr)
    verb = "would write" if args.dry_run else "replayed"
    print(f"{verb}: {stats.line()}")
    return 0


def cmd_connectors(args: argparse.Namespace, settings: HeraldSettings) -> int:
    import textwrap

    from connectors.registry import load_connectors

    for channel, cls in sorted(load_connectors().items()):
        print(f"{channel:10} {cls.__module__}.{cls.__name__}")
        keys = ", ".join(cls.setting_names())
        if keys:
            wrapped = textwrap.wrap(f"settings: {keys}", 88)
            print("\n".join(f"{'':11}{line}" for line in wrapped))
    return 0


def cmd_demo(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.demo import run_demo

    return run_demo(settings)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herald", description="Kafka-native notification pipeline")
    p.add_argument("--log-level", default=os.environ.get("HERALD_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kafka", help="the local broker and Kafka's console tools")
    from pipeline.kafka.local import console_tools

    k.add_argument("action", choices=["up", "down", "status", *console_tools])
    k.add_argument("args", nargs=argparse.REMAINDER, help="arguments for a console tool")
    k.set_defaults(func=cmd_kafka)

    t = sub.add_parser("topics", help="create Herald's topics")
    t.add_argument("action", choices=["ensure"])
    t.set_defaults(func=cmd_topics)

    pub = sub.add_parser("publish", help="validate and publish one domain event")
    pub.add_argument("event_type", help="e.g. user-registered")
    pub.add_argument("--data", required=True, help="the event's fields as a JSON object")
    pub.add_argument("--producer", default="herald-cli", help="envelope producer name")
    pub.set_defaults(func=cmd_publish)

    r = sub.add_parser("run", help="run the router, sinks, or both")
    r.add_argument("component", choices=["router", "sink", "all", "api"])
    r.add_argument("channels", nargs="*", help="channels for sink/all (default: email)")
    r.set_defaults(func=cmd_run)

    tl = sub.add_parser("tail", help="print a topic's records as JSON lines")
    tl.add_argument("topic")
    tl.add_argument("--from-beginning", action="store_true")
    tl.add_argument("--max", type=int, default=None, help="stop after N records")
    tl.add_argument("--idle-timeout", type=float, default=None, help="stop after S idle seconds")
    tl.set_defaults(func=cmd_tail)

    rp = sub.add_parser("replay", help="write a topic's records again, for redelivery")
    rp.add_argument("topic", help="source topic: events, notifications or a dead-letter topic")
    rp.add_argument(
        "--to", help="destination (default: a dead letter's original topic, else the source)"
    )
    start = rp.add_mutually_exclusive_group()
    start.add_argument("--from-offset", type=int, help="start at this offset in every partition")
    start.add_argument("--from-time", help="start at the first record at or after (ISO-8601)")
    start.add_argument("--since", help="start this long ago, e.g. 90m, 2h, 1d")
    rp.add_argument("--until-time", help="stop at records after this time (ISO-8601)")
    rp.add_argument("--event-type")
    rp.add_argument("--event-id")
    rp.add_argument("--notification-id")
    rp.add_argument("--recipient")
    rp.add_argument(
        "--force",
        action="store_true",
        help="redeliver even what was sent, as a new generation (new idempotency key)",
    )
    rp.add_argument("--dry-run", action="store_true", help="count, write nothing")
    rp.add_argument("--rate", type=float, help="at most this many records per second")
    rp.add_argument("--checkpoint", help="save progress to this file")
    rp.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    rp.add_argument(
        "--no-ledger", action="store_true", help="do not consult the ledger (the sink still does)"
    )
    rp.set_defaults(func=cmd_replay)

    c = sub.add_parser("connectors", help="installed channels")
    c.add_argument("action", choices=["list"])
    c.set_defaults(func=cmd_connectors)

    d = sub.add_parser("demo", help="run the sample flow end to end on a local broker")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = HeraldSettings()
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
