"""Fault-injection harness: proves that nothing is lost and nothing is sent twice by
killing things, and that every input event is accounted for.

    python -m bench.chaos --events 100000                 # make chaos EVENTS=100000
    python -m bench.chaos --events 100000 --cluster 3     # make chaos CLUSTER=3

N input records go through the router (exactly_once) and two email sink processes sharing a
consumer group, into a real SMTP server (a separate process) that answers 451 at random and
drops connections before accepting a message. Events are Avro in the Confluent wire format,
against a schema registry (devtools.registry, a process of its own on a free loopback port,
its ids kept in a file) that every process uses through SCHEMA_REGISTRY_URL.

Most inputs are valid user-registered events. A share are not (``--poison-rate``,
``--oversize-rate``; bench/chaos_inputs.py): poison records written past Herald's publisher
(bad magic byte, truncated Avro, unknown registry id, unknown fingerprint, over the record
limit) and valid events whose welcome email is over the record limit. The router must
dead-letter each of those, with the error class of its kind, and deliver none.

Faults, all after 20% progress:

- the router and each sink are SIGKILLed at random moments (each at least ``--kills``
  times, a kill during the registry outage included), and restarted after 0.2-1.5 s, as a
  supervisor would;
- the broker (single node) or one node of the 3-broker cluster is hard-killed and restarted
  (``--broker-restarts``);
- the schema registry is SIGKILLed for 10-20 s (``--registry-outage``) and started again on
  the same port with the same data file. Clients cache ids, so an outage only bites a
  process that needs an id it has not looked up yet; so when the registry goes down the
  harness also kills the router and one sink, publishes the last 10% of the inputs (the
  publisher has the id cached; the router it kills had not routed them) and restarts both:
  the new router must look up the events' schema, the new sink the intents' schema for its
  backlog. Each must hold its records until the registry answers, neither dead-letter nor
  skip them. As a restart can take longer than the outage on a loaded machine, the registry
  stays down until each of the two has logged a held record (at most 60 s in all). The
  harness reports how long it was down and how many records each held (from their logs).

Any process that dies on its own is restarted too.

At the end it checks at the receiver, by Message-ID, against the ids the events must yield,
and reads back (read_committed, bench/chaos_accounting.py) the dead letters of the router
(events.dlq) and of the sink (notifications.email.dlq), which name their input by its
original coordinates (herald-original-topic/partition/offset) or event id, and the intents
the router committed to notifications.email:

- lost: events that must be delivered whose Message-ID never arrived;
- duplicates: a recipient that got more than one distinct Message-ID (a second notification
  that dedupe by Message-ID cannot remove);
- raw_duplicates: one Message-ID received more than once (the SMTP duplicate window,
  bounded by what was in flight at each kill);
- dead_lettered: inputs found in a dead-letter topic;
- unaccounted: inputs neither delivered nor dead-lettered;
- not_in_kafka: inputs the producer saw acknowledged that are not in the events topic when
  it is read back at the end (lost by Kafka before Herald could see them; not counted as
  unaccounted, but the run fails: it proves nothing about them);
- router_duplicates: extra committed copies of an intent in notifications.email (records
  beyond the first per herald-notification-id). Under exactly_once a re-routed event's
  intents are in an aborted transaction, so this should be 0; the sinks would absorb them
  anyway (same notification id), so it is reported, not judged.

The last line is:

    RESULT events=N delivered=D lost=L duplicates=X raw_duplicates=R kills=K
           broker_restarts=B seconds=S dead_lettered=E unaccounted=U
           router_duplicates=C not_in_kafka=K                    (one line)

events counts every input, delivered and dead_lettered the inputs that were. The exit status
is non-zero when anything is lost, duplicated or unaccounted, when an input met the wrong
fate (a normal event dead-lettered, a poison one delivered or dead-lettered for another
reason), or when raw duplicates exceed their bound.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Message

from bench.chaos_accounting import (
    DeadLetterSeen,
    TopicReader,
    account,
    dead_letter_seen,
    extra_copies,
)
from bench.chaos_inputs import POISON_KINDS, Input, InputWriter, plan_kinds
from bench.receivers import wait_port
from devtools.cluster import LocalKafkaCluster
from devtools.procs import free_port, herald_env
from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.local import LocalKafka
from pipeline.publisher import Publisher
from pipeline.settings import HeraldSettings, project_root
from pipeline.topics import Topics

MESSAGE_ID_DOMAIN = "herald.localhost"
# With a registry outage planned, this share of the inputs is published during it.
LATE_SHARE = 0.1
OUTAGE_MAX_S = 60.0


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Proc:
    """A Herald process under the harness's supervision."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.crashes = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv_python(self.argv),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1
        elif self.proc is not None:  # it died on its own before the supervisor noticed
            self.crashes += 1
            say(f"{self.name} had exited already (code {self.proc.returncode})")

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def argv_python(argv: list[str]) -> list[str]:
    return [sys.executable, *argv]


