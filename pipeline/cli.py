"""``herald``: the command line.

herald kafka up | down | status             the local broker (Maven-provisioned jars)
herald kafka TOOL [ARGS...]                 Kafka's console tools from the same classpath
herald topics ensure                        create Herald's topics
herald publish EVENT_TYPE --data JSON       validate and publish one domain event
herald run router | sink CHANNEL... | all   the pipeline's processes
herald run api                              the HTTP API and the gRPC API
herald tail TOPIC                           decoded records as JSON lines
herald replay TOPIC [range] [filters]       write a topic's records again, for redelivery
herald subscribers set|show|remove USER     subscriber records (people.subscribers)
herald prefs set|show USER                  preferences per category and channel
herald suppressions list|add|remove         suppressed addresses (people.suppressions)
herald templates check                      translations, variables and renders of templates
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
from typing import Any

from pipeline.settings import HeraldSettings, project_root

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
    from pipeline.publisher import OversizedRecordError, Publisher, PublishError
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
    except (SchemaError, RecordValidationError, OversizedRecordError) as e:
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

        grpc = settings.grpc_port != 0
        if grpc:
            try:
                import pipeline.grpc_api  # noqa: F401 - fails early, with the fix, without grpcio
            except ImportError as e:
                print(f"herald run api: {e}", file=sys.stderr)
                return 2
        api = create_api(settings, grpc=grpc)
        web.run_app(api, host=settings.api_host, port=settings.api_port)
        return 0
    if args.component == "sink":
        from pipeline.sink.service import run_sinks

        asyncio.run(run_sinks(settings, args.channels or ["email"]))
        return 0
    import faust

    from pipeline.router.app import create_app

    app = create_app(settings)
    services = []
    if args.component == "all":
        from pipeline.sink.service import SinkService

        services.append(SinkService(settings, args.channels or ["email"]))
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


def _open_ledger_or_none(settings: HeraldSettings, command: str) -> Any:
    from pipeline.sink.ledger import LedgerError, open_ledger

    try:
        return open_ledger(settings.ledger_url.get_secret_value())
    except LedgerError as e:
        print(f"herald {command}: ledger unavailable ({e})", file=sys.stderr)
        return None


def cmd_trace(args: argparse.Namespace, settings: HeraldSettings) -> int:
    import json

    from connectors.registry import installed_channels
    from pipeline.replay import parse_duration
    from pipeline.serialization import serde_from_settings
    from pipeline.trace import trace

    since = datetime.now(UTC) - parse_duration(args.since) if args.since else None
    ledger = None if args.no_ledger else _open_ledger_or_none(settings, "trace")
    serde = serde_from_settings(settings)
    entries = trace(settings, serde, ledger, args.id, installed_channels(), since)
    if not entries:
        print(f"herald trace: nothing about {args.id}", file=sys.stderr)
        return 1
    for e in entries:
        if args.json:
            print(json.dumps(e.to_json(), ensure_ascii=False))
        else:
            at = e.at.isoformat(timespec="milliseconds")
            print(f"{at}  {e.kind:<11}  {e.where:<40}  {e.summary}")
    return 0


def _dlq_topics(args: argparse.Namespace, settings: HeraldSettings) -> list[str]:
    from connectors.registry import installed_channels
    from pipeline.topics import Topics

    topics = Topics(settings.topic_prefix)
    if args.events:
        return [topics.events_dlq]
    channels = [args.channel] if args.channel else installed_channels()
    out = [topics.notifications_dlq(c) for c in channels]
    return out if args.channel else [topics.events_dlq, *out]


def cmd_dlq(args: argparse.Namespace, settings: HeraldSettings) -> int:
    import json

    from pipeline.dlq import list_dead_letters
    from pipeline.replay import ReplayError, parse_duration, parse_time

    if args.dlq_command == "show":
        return _dlq_show(args, settings)
    try:
        since = datetime.now(UTC) - parse_duration(args.since) if args.since else None
        if args.from_time:
            since = parse_time(args.from_time)
        until = parse_time(args.until_time) if args.until_time else None
    except ReplayError as e:
        print(f"herald dlq: {e}", file=sys.stderr)
        return 2
    if args.dlq_command == "list":
        topics = _dlq_topics(args, settings)
        found = list_dead_letters(
            settings, topics, error_class=args.error_class, since=since, until=until
        )
        for v in found:
            print(json.dumps(v.__dict__, default=str) if args.json else v.line())
        print(f"{len(found)} dead letter(s)", file=sys.stderr)
        return 0
    return _dlq_redrive(args, settings, since, until)


def _dlq_show(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.inspect import message_to_json
    from pipeline.serialization import serde_from_settings

    topic, _, rest = args.where.rpartition("[")
    partition, _, offset = rest.partition("]@")
    if not topic or not partition.isdigit() or not offset.isdigit():
        print("herald dlq show: give TOPIC[PARTITION]@OFFSET as `dlq list` prints", file=sys.stderr)
        return 2
    conf = settings.consumer_config(f"herald-dlq-{uuid.uuid4()}")
    conf.pop("group.instance.id", None)
    consumer = Consumer(conf)
    try:
        consumer.assign([TopicPartition(topic, int(partition), int(offset))])
        msg = consumer.poll(10)
        if msg is None or msg.error() or msg.offset() != int(offset):
            print(f"herald dlq show: no record at {args.where}", file=sys.stderr)
            return 1
        print(message_to_json(msg, serde_from_settings(settings)))
        return 0
    finally:
        consumer.close()


def _dlq_redrive(
    args: argparse.Namespace,
    settings: HeraldSettings,
    since: datetime | None,
    until: datetime | None,
) -> int:
    from confluent_kafka.admin import AdminClient

    from pipeline.replay import ReplayError, ReplayOptions, replay
    from pipeline.serialization import serde_from_settings

    ledger = None if args.no_ledger else _open_ledger_or_none(settings, "dlq redrive")
    if ledger is None and not args.no_ledger:
        return 1
    existing = AdminClient(settings.admin_config()).list_topics(timeout=10).topics
    for topic in _dlq_topics(args, settings):
        if topic not in existing:
            continue
        options = ReplayOptions(
            source=topic,
            from_time=since,
            until_time=until,
            error_class=args.error_class,
            notification_id=args.notification_id,
            dry_run=args.dry_run,
        )
        try:
            stats = replay(settings, options, serde_from_settings(settings), ledger)
        except ReplayError as e:
            print(f"herald dlq redrive: {e}", file=sys.stderr)
            return 2
        verb = "would redrive" if args.dry_run else "redrove"
        print(f"{topic}: {verb}: {stats.line()}")
    return 0


def _people_service(settings: HeraldSettings) -> Any:
    from connectors.registry import installed_channels
    from pipeline.people.policy import PreferencePolicy
    from pipeline.people.service import PeopleService
    from pipeline.people.store import PeopleStore
    from pipeline.router.rules import load_rules
    from pipeline.serialization import serde_from_settings

    return PeopleService(
        settings,
        PeopleStore(settings, serde_from_settings(settings)),
        PreferencePolicy.load(settings.preferences_file),
        installed_channels(),
        load_rules(settings.rules_file),
    )


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _people_command(args: argparse.Namespace, settings: HeraldSettings) -> int:
    """Runs one people command; a refusal is printed with its fields, exit 2 (invalid)
    or 1 (Kafka unavailable, not found)."""
    from pipeline.people.policy import PolicyError
    from pipeline.service import InvalidRequest, ServiceError

    name = f"herald {args.command}"
    try:
        service = _people_service(settings)
        try:
            return int(args.people(args, service))
        finally:
            service.store.close()
    except (InvalidRequest, ValueError, PolicyError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except ServiceError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False))


def subscribers_set(args: argparse.Namespace, service: Any) -> int:
    body: dict[str, Any] = {}
    for key in ("email", "phone", "locale", "time_zone"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value or None  # "" clears the field
    devices: dict[str, list[str]] = {}
    for channel, address in ((c, a) for c, a in _pairs(args.device, "--device").items()):
        devices.setdefault(channel, []).append(address)
    if devices:
        body["devices"] = devices
    if args.custom:
        body["custom"] = _pairs(args.custom, "--custom")
    write = service.put_subscriber if args.replace else service.merge_subscriber
    _print_json(write(args.user, body, "cli").to_json())
    return 0


def subscribers_show(args: argparse.Namespace, service: Any) -> int:
    _print_json(service.get_subscriber(args.user).to_json())
    return 0


def subscribers_remove(args: argparse.Namespace, service: Any) -> int:
    service.delete_subscriber(args.user)
    print(f"removed subscriber {args.user} (a tombstone on {service.topics.subscribers})")
    return 0


def _print_prefs(described: dict[str, Any], as_json: bool) -> None:
    """The choices, then what they amount to per category and channel (critical ones
    marked), as a table; or the whole as JSON."""
    if as_json:
        _print_json(described)
        return
    choices = ", ".join(
        f"{cat}/{ch}={'on' if on else 'off'}"
        for cat, chs in sorted(described["choices"].items())
        for ch, on in sorted(chs.items())
    )
    when = described["updated_at"] or "never"
    by = f" by {described['updated_by']}" if described["updated_by"] else ""
    print(f"{described['user_id']}: chose {choices or 'nothing'} (updated {when}{by})")
    effective = described["effective"]
    channels = sorted({ch for chs in effective.values() for ch in chs})
    width = max(len(c) for c in [*effective, "category"]) + 2
    print(("category".ljust(width) + "".join(ch.ljust(9) for ch in channels)).rstrip())
    for category, chs in effective.items():
        cells = "".join(("on" if chs[ch] else "OFF").ljust(9) for ch in channels)
        mark = "  (critical)" if category in described["critical"] else ""
        print(f"{category.ljust(width)}{cells.rstrip()}{mark}")


def prefs_set(args: argparse.Namespace, service: Any) -> int:
    on = args.state == "on"
    prefs = service.set_preference(args.user, args.category, args.channel, on, "cli")
    _print_prefs(service.describe_preferences(prefs), args.json)
    return 0


def prefs_show(args: argparse.Namespace, service: Any) -> int:
    _print_prefs(service.describe_preferences(service.get_preferences(args.user)), args.json)
    return 0


def suppressions_list(args: argparse.Namespace, service: Any) -> int:
    found = service.list_suppressions(args.channel)
    for key, s in found:
        if args.json:
            print(json.dumps({"key": key, **s.to_json()}, ensure_ascii=False))
        else:
            at = s.suppressed_at.isoformat(timespec="seconds")
            print(f"{at}  {key}  {s.describe()}  source={s.source}")
    print(f"{len(found)} suppressed address(es)", file=sys.stderr)
    return 0


def suppressions_add(args: argparse.Namespace, service: Any) -> int:
    key = service.add_suppression(args.channel, args.address, args.reason, "cli")
    print(f"suppressed {key}")
    return 0


def suppressions_remove(args: argparse.Namespace, service: Any) -> int:
    key = service.remove_suppression(args.channel, args.address)
    print(f"lifted the suppression of {key}")
    return 0


def cmd_templates(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.router.check import check_templates
    from pipeline.router.rules import RuleError, load_rules
    from pipeline.router.templates import Templates
    from pipeline.schemas import load_schemas

    try:
        rules = load_rules(settings.rules_file)
    except RuleError as e:
        print(f"herald templates check: {e}", file=sys.stderr)
        return 2
    templates = Templates(settings.templates_dir, settings.default_locale)
    problems = check_templates(templates, rules, load_schemas(settings.schemas_dir.resolve()))
    for problem in problems:
        print(problem)
    names = sorted(p.name for p in settings.templates_dir.iterdir() if p.is_dir())
    locales = sorted({loc for n in names for loc in templates.translations(n).values()})
    verdict = f"{len(problems)} problem(s)" if problems else "ok"
    print(
        f"{verdict}: {len(names)} templates, translations {', '.join(locales) or 'none'}, "
        f"{len(rules)} rules checked against their event schemas",
        file=sys.stderr,
    )
    return 1 if problems else 0


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
    # The demo, like the SMTP catcher it runs, is dev tooling: devtools/ in a source checkout,
    # not part of the installed package.
    checkout = str(project_root())
    if (project_root() / "devtools").is_dir() and checkout not in sys.path:
        sys.path.insert(0, checkout)
    try:
        from devtools.demo import run_demo
    except ImportError:
        print(
            "herald demo: runs from a source checkout of Herald (make demo); "
            "devtools/ is not part of the installed package",
            file=sys.stderr,
        )
        return 2

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

    tr = sub.add_parser("trace", help="every record about an event or notification, in order")
    tr.add_argument("id", help="an event id or a notification id")
    tr.add_argument("--since", help="read records from this long ago only (e.g. 2h)")
    tr.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    tr.add_argument("--no-ledger", action="store_true", help="topics only")
    tr.set_defaults(func=cmd_trace)

    dq = sub.add_parser("dlq", help="dead letters: list, show, redrive")
    dsub = dq.add_subparsers(dest="dlq_command", required=True)
    for name, text in (
        ("list", "list dead letters with their reason"),
        ("redrive", "send dead letters back where they came from (idempotent)"),
    ):
        d = dsub.add_parser(name, help=text)
        which = d.add_mutually_exclusive_group()
        which.add_argument("--channel", help="notifications.<channel>.dlq only")
        which.add_argument("--events", action="store_true", help="events.dlq only (the router's)")
        d.add_argument("--error-class", help="only dead letters of this error class")
        d.add_argument("--since", help="failed within this long (e.g. 2h)")
        d.add_argument("--from-time", help="failed at or after this time (ISO-8601)")
        d.add_argument("--until-time", help="failed at or before this time (ISO-8601)")
        if name == "list":
            d.add_argument("--json", action="store_true")
        else:
            d.add_argument("--notification-id")
            d.add_argument("--dry-run", action="store_true", help="count, write nothing")
            d.add_argument("--no-ledger", action="store_true", help="do not consult the ledger")
        d.set_defaults(func=cmd_dlq)
    show = dsub.add_parser("show", help="one dead letter, whole, as JSON")
    show.add_argument("where", help="TOPIC[PARTITION]@OFFSET, as `dlq list` prints it")
    show.set_defaults(func=cmd_dlq)

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

    sb = sub.add_parser("subscribers", help="subscriber records: set, show, remove")
    sbs = sb.add_subparsers(dest="subscribers_command", required=True)
    ss = sbs.add_parser("set", help="write a subscriber record (merged into the current one)")
    ss.add_argument("user")
    ss.add_argument("--email")
    ss.add_argument("--phone")
    ss.add_argument("--locale", help="BCP 47, e.g. pt-BR")
    ss.add_argument("--time-zone", dest="time_zone", help="IANA, e.g. America/Sao_Paulo")
    ss.add_argument("--device", action="append", help="CHANNEL=ADDRESS (repeatable)")
    ss.add_argument("--custom", action="append", help="KEY=VALUE (repeatable)")
    ss.add_argument("--replace", action="store_true", help="replace the record whole")
    ss.set_defaults(func=_people_command, people=subscribers_set)
    for name, fn, text in (
        ("show", subscribers_show, "print the latest subscriber record"),
        ("remove", subscribers_remove, "forget a subscriber (a tombstone)"),
    ):
        sp = sbs.add_parser(name, help=text)
        sp.add_argument("user")
        sp.set_defaults(func=_people_command, people=fn)

    pf = sub.add_parser("prefs", help="preferences per category and channel")
    pfs = pf.add_subparsers(dest="prefs_command", required=True)
    pset = pfs.add_parser("set", help="turn a category on or off on a channel (* for all)")
    pset.add_argument("user")
    pset.add_argument("category", help="e.g. marketing, or * for every category")
    pset.add_argument("channel", help="e.g. email, or * for every channel")
    pset.add_argument("state", choices=["on", "off"])
    pset.add_argument("--json", action="store_true")
    pset.set_defaults(func=_people_command, people=prefs_set)
    pshow = pfs.add_parser("show", help="choices and what they amount to")
    pshow.add_argument("user")
    pshow.add_argument("--json", action="store_true")
    pshow.set_defaults(func=_people_command, people=prefs_show)

    su = sub.add_parser("suppressions", help="addresses Herald does not send to")
    sus = su.add_subparsers(dest="suppressions_command", required=True)
    sl = sus.add_parser("list", help="every suppressed address")
    sl.add_argument("--channel")
    sl.add_argument("--json", action="store_true")
    sl.set_defaults(func=_people_command, people=suppressions_list)
    sa = sus.add_parser("add", help="suppress an address (e.g. from a bounce report)")
    sa.add_argument("channel")
    sa.add_argument("address")
    sa.add_argument("--reason", default="operator")
    sa.set_defaults(func=_people_command, people=suppressions_add)
    sr = sus.add_parser("remove", help="lift a suppression (the address, or the key list shows)")
    sr.add_argument("channel")
    sr.add_argument("address")
    sr.set_defaults(func=_people_command, people=suppressions_remove)

    tm = sub.add_parser("templates", help="check templates")
    tm.add_argument("action", choices=["check"])
    tm.set_defaults(func=cmd_templates)

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
