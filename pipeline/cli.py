"""``herald``: the command line.

herald kafka up | down | status             the local broker (Maven-provisioned jars)
herald kafka TOOL [ARGS...]                 Kafka's console tools from the same classpath
herald topics ensure                        create Herald's topics
herald publish EVENT_TYPE --data JSON       validate and publish one domain event
herald run router | sink CHANNEL... | all   the pipeline's processes (with /metrics, /healthz,
                                            /readyz on HERALD_OBSERVE_PORT)
herald run api                              the HTTP API and the gRPC API
herald rules check                          rules, templates and schemas, checked together
herald health                               Kafka and the registry answer (healthchecks)
herald init DIR                             an editable copy of rules, templates and schemas
herald tail TOPIC                           decoded records as JSON lines
herald replay TOPIC [range] [filters]       write a topic's records again, for redelivery
herald subscribers set|show|remove USER     subscriber records (people.subscribers)
herald prefs set|show USER                  preferences per category and channel
herald suppressions list|add|remove         suppressed addresses (people.suppressions)
herald templates check                      translations, variables and renders of templates
herald connectors list                      installed channels and their settings
herald demo                                 the end-to-end sample flow

Configuration that cannot work stops a command at start with one line on stderr naming the
variable to fix, and exit status 78 (EX_CONFIG): an invalid or inconsistent setting, rules
that do not fit the schemas, channels or templates, credentials or certificates Kafka refuses.
A cluster that does not answer is exit status 69 (EX_UNAVAILABLE). HERALD_* variables that no
setting reads are reported as a warning with the nearest valid name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.settings import HeraldSettings, data_root, project_root

__all__ = ["EXIT_CONFIG", "EXIT_UNAVAILABLE", "main"]

log = logging.getLogger("herald")

EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: the configuration cannot work
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the cluster did not answer

# Options through which each console tool takes a client configuration file.
_CONFIG_OPTIONS = ("--command-config", "--consumer.config", "--producer.config")


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
            # The local broker's own PLAINTEXT listener, whatever the security settings say.
            settings = settings.model_copy(
                update={
                    "kafka_bootstrap_servers": kafka.bootstrap_servers,
                    "kafka_security_protocol": "PLAINTEXT",
                }
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
        # A console tool: pass the arguments through; add --bootstrap-server unless given,
        # and Herald's security settings as a client configuration file unless one is.
        extra = list(args.args)
        if extra and extra[0] == "--":
            extra = extra[1:]
        if not any(a.startswith("--bootstrap-server") for a in extra):
            extra = ["--bootstrap-server", settings.kafka_bootstrap_servers, *extra]
        secure = settings.kafka_security_protocol != "PLAINTEXT" and not any(
            a.split("=", 1)[0] in _CONFIG_OPTIONS for a in extra
        )
        if not secure:
            argv = kafka.tool_command(args.action, extra)
            os.execvp(argv[0], argv)  # noqa: S606 - replaces this process with the Java tool
        with _client_properties(settings) as properties:
            from pipeline.kafka.security import java_options

            argv = kafka.tool_command(
                args.action,
                [*extra, "--command-config", str(properties)],
                jvm_options=java_options(settings),
            )
            return _run_tool(argv)
    except (KafkaNotProvisionedError, KafkaStartError, ValueError) as e:
        print(f"herald kafka: {e}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _client_properties(settings: HeraldSettings) -> Iterator[Path]:
    """The security settings as a client.properties only this user can read, removed when
    the tool exits (it holds the password)."""
    from pipeline.kafka.security import client_properties

    directory = Path(tempfile.mkdtemp(prefix="herald-kafka-"))  # mode 0700
    path = directory / "client.properties"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(client_properties(settings))
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run_tool(argv: list[str]) -> int:
    """Run a console tool in the foreground and return its exit status. Ctrl-C reaches
    the tool (same process group), which stops as it would alone; this process waits."""
    proc = subprocess.Popen(argv)  # noqa: S603 - our classpath, the user's arguments
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_topics(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.kafka.admin import ensure_topics

    created = ensure_topics(settings)
    print("\n".join(created) if created else "all topics exist")
    return 0


def cmd_publish(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from pipeline.kafka.admin import connect_admin
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
        event, record = publisher.prepare(args.event_type, data)  # invalid input: no Kafka
        connect_admin(settings)
        partition, offset = publisher.write_sync(record)
        event = dataclasses.replace(event, partition=partition, offset=offset)
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


class ConnectorConfigError(ValueError):
    """A connector cannot be built from its settings."""


def _check_connectors(channels: list[str]) -> None:
    """Build each channel's connector once, before anything connects, so that invalid or
    missing settings (a bad HERALD_SMTP_PORT, an empty HERALD_SMS_AUTH_TOKEN) or a missing
    extra stop the process now, not when the first intent arrives."""
    from connectors.registry import connector_class

    for channel in channels:
        cls = connector_class(channel)
        try:
            connector = cls.from_env()
        except ValidationError:
            raise
        except (ValueError, RuntimeError) as e:
            raise ConnectorConfigError(f"the {channel} connector cannot start: {e}") from None
        asyncio.run(connector.aclose())


def cmd_run(args: argparse.Namespace, settings: HeraldSettings) -> int:
    if args.component in ("sink", "all"):
        _check_connectors(args.channels or ["email"])
    if args.component == "api":
        from aiohttp import web

        from pipeline.api import create_api
        from pipeline.kafka.admin import connect_admin

        grpc = settings.grpc_port != 0
        if grpc:
            try:
                import pipeline.grpc_api  # noqa: F401 - fails early, with the fix, without grpcio
            except ImportError as e:
                print(f"herald run api: {e}", file=sys.stderr)
                return 2
        connect_admin(settings)
        api = create_api(settings, grpc=grpc)
        web.run_app(api, host=settings.api_host, port=settings.api_port)
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

    from pipeline import observe
    from pipeline.router.app import create_app

    app = create_app(settings)
    observe.register_readiness("router", _faust_router_ready(app))
    services: list[Any] = [_observe_service(settings)]
    if args.component == "all":
        from pipeline.sink.service import SinkService

        services.append(SinkService(settings, channels))
    worker = faust.Worker(app, *services, loglevel=args.log_level.lower(), override_logging=False)
    worker.execute_from_commandline()  # exits the process when the worker stops


def _faust_router_ready(app: Any) -> Any:
    """The Faust router's readiness: the group assigned it partitions of the event topics."""

    def ready() -> tuple[bool, str]:
        actives = app.assignor.assigned_actives()
        if not actives:
            return False, "waiting for the group's assignment"
        return True, f"{len(actives)} partition(s) assigned"

    return ready