def env_for(settings: HeraldSettings, log_level: str = "WARNING") -> dict[str, str]:
    """The environment of a Herald process with these settings (devtools.procs), without
    the /metrics endpoint: the harnesses run several Herald processes on one host, which
    would all ask for the same port."""
    return herald_env(settings, HERALD_LOG_LEVEL=log_level, HERALD_OBSERVE_PORT="0")


def smtp_server_main(args: argparse.Namespace) -> int:
    """The receiver, in its own process: not killed, keeps every accepted Message-ID."""
    from devtools.smtp_catcher import SmtpCatcher

    catcher = SmtpCatcher(port=args.port, id_log=Path(args.id_log))
    catcher.fail_rate = args.fail_rate
    catcher.drop_rate = args.drop_rate
    catcher.rng.seed(args.seed)
    catcher.keep_messages = False
    catcher.start()
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        time.sleep(0.2)
    catcher.stop()
    return 0


def received(id_log: Path) -> list[tuple[str, str]]:
    if not id_log.exists():
        return []
    out = []
    for line in id_log.read_text().splitlines():
        mid, _, rcpt = line.partition(" ")
        if mid:
            out.append((mid, rcpt))
    return out


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="herald-chaos-"))
    say(f"work dir {work}")
    lib = project_root() / ".herald" / "kafka" / "lib"

    broker: LocalKafka | LocalKafkaCluster
    if args.cluster > 1:
        broker = LocalKafkaCluster(
            work / "kafka",
            nodes=args.cluster,
            ports=[(free_port(), free_port()) for _ in range(args.cluster)],
            lib=lib,
            # Fence a killed broker after 3 s instead of 9: leaders move sooner.
            properties={"broker.session.timeout.ms": "3000", "broker.heartbeat.interval.ms": "500"},
        )
        replication = 3
    else:
        home = work / "kafka"
        (home / "lib").mkdir(parents=True)
        for jar in lib.glob("*.jar"):
            (home / "lib" / jar.name).symlink_to(jar)
        broker = LocalKafka(home, port=free_port(), controller_port=free_port())
        replication = 1
    say(f"starting {f'a {args.cluster}-broker cluster' if args.cluster > 1 else 'the broker'}")
    broker.start()
    bootstrap = broker.bootstrap_servers

    smtp_port = free_port()
    registry_port = free_port()
    id_log = work / "received.log"
    ledger = args.ledger_url or f"sqlite:///{work / 'ledger.db'}"
    settings = HeraldSettings(
        kafka_bootstrap_servers=bootstrap,
        schema_registry_url=f"http://127.0.0.1:{registry_port}",
        topic_prefix="chaos.",
        topic_partitions=args.partitions,
        topic_replication_factor=replication,
        router_app_id="chaos-router",
        sink_group_prefix="chaos-sink",
        router_data_dir=work / "router",
        ledger_url=ledger,
        sink_max_in_flight=args.in_flight,
        sink_max_attempts=50,
        sink_retry_backoff_ms=100,
        sink_retry_backoff_max_ms=2000,
        breaker_failure_threshold=200,
        breaker_open_ms=1000,
        breaker_open_max_ms=4000,
    )
    ensure_topics(settings)
    topics = Topics(settings.topic_prefix)
    env = env_for(settings, args.log_level)
    # The email connector's own settings (EmailSettings).
    env.update(
        HERALD_SMTP_PORT=str(smtp_port),
        HERALD_SMTP_CONNECTIONS="4",
        HERALD_MESSAGE_ID_DOMAIN=MESSAGE_ID_DOMAIN,
    )

    registry = Proc(
        "registry",
        [
            "-m",
            "devtools.registry",
            "--port",
            str(registry_port),
            "--data",
            str(work / "registry.json"),
        ],
        env,
        work,
    )
    registry.start()
    wait_port(registry_port, timeout=30)
    smtp = Proc(
        "smtp",
        [
            "-m",
            "bench.chaos",
            "smtp",
            "--port",
            str(smtp_port),
            "--id-log",
            str(id_log),
            "--fail-rate",
            str(args.fail_rate),
            "--drop-rate",
            str(args.drop_rate),
            "--seed",
            str(args.seed),
        ],
        env,
        work,
    )
    smtp.start()
    router = Proc("router", ["-m", "pipeline.cli", "run", "router"], env, work)
    # Static membership: a restarted sink gets its partitions back without waiting for
    # the session timeout, as a supervised deployment with stable ids would.
    sinks = [
        Proc(
            f"sink-{i}",
            ["-m", "pipeline.cli", "run", "sink", "email"],
            {**env, "HERALD_SINK_INSTANCE_ID": f"chaos-sink-{i}"},
            work,
        )
        for i in range(1, args.sinks + 1)
    ]
    victims = [router, *sinks]
    for p in victims:
        p.start()

    # Publish (nearly) everything; the pipeline works through it while things get killed.
    # With an outage planned, the last tenth waits for it: published while the registry is
    # down, it is what the router restarted meanwhile must hold.
    outage_s: tuple[float, float] = (args.registry_outage[0], args.registry_outage[1])
    outage_planned = outage_s[1] > 0
    kinds = plan_kinds(args.events, args.poison_rate, args.oversize_rate, rng)
    n_late = round(args.events * LATE_SHARE) if outage_planned else 0
    n_normal = kinds.count("normal")
    writer = InputWriter(
        settings,
        Publisher(settings, producer_name="chaos"),
        MESSAGE_ID_DOMAIN,
        random.Random(args.seed + 1),
    )
    inputs: list[Input] = []

    def publish(upto: int) -> None:
        for i in range(len(inputs), upto):
            inputs.append(writer.write(i, kinds[i]))
            if i % 10_000 == 0:
                writer.flush()
        assert writer.flush(60) == 0, "inputs not acknowledged"
        assert not writer.errors, "inputs refused: " + "; ".join(writer.errors[:5])

    say(
        f"publishing {args.events - n_late} of {args.events} inputs: {n_normal} normal, "
        + ", ".join(f"{k} {kinds.count(k)}" for k in ("oversize", *POISON_KINDS))
    )
    publish(args.events - n_late)
    say(f"published {len(inputs)} inputs in {time.monotonic() - started:.1f}s")

    # The fault plan: progress fractions at which to kill whom. The router and one sink are
    # killed during the registry outage; that counts as one of their kills.
    outage_sink = rng.choice(sinks)
    plan: list[tuple[float, str]] = []
    for p in victims:
        during_outage = outage_planned and p in (router, outage_sink)
        plan += [(rng.uniform(0.2, 0.9), p.name) for _ in range(args.kills - during_outage)]
    plan += [(rng.uniform(0.3, 0.8), "broker") for _ in range(args.broker_restarts)]
    if outage_planned:
        plan.append((rng.uniform(0.2, 0.6), "registry"))
    plan.sort()
    by_name = {p.name: p for p in victims}
    broker_restarts = 0
    outage: Outage | None = None
    outages: list[str] = []
    dead_letters: list[DeadLetterSeen] = []
    dlq_reader: TopicReader | None = None
    last_progress, last_change = (-1, -1), time.monotonic()

    def restart(who: Proc, why: str) -> None:
        say(f"SIGKILL {who.name} {why}")
        who.kill()
        time.sleep(rng.uniform(0.2, 1.5))
        who.start()

    while True:
        got = {mid for mid, _ in received(id_log)}
        expected = {i.message_id for i in inputs if i.kind == "normal"}
        done = len(got & expected)
        progress = done / max(1, n_normal)
        if (done, len(dead_letters)) != last_progress:
            last_progress, last_change = (done, len(dead_letters)), time.monotonic()
        while plan and progress >= plan[0][0]:
            _, who = plan.pop(0)
            if who == "broker":
                if isinstance(broker, LocalKafkaCluster):
                    node = rng.randint(1, broker.size)
                    say(f"SIGKILL broker node {node} at {progress:.0%}")
                    broker.kill_node(node)
                    time.sleep(rng.uniform(2, 5))
                    broker.start_node(node)
                else:
                    say(f"SIGKILL the broker at {progress:.0%}")
                    broker.kill()
                    time.sleep(rng.uniform(1, 3))
                    broker.start()
                broker_restarts += 1
                say("broker back")
            elif who == "registry":
                sink = outage_sink
                outage = Outage(time.monotonic(), rng.uniform(*outage_s))
                say(f"SIGKILL the schema registry at {progress:.0%} for {outage.length:.0f}s")
                registry.kill()
                # The router dies before the late inputs exist, so none with the ids cached
                # routes them: its successor must look them up. The sink's successor must
                # look up the intents' id for its backlog.
                say(f"SIGKILL router and {sink.name} during the registry outage")
                router.kill()
                sink.kill()
                publish(args.events)
                say(f"published the last {n_late} inputs during the outage")
                time.sleep(rng.uniform(0.2, 1.0))
                for p in (router, sink):
                    outage.watch(p)
                    p.start()
            else:
                restart(by_name[who], f"at {progress:.0%}")
        if outage is not None and outage.over(time.monotonic()):
            registry.start()
            wait_port(registry_port, timeout=30)
            outages.append(outage.describe(time.monotonic()))
            say(f"schema registry back: {outages[-1]}")
            outage = None
        # A supervisor restarts what died on its own (e.g. broker gone).
        for p in [*victims, registry] if outage is None else victims:
            if not p.alive():
                p.crashes += 1
                say(f"{p.name} exited (code {p.proc.returncode if p.proc else '?'}); restarting")
                p.start()
        if done >= n_normal and not plan and outage is None:
            # Every event delivered: wait for the dead letters of the rest.
            if dlq_reader is None:
                dlq_reader = TopicReader(
                    bootstrap,
                    [topics.events_dlq, topics.notifications_dlq("email")],
                    lambda m: dead_letters.append(dead_letter_seen(m)),
                )
            dlq_reader.read(1.0)
            if not account(inputs, got, dead_letters).unaccounted:
                time.sleep(args.settle)  # late duplicates would arrive now
                break
        if time.monotonic() - last_change > args.stall_timeout:
            say(f"no progress for {args.stall_timeout}s; giving up")
            break
        time.sleep(0.5)

    if dlq_reader is not None:
        dlq_reader.close()
    for p in victims:
        p.stop()
    smtp.stop()
    registry.stop()

    # What a downstream reader sees, now that no transaction is open.
    dead_letters = []
    reader = TopicReader(
        bootstrap,
        [topics.events_dlq, topics.notifications_dlq("email")],
        lambda m: dead_letters.append(dead_letter_seen(m)),
    )
    complete = reader.read(120)
    reader.close()
    intents: Counter[str] = Counter()
    reader = TopicReader(
        bootstrap,
        [topics.notifications("email")],
        lambda m: intents.update([h.as_dict(m.headers()).get(h.NOTIFICATION_ID, "")]),
    )
    complete = reader.read(300) and complete
    reader.close()
    # Every input as Kafka holds it (by key): an input the producer saw acknowledged but
    # that is not in the topic was lost before Herald could see it; it is reported as such.
    stored: dict[bytes, tuple[str, int, int]] = {}

    def keep(m: Message) -> None:
        stored[m.key() or b""] = (str(m.topic()), int(m.partition() or 0), int(m.offset() or 0))

    reader = TopicReader(bootstrap, [topics.events("user")], keep)
    complete = reader.read(300) and complete
    reader.close()
    for item in inputs:
        item.in_kafka = item.key.encode() in stored
        if item.in_kafka and item.coords is None:
            item.coords = stored[item.key.encode()]
    if not complete:
        say("could not read every partition to its end; the accounting below is partial")
    broker.stop()

    rows = received(id_log)
    counts = Counter(mid for mid, _ in rows)
    per_recipient: dict[str, set[str]] = {}
    for mid, rcpt in rows:
        per_recipient.setdefault(rcpt, set()).add(mid)
    verdict = account(inputs, set(counts), dead_letters)
    duplicates = sum(len(ids) - 1 for ids in per_recipient.values() if len(ids) > 1)
    raw_duplicates = sum(n - 1 for n in counts.values() if n > 1)
    router_duplicates = extra_copies(intents)
    kills = sum(p.kills for p in victims)
    seconds = time.monotonic() - started
    partitions_per_sink = -(-args.partitions // args.sinks)
    bound = kills * args.in_flight * partitions_per_sink
    say(
        f"router kills={router.kills} crashes={router.crashes}; "
        + "; ".join(f"{s.name} kills={s.kills} crashes={s.crashes}" for s in sinks)
        + f"; registry crashes={registry.crashes}"
    )
    for line in outages:
        say(f"registry outage: {line}")
    if outage_planned:
        say(
            f"records held for the registry over the run (from the logs): router "
            f"{len(held_records(router.log))} events, sinks "
            f"{sum(len(held_records(s.log)) for s in sinks)} intents"
        )
    by_topic = Counter(dl.topic for dl in dead_letters)
    say(
        "dead letters: "
        + ", ".join(f"{t}={n}" for t, n in sorted(by_topic.items()))
        + f" ({sum(dl.truncated for dl in dead_letters)} truncated)"
        if dead_letters
        else "dead letters: none"
    )
    say(
        f"intents in {topics.notifications('email')}: {sum(intents.values())} records, "
        f"{len(intents)} notification ids, {router_duplicates} extra copies"
    )
    for line in verdict.wrong[:20]:
        say(f"WRONG: {line}")
    for item in verdict.unaccounted[:20]:
        say(f"UNACCOUNTED: {item.describe()}")
    for item in verdict.not_in_kafka[:20]:
        say(f"NOT IN KAFKA (acknowledged, absent from the topic): {item.describe()}")
    for dl in verdict.stray[:5]:
        say(f"dead letter of no input: {dl}")
    say(
        f"raw duplicate bound: kills x in-flight window per sink process "
        f"({args.in_flight} per partition x {partitions_per_sink} partitions) = {bound}"
    )
    say(f"logs in {work}")
    print(
        f"RESULT events={args.events} delivered={verdict.delivered} lost={verdict.lost} "
        f"duplicates={duplicates} raw_duplicates={raw_duplicates} kills={kills} "
        f"broker_restarts={broker_restarts} seconds={seconds:.0f} "
        f"dead_lettered={verdict.dead_lettered} unaccounted={len(verdict.unaccounted)} "
        f"router_duplicates={router_duplicates} not_in_kafka={len(verdict.not_in_kafka)}",
        flush=True,
    )
    ok = (
        verdict.lost == 0
        and duplicates == 0
        and not verdict.unaccounted
        and not verdict.not_in_kafka
        and not verdict.wrong
        and len(inputs) == args.events
        and raw_duplicates <= bound
    )
    return 0 if ok else 1


# A record held (router or sink), or a sink's start held until it can register the status
# schema: either way the process had to ask the registry and waited instead of moving on.
HELD = re.compile(r"holding (\S+\[\d+\]@\d+|the \S+ sink's start)")


def held_records(log: Path, since: int = 0) -> set[str]:
    """What a router or sink logged as held for the schema registry (in ``log`` from byte
    ``since``): records by their coordinates, and a sink's start."""
    if not log.exists():
        return set()
    with open(log, "rb") as f:
        f.seek(since)
        return set(HELD.findall(f.read().decode(errors="replace")))


@dataclass
class Outage:
    """The schema registry down: for ``length`` seconds, and longer if need be (at most
    OUTAGE_MAX_S in all) until each process restarted during it has held a record, i.e. had
    to look an id up: a restart can take longer than the outage on a loaded machine."""

    began: float
    length: float
    watched: dict[str, tuple[Path, int]] = field(default_factory=dict)  # log, size at start
    held: dict[str, int] = field(default_factory=dict)  # name -> records held

    def watch(self, p: Proc) -> None:
        self.watched[p.name] = (p.log, p.log.stat().st_size if p.log.exists() else 0)

    def over(self, now: float) -> bool:
        for name, (log, since) in self.watched.items():
            self.held[name] = len(held_records(log, since))
        elapsed = now - self.began
        waiting = any(n == 0 for n in self.held.values())
        return elapsed >= self.length and (not waiting or elapsed >= OUTAGE_MAX_S)

    def describe(self, now: float) -> str:
        held = ", ".join(f"{name} held {n} records or starts" for name, n in self.held.items())
        return f"down {now - self.began:.1f}s (planned {self.length:.1f}s); meanwhile {held}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.chaos", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("smtp", help="(internal) the receiving SMTP server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--id-log", required=True)
    s.add_argument("--fail-rate", type=float, default=0.05)
    s.add_argument("--drop-rate", type=float, default=0.02)
    s.add_argument("--seed", type=int, default=1)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--cluster", type=int, default=1, help="3 for a 3-broker cluster")
    p.add_argument("--sinks", type=int, default=2)
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--in-flight", type=int, default=8, help="HERALD_SINK_MAX_IN_FLIGHT")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs per process")
    p.add_argument("--broker-restarts", type=int, default=1)
    p.add_argument(
        "--registry-outage",
        type=float,
        nargs=2,
        default=[10.0, 20.0],
        metavar=("MIN", "MAX"),
        help="seconds the schema registry is down, at random in [MIN, MAX]; 0 0: no outage",
    )
    p.add_argument("--poison-rate", type=float, default=0.01, help="share of poison records")
    p.add_argument(
        "--oversize-rate", type=float, default=0.005, help="share of events over the limit"
    )
    p.add_argument("--fail-rate", type=float, default=0.05, help="SMTP 451 probability")
    p.add_argument("--drop-rate", type=float, default=0.02, help="SMTP hang-up probability")
    p.add_argument("--ledger-url", default=None, help="default: SQLite in the work dir")
    p.add_argument("--log-level", default="WARNING", help="HERALD_LOG_LEVEL of the pipeline")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--stall-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    if args.command == "smtp":
        return smtp_server_main(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
