"""Fault-injection harness: proves effectively-once delivery by killing things.

    python -m bench.chaos --events 100000                 # make chaos EVENTS=100000
    python -m bench.chaos --events 100000 --cluster 3     # make chaos CLUSTER=3

N user-registered events go through the router (exactly_once) and two email sink processes
sharing a consumer group, into a real SMTP server (a separate process) that answers 451 at
random and drops connections before accepting a message. During the run the harness
SIGKILLs the router and each sink at random moments (each at least ``--kills`` times, all
after 20% progress), and hard-kills and restarts the broker (single node) or one node of the
3-broker cluster. Every process that dies is restarted, as a supervisor would.

At the end it checks at the receiver, by Message-ID, against the ids the events must yield:
lost (expected, never received), duplicates (a recipient that got more than one distinct
Message-ID: a second notification that dedupe by Message-ID cannot remove) and raw
duplicates (one Message-ID received more than once: the SMTP duplicate window, bounded by
what was in flight at each kill). The last line is:

    RESULT events=N delivered=D lost=L duplicates=X raw_duplicates=R kills=K
           broker_restarts=B seconds=S          (one line)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from devtools.cluster import LocalKafkaCluster
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.local import LocalKafka
from pipeline.publisher import Publisher
from pipeline.records import notification_id
from pipeline.settings import HeraldSettings, project_root

MESSAGE_ID_DOMAIN = "herald.localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def env_for(settings: HeraldSettings) -> dict[str, str]:
    env = {**os.environ, "HERALD_LOG_LEVEL": "WARNING"}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"HERALD_{name.upper()}"] = str(value)
    env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    return env


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
    id_log = work / "received.log"
    ledger = args.ledger_url or f"sqlite:///{work / 'ledger.db'}"
    settings = HeraldSettings(
        kafka_bootstrap_servers=bootstrap,
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
    env = env_for(settings)
    # The email connector's own settings (EmailSettings).
    env.update(
        HERALD_SMTP_PORT=str(smtp_port),
        HERALD_SMTP_CONNECTIONS="4",
        HERALD_MESSAGE_ID_DOMAIN=MESSAGE_ID_DOMAIN,
    )

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

    # Publish everything; the pipeline works through it while things get killed.
    publisher = Publisher(settings, producer_name="chaos")
    expected: dict[str, str] = {}
    say(f"publishing {args.events} events")
    for i in range(args.events):
        email = f"user{i}@example.com"
        ev = publisher.publish(
            "user-registered", {"user_id": f"u{i}", "email": email, "display_name": f"User {i}"}
        )
        nid = notification_id(ev.event_id, "welcome-email", "email", email)
        expected[f"<{nid}@{MESSAGE_ID_DOMAIN}>"] = email
        if i % 10_000 == 0:
            publisher.flush()
    assert publisher.flush(60) == 0, "events not acknowledged"
    say(f"published {args.events} events in {time.monotonic() - started:.1f}s")

    # The kill plan: progress fractions at which to kill whom.
    plan: list[tuple[float, str]] = []
    for p in victims:
        plan += [(rng.uniform(0.2, 0.9), p.name) for _ in range(args.kills)]
    plan += [(rng.uniform(0.3, 0.8), "broker") for _ in range(args.broker_restarts)]
    plan.sort()
    by_name = {p.name: p for p in victims}
    broker_restarts = 0
    last_progress, last_change = -1, time.monotonic()
    while True:
        got = {mid for mid, _ in received(id_log)}
        done = len(got & expected.keys())
        progress = done / args.events
        if done != last_progress:
            last_progress, last_change = done, time.monotonic()
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
            else:
                say(f"SIGKILL {who} at {progress:.0%}")
                by_name[who].kill()
                time.sleep(rng.uniform(0.2, 1.5))
                by_name[who].start()
        for p in victims:  # a supervisor restarts what died on its own (e.g. broker gone)
            if not p.alive():
                p.crashes += 1
                say(f"{p.name} exited (code {p.proc.returncode if p.proc else '?'}); restarting")
                p.start()
        if done >= args.events and not plan:
            time.sleep(args.settle)  # late duplicates would arrive now
            break
        if time.monotonic() - last_change > args.stall_timeout:
            say(f"no progress for {args.stall_timeout}s; giving up")
            break
        time.sleep(0.5)

    for p in victims:
        p.stop()
    smtp.stop()
    broker.stop()

    rows = received(id_log)
    counts = Counter(mid for mid, _ in rows)
    per_recipient: dict[str, set[str]] = {}
    for mid, rcpt in rows:
        per_recipient.setdefault(rcpt, set()).add(mid)
    delivered = len(counts.keys() & expected.keys())
    lost = len(expected.keys() - counts.keys())
    duplicates = sum(len(ids) - 1 for ids in per_recipient.values() if len(ids) > 1)
    raw_duplicates = sum(n - 1 for n in counts.values() if n > 1)
    kills = sum(p.kills for p in victims)
    seconds = time.monotonic() - started
    partitions_per_sink = -(-args.partitions // args.sinks)
    bound = kills * args.in_flight * partitions_per_sink
    say(
        f"router kills={router.kills} crashes={router.crashes}; "
        + "; ".join(f"{s.name} kills={s.kills} crashes={s.crashes}" for s in sinks)
    )
    say(
        f"raw duplicate bound: kills x in-flight window per sink process "
        f"({args.in_flight} per partition x {partitions_per_sink} partitions) = {bound}"
    )
    say(f"logs in {work}")
    print(
        f"RESULT events={args.events} delivered={delivered} lost={lost} "
        f"duplicates={duplicates} raw_duplicates={raw_duplicates} kills={kills} "
        f"broker_restarts={broker_restarts} seconds={seconds:.0f}",
        flush=True,
    )
    ok = lost == 0 and duplicates == 0 and raw_duplicates <= bound
    return 0 if ok else 1


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
    p.add_argument("--fail-rate", type=float, default=0.05, help="SMTP 451 probability")
    p.add_argument("--drop-rate", type=float, default=0.02, help="SMTP hang-up probability")
    p.add_argument("--ledger-url", default=None, help="default: SQLite in the work dir")
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--stall-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    if args.command == "smtp":
        return smtp_server_main(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