def _observe_service(settings: HeraldSettings) -> Any:
    """/metrics, /healthz and /readyz as a service of the Faust worker (one for the whole
    process: router and sinks)."""
    import mode

    from pipeline import observe

    class ObserveService(mode.Service):
        server: observe.ObserveServer | None = None

        async def on_start(self) -> None:
            self.server = await observe.serve(settings.observe_host, settings.observe_port)

        async def on_stop(self) -> None:
            if self.server is not None:
                await self.server.close()

    return ObserveService()


def cmd_tail(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    from pipeline.inspect import message_to_json
    from pipeline.kafka.admin import connect_admin
    from pipeline.serialization import serde_from_settings

    serde = serde_from_settings(settings)
    connect_admin(settings)
    consumer = Consumer(
        settings.client_config(
            **{
                "group.id": f"herald-tail-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
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
        from pipeline.kafka.admin import connect_admin

        connect_admin(settings)
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


def cmd_health(args: argparse.Namespace, settings: HeraldSettings) -> int:
    """What a process of this deployment needs, reached with its settings: Kafka (with its
    security settings) and, when one is configured, the schema registry. For container
    healthchecks: exit status 0 when all answer."""
    import urllib.parse
    import urllib.request

    from pipeline.kafka.admin import connect_admin

    admin = connect_admin(settings, timeout=args.timeout)
    brokers = len(admin.list_topics(timeout=args.timeout).brokers)
    print(f"ok: kafka {settings.kafka_bootstrap_servers} ({brokers} brokers)")
    if settings.schema_registry_url:
        url = settings.schema_registry_url.rstrip("/") + "/subjects"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310
                response.read()
        except OSError as e:
            # The URL may carry user info: name the host only.
            host = urllib.parse.urlsplit(url).hostname
            print(f"herald health: schema registry at {host}: {type(e).__name__}", file=sys.stderr)
            return 1
        print(f"ok: schema registry at {urllib.parse.urlsplit(url).hostname}")
    return 0


def _people_service(settings: HeraldSettings) -> Any:
    from pipeline.people.service import PeopleService

    return PeopleService.from_settings(settings)


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
    from pipeline.router.rules import RuleError, load_rules
    from pipeline.router.templates import Templates
    from pipeline.router.templates_check import check_templates
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


def cmd_rules(args: argparse.Namespace, settings: HeraldSettings) -> int:
    from connectors.registry import installed_channels
    from pipeline.router.check import check_rules
    from pipeline.router.rules import load_rules
    from pipeline.router.templates import Templates
    from pipeline.schemas import load_schemas

    report = check_rules(
        load_rules(settings.rules_file),
        Templates(settings.templates_dir),
        load_schemas(settings.schemas_dir.resolve()),
        installed_channels(),
    )
    for intent in report.rendered:
        subject = f" subject={intent.subject!r}" if intent.subject else ""
        route = f"{intent.event_type} -> {intent.channel} {intent.recipient}"
        print(f"ok  {intent.rule}: {route}{subject}")
    for warning in report.warnings:
        print(f"warn  {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"error  {problem}", file=sys.stderr)
    status = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
    print(
        f"{report.rules} rules, {report.templates} templates "
        f"({settings.rules_file}, {settings.templates_dir}, {settings.schemas_dir}): {status}"
    )
    return 0 if not report.problems else 1


def cmd_init(args: argparse.Namespace, settings: HeraldSettings) -> int:
    """Copy the default rules, templates and schemas into DIR, for a project to edit."""
    target = Path(args.directory).resolve()
    source = data_root()
    parts = {
        "rules.toml": source / "config" / "rules.toml",
        "templates": source / "config" / "templates",
        "schemas": source / "schemas",
    }
    existing = [name for name in parts if (target / name).exists()]
    if existing:
        print(
            f"herald init: {target} already has {', '.join(existing)}; "
            "choose an empty or new directory",
            file=sys.stderr,
        )
        return 1
    target.mkdir(parents=True, exist_ok=True)
    for name, path in parts.items():
        if path.is_dir():
            shutil.copytree(path, target / name)
        else:
            shutil.copy2(path, target / name)
    print(f"wrote {target}/rules.toml, {target}/templates/, {target}/schemas/")
    print("point Herald at them with:")
    print(f"export HERALD_RULES_FILE={target / 'rules.toml'}")
    print(f"export HERALD_TEMPLATES_DIR={target / 'templates'}")
    print(f"export HERALD_SCHEMAS_DIR={target / 'schemas'}")
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

    he = sub.add_parser("health", help="check that Kafka (and the registry) answer")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds per check")
    he.set_defaults(func=cmd_health)

    ru = sub.add_parser("rules", help="check rules, templates and schemas together")
    ru.add_argument("action", choices=["check"])
    ru.set_defaults(func=cmd_rules)

    ini = sub.add_parser("init", help="write an editable copy of rules, templates and schemas")
    ini.add_argument("directory")
    ini.set_defaults(func=cmd_init)

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


def _fail(message: str, status: int) -> int:
    print(f"herald: {' '.join(message.split())}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    from connectors.registry import DuplicateChannelError, UnknownChannelError
    from pipeline import logs, tracing
    from pipeline.environment import describe_validation_error, unknown_variables
    from pipeline.kafka.admin import KafkaAccessError, KafkaUnreachableError
    from pipeline.router.rules import RuleError
    from pipeline.router.templates import TemplateRenderError
    from pipeline.schemas import SchemaError

    args = build_parser().parse_args(argv)
    try:
        logs.configure(args.log_level, os.environ.get("HERALD_LOG_FORMAT"))
    except ValueError as e:
        print(f"herald: {e}", file=sys.stderr)
        return 2
    try:
        unknown = unknown_variables(os.environ)
    except (DuplicateChannelError, ImportError) as e:
        # An installed connector package that cannot be loaded.
        return _fail(f"loading the installed connectors: {type(e).__name__}: {e}", EXIT_CONFIG)
    for name, nearest in unknown:
        hint = f"; did you mean {nearest}?" if nearest else ""
        print(f"herald: warning: {name} is not a Herald setting{hint}", file=sys.stderr)
    try:
        settings = HeraldSettings()
        if args.command in ("run", "publish") and tracing.wanted(settings.otel_enabled):
            name = f"herald-{args.component}" if args.command == "run" else "herald-publish"
            try:
                tracing.configure(name)
            except ImportError as e:
                print(f"herald: {e} (or unset HERALD_OTEL_ENABLED)", file=sys.stderr)
                return 2
        return int(args.func(args, settings))
    except ValidationError as e:
        return _fail(f"invalid setting: {describe_validation_error(e)}", EXIT_CONFIG)
    except KafkaUnreachableError as e:
        return _fail(str(e), EXIT_UNAVAILABLE)
    except (
        KafkaAccessError,
        RuleError,
        TemplateRenderError,
        SchemaError,
        ConnectorConfigError,
    ) as e:
        return _fail(str(e), EXIT_CONFIG)
    except UnknownChannelError as e:
        return _fail(str(e.args[0]), EXIT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
