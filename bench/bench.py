"""Throughput, latency, memory and scaling of Herald on a real local broker (`make bench`).

    python -m bench.bench                       # the full run (about 10-12 minutes)
    python -m bench.bench --quick               # small sizes, a few minutes
    python -m bench.bench --events 20000 --backlog 200000

Each figure is a ratio of two contenders measured side by side in one run, on one machine,
against the same receiver: Herald against a bare loop doing only the transport work (or,
for the router, only Herald's own work), and against a naive sink, on loopback and behind a
provider that answers after 50 ms (see bench/README.md for the method). The harness starts
its own broker (Maven jars, temp dir, free loopback ports), nginx, smtp-sink and delaying
receivers, runs Herald as the commands an operator runs (`herald run router`,
`herald run sink CHANNEL`), prints a table, every aim with its figure, the profile, and
ends with one line:

    RESULT router_ratio=... router_work_ratio=... email_ratio=... webhook_ratio=...
           webhook_speedup_50ms=... email_speedup_50ms=... p99_ms_500=... rss_growth=...
           scale_2=... ...                                                   (one line)

Everything stops by itself: every wait is bounded by a count, a stall timeout and a limit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.chaos import Proc, env_for
from bench.profiling import Profile, pyspy
from bench.profiling import record as pyspy_record
from bench.receivers import DelayReceiver, Nginx, SmtpSink, free_port, wrk_rate
from bench.workload import (
    TopicCounter,
    event_records,
    intent,
    intent_records,
    produce_all,
    steady_rate,
    steady_window,
    wait_count,
)
from connectors.email import EmailSettings
from connectors.webhook import WebhookSettings, payload
from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.local import LocalKafka
from pipeline.records import notification_id
from pipeline.settings import HeraldSettings, project_root
from pipeline.topics import Topics

MESSAGE_ID_DOMAIN = "herald.localhost"
# A signing secret for the benchmark's webhooks (32 bytes of zeros, base64): not a secret.
WEBHOOK_SECRETS = '{"default": ["whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]}'


# The aims of the issue "Fast where it counts", per RESULT key: (comparison, bound).
AIMS: dict[str, tuple[str, float]] = {
    "router_ratio": (">=", 0.3),
    "router_work_ratio": (">=", 0.7),
    "email_ratio": (">=", 0.7),
    "webhook_ratio": (">=", 0.5),
    "webhook_speedup_50ms": (">=", 50),
    "email_speedup_50ms": (">=", 10),
    "p99_ms_500": ("<=", 250),
    "rss_growth": ("<=", 1.2),
}


def judge(key: str, value: float | None) -> str:
    """``(aim >= 0.5) met`` / ``missed`` / ``not measured``; empty for a figure with no aim."""
    if key not in AIMS:
        return ""
    op, bound = AIMS[key]
    aim = f"(aim {op} {bound:g})"
    if value is None:
        return f"{aim} not measured"
    ok = value >= bound if op == ">=" else value <= bound
    return f"{aim} {'met' if ok else 'missed'}"


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


@dataclass
class Row:
    section: str
    label: str
    value: float | None
    unit: str
    note: str = ""


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    result: dict[str, str] = field(default_factory=dict)
    profiles: list[Profile] = field(default_factory=list)
    values: dict[str, float | None] = field(default_factory=dict)  # of the figures with aims

    def add(self, section: str, label: str, value: float | None, unit: str, note: str = "") -> None:
        self.rows.append(Row(section, label, value, unit, note))
        shown = "n/a" if value is None else f"{value:,.{2 if unit == 'x' else 1}f} {unit}"
        say(f"{section}: {label}: {shown} {note}".rstrip())

    def put(self, key: str, value: float | None, digits: int = 2) -> None:
        self.result[key] = "na" if value is None else f"{value:.{digits}f}"
        if key in AIMS:
            self.values[key] = value

    def ratio(
        self,
        section: str,
        key: str,
        how: str,
        value: float | None,
        per_cpu: float | None = None,
    ) -> None:
        """A ratio row, ``key (how)``, with its aim next to it, and its RESULT entry.
        ``per_cpu``: the same ratio of records per CPU-second (``key_cpu``), for context."""
        note = judge(key, value)
        self.put(key, value)
        if per_cpu is not None:
            note = f"{note}; per CPU-second {per_cpu:.2f}".lstrip("; ")
            self.put(f"{key}_cpu", per_cpu)
        self.add(section, f"{key} ({how})", value, "x", note)

    def aims(self) -> str:
        """Every aim with its figure, measured or not."""
        out = ["aims"]
        for key in AIMS:
            value = self.values.get(key)
            shown = "n/a" if value is None else f"{value:,.{0 if key.startswith('p') else 2}f}"
            out.append(f"  {key} {shown} {judge(key, value)}")
        return "\n".join(out)

    def table(self) -> str:
        width = max(len(r.label) for r in self.rows) if self.rows else 10
        out, section = [], None
        for r in self.rows:
            if r.section != section:
                section = r.section
                out.append(f"\n{section}")
            digits = 2 if r.unit == "x" else 1
            value = "n/a" if r.value is None else f"{r.value:>12,.{digits}f} {r.unit}"
            out.append(f"  {r.label:<{width}}  {value:<22} {r.note}".rstrip())
        return "\n".join(out)

    def result_line(self) -> str:
        return "RESULT " + " ".join(f"{k}={v}" for k, v in self.result.items())


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runq_seconds(pid: int) -> float:
    """Time the threads of a process have spent runnable but waiting for a core so far
    (schedstat): on a busy machine, the CPU a contender wanted and did not get."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    import confluent_kafka

    return {
        "cpus": str(os.cpu_count()),
        "model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "librdkafka": confluent_kafka.libversion()[0],
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="herald-bench-"))
        self.results = Results()
        self.kafka: LocalKafka | None = None
        self.bootstrap = ""
        self._cleanup: list[Callable[[], object]] = []
        self.cpu: float | None = None
        self.receiver_cpu: float | None = None
        self.runq: float | None = None  # contenders' waiting for a core, in cores
        # The webhook connector's own default unless --webhook-connections says otherwise.
        self.webhook_conns: int = args.webhook_connections or int(
            WebhookSettings.model_fields["max_connections"].default
        )
        # What `herald run router` runs: "faust" before HERALD_ROUTER_ENGINE existed.
        self.router_engine = str(getattr(HeraldSettings(), "router_engine", "faust"))
        self.webhook_url: str | None = None
        # Faust settings for the router's environment (e.g. PRODUCER_LINGER=0.005).
        self.router_env = dict(kv.split("=", 1) for kv in args.router_env)
        self.email_settings: HeraldSettings | None = None
        self.email_smtp: SmtpSink | None = None
        self.smtp_ports: dict[str, int] = {}  # topic prefix -> SMTP port of its row
        self.email_rate: float | None = None
        self.webhook_argv: list[str] = []

    # -- infrastructure ----------------------------------------------------------------------

    def settings(self, prefix: str, smtp_port: int | None = None, **extra: Any) -> HeraldSettings:
        """Settings of one row. The SMTP port belongs to the email connector's settings, not
        to HeraldSettings: it is kept per topic prefix and handed to processes by env()."""
        if smtp_port is not None:
            self.smtp_ports[prefix] = smtp_port
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": self.bootstrap,
            "topic_prefix": prefix,
            "topic_partitions": self.args.partitions,
            "router_data_dir": self.work / "router",
            "ledger_url": f"sqlite:///{self.work / 'ledger' / f'{prefix}db'}",
        }
        values.update(extra)
        return HeraldSettings(**values)

    def env(self, settings: HeraldSettings, **extra: str) -> dict[str, str]:
        env = env_for(settings)
        env.update(
            {
                "HERALD_WEBHOOK_SECRETS": WEBHOOK_SECRETS,
                "HERALD_WEBHOOK_ALLOW_HOSTS": "127.0.0.0/8",
                "HERALD_WEBHOOK_MAX_CONNECTIONS": str(self.webhook_conns),
                "HERALD_MESSAGE_ID_DOMAIN": MESSAGE_ID_DOMAIN,
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        if settings.topic_prefix in self.smtp_ports:
            env["HERALD_SMTP_PORT"] = str(self.smtp_ports[settings.topic_prefix])
        env.update(extra)
        return env

    def start_broker(self) -> None:
        home = self.work / "kafka"
        (home / "lib").mkdir(parents=True)
        lib = project_root() / ".herald" / "kafka" / "lib"
        for jar in lib.glob("*.jar"):
            (home / "lib" / jar.name).symlink_to(jar)
        self.kafka = LocalKafka(home, port=free_port(), controller_port=free_port(), heap="1g")
        seconds = self.kafka.start()
        self.bootstrap = self.kafka.bootstrap_servers
        self._cleanup.append(self.kafka.stop)
        say(f"Kafka {self.kafka.version()} ready on {self.bootstrap} in {seconds:.1f}s")

    def herald(self, *args: str) -> list[str]:
        """The Python arguments of a ``herald`` command: this checkout's, or with
        ``--herald-root`` another checkout's pipeline/ and connectors/ (say, the commit
        before an optimization), to compare two versions side by side in one run."""
        root = self.args.herald_root
        if root is None:
            return ["-m", "pipeline.cli", *args]
        boot = (
            f"import runpy, sys; sys.path.insert(0, {str(root)!r}); "
            "runpy.run_module('pipeline.cli', run_name='__main__', alter_sys=True)"
        )
        return ["-c", boot, *args]

    def counter(self, topic: str, stamp_header: str | None = None) -> TopicCounter:
        c = TopicCounter(self.bootstrap, topic, stamp_header)
        self._cleanup.append(c.close)
        return c

    def proc(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        p = Proc(name, argv, env, self.work)
        p.start()
        self._cleanup.append(p.stop)
        return p

    def baseline(self, name: str, loop: str, args: list[str], env: dict[str, str]) -> Proc:
        return self.proc(name, ["-m", "bench.baselines", loop, *args], env)

    def finish(self, p: Proc, timeout: float = 60) -> None:
        """Wait for a process that stops by itself; kill it past ``timeout``."""
        if p.proc is None:
            return
        try:
            p.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            p.stop()
        if p.proc.returncode:
            say(f"{p.name} exited with code {p.proc.returncode}; log {p.log}")

    def measure(
        self,
        counter: Callable[[], int],
        target: int,
        procs: list[Proc],
        *,
        stall_s: float = 60,
        limit_s: float | None = None,
        receiver: int | None = None,
    ) -> float:
        """Steady rate at ``counter`` while ``procs`` work towards ``target``, for at most
        ``limit_s`` (``--row-seconds``). Leaves the CPU the processes used over the same
        window, in cores, in ``self.cpu`` (and the time they were runnable but waited for a
        core in ``self.runq``), and that of the ``receiver`` process (its pid) in
        ``self.receiver_cpu``. Processes that all stopped by themselves (their count or
        time was up) end the measurement a second later."""
        pids = [p.proc.pid for p in procs if p.proc is not None]
        # (time, contenders' CPU, receiver's CPU, contenders' wait for a core)
        cpu: list[tuple[float, float, float, float]] = []
        exited_at: float | None = None

        def check() -> bool:
            nonlocal exited_at
            for p in procs:
                if p.proc is not None and p.proc.poll() not in (None, 0):
                    raise RuntimeError(f"{p.name} exited with {p.proc.returncode}; see {p.log}")
            now = time.monotonic()
            cpu.append(
                (
                    now,
                    sum(cpu_seconds(pid) for pid in pids),
                    0.0 if receiver is None else cpu_seconds(receiver),
                    sum(runq_seconds(pid) for pid in pids),
                )
            )
            if procs and all(p.proc is not None and p.proc.poll() == 0 for p in procs):
                exited_at = exited_at or now
                return now - exited_at > 1.0  # what they sent has reached the counter
            return False

        limit = self.args.row_seconds if limit_s is None else limit_s
        samples = wait_count(counter, target, stall_s=stall_s, limit_s=limit, on_sample=check)
        got = samples[-1][1] - samples[0][1]
        if got < target:
            say(f"{got} of {target} arrived within the time limit; rate over those")
        window = steady_window(samples, target)
        self.cpu = self.receiver_cpu = self.runq = None
        if window is not None and cpu:
            (t0, _), (t1, _) = window
            c0 = min(cpu, key=lambda s: abs(s[0] - t0))
            c1 = min(cpu, key=lambda s: abs(s[0] - t1))
            if c1[0] > c0[0]:
                self.cpu = (c1[1] - c0[1]) / (c1[0] - c0[0])
                self.runq = (c1[3] - c0[3]) / (c1[0] - c0[0])
                if receiver is not None:
                    self.receiver_cpu = (c1[2] - c0[2]) / (c1[0] - c0[0])
        return steady_rate(samples, target)

    def per_cpu(self, rate: float) -> float | None:
        """Records per CPU-second of the contender just measured."""
        return rate / self.cpu if self.cpu else None

    def cpu_note(self) -> str:
        if self.cpu is None:
            return ""
        note = f"CPU {self.cpu:.2f} cores"
        if self.runq is not None:
            note += f", {self.runq:.2f} waiting for one"
        if self.receiver_cpu is not None:
            note += f"; receiver {self.receiver_cpu:.2f}"
        return f"({note})"

    # -- 1. router ---------------------------------------------------------------------------

    def router(self) -> None:
        n = self.args.events
        s = self.settings(
            "r.", router_app_id="bench-router", topic_partitions=self.args.router_partitions
        )
        ensure_topics(s)
        say(f"router: preloading {n} events")
        produce_all(s, event_records(s, "r", 0, n))
        env = self.env(s)
        topics = [f"{s.topic_prefix}events.user", f"{s.topic_prefix}events.order"]

        bare_out = "r.bench.bare-out"
        ensure_topics(s, [bare_out])
        counter = self.counter(bare_out)
        p = self.baseline(
            "bare-kafka-loop",
            "kafka-loop",
            [
                *("--bootstrap", self.bootstrap, "--source", *topics, "--dest", bare_out),
                *("--group", "bench-bare", "--count", str(n), "--seconds", "600"),
            ],
            env,
        )
        bare = self.measure(counter, n, [p])
        bare_pc = self.per_cpu(bare)
        counter.close()
        self.finish(p)
        self.results.add(
            "router", "bare aiokafka consume->produce loop", bare, "events/s", self.cpu_note()
        )

        # Herald's own work in the plainest transactional loop: the same events, the same
        # handler, its intents written to the topics of another prefix (so that the
        # router's output topic below starts empty).
        ws = self.settings("rw.", topic_partitions=self.args.router_partitions)
        ensure_topics(ws)
        counter = self.counter(Topics(ws.topic_prefix).notifications("email"))
        p = self.baseline(
            "work-loop",
            "work-loop",
            [
                *("--source", *topics, "--group", "bench-work"),
                *("--count", str(n), "--seconds", "600"),
            ],
            self.env(ws),
        )
        work = self.measure(counter, n, [p])
        work_pc = self.per_cpu(work)
        counter.close()
        self.finish(p)
        self.results.add(
            "router",
            "Herald's work (decode, route, render, encode), bare transactional loop",
            work,
            "events/s",
            self.cpu_note(),
        )

        counter = self.counter(Topics(s.topic_prefix).notifications("email"))
        p = self.proc("router", self.herald("run", "router"), env | self.router_env)
        herald = self.measure(counter, n, [p])
        herald_pc = self.per_cpu(herald)
        counter.close()
        p.stop()
        self.results.add(
            "router",
            f"Herald router (herald run router: {self.router_engine}, exactly_once)",
            herald,
            "events/s",
            self.cpu_note(),
        )
        self.results.ratio(
            "router",
            "router_ratio",
            "Herald / bare loop",
            ratio(herald, bare),
            ratio(herald_pc, bare_pc),
        )
        self.results.ratio(
            "router",
            "router_work_ratio",
            "Herald / its work in a bare loop",
            ratio(herald, work),
            ratio(herald_pc, work_pc),
        )
        self.results.put("router_eps", herald, 0)
        self.results.put("work_loop_eps", work, 0)
        self.results.put("bare_kafka_eps", bare, 0)

    # -- 2. email ----------------------------------------------------------------------------

    def email(self) -> None:
        n = self.args.events
        s = self.settings("s.")
        ensure_topics(s)
        say(f"email: preloading {n} intents")
        produce_all(s, intent_records(s, "s", n, "email"))
        smtp = SmtpSink(self.work / "smtp-sink").start()
        self._cleanup.append(smtp.stop)
        self.smtp_ports[s.topic_prefix] = smtp.port
        env = self.env(s)
        conns = EmailSettings().smtp_connections

        start = smtp()
        p = self.baseline(
            "bare-smtp-loop",
            "smtp-loop",
            [
                "--run",
                "s",
                "--count",
                str(n),
                "--concurrency",
                str(conns),
                "--port",
                str(smtp.port),
            ],
            env,
        )
        bare = self.measure(lambda: smtp() - start, n, [p])
        bare_pc = self.per_cpu(bare)
        self.finish(p)
        self.results.add(
            "email", f"bare aiosmtplib loop, {conns} connections", bare, "msg/s", self.cpu_note()
        )

        herald = self.run_sinks("email", s, smtp, n, processes=1)
        herald_pc = self.per_cpu(herald)
        self.results.add(
            "email",
            f"Herald email sink ({conns} SMTP connections)",
            herald,
            "msg/s",
            self.cpu_note(),
        )

        naive_n = min(n, self.args.naive_count)
        start = smtp()
        p = self.baseline(
            "naive-smtp",
            "naive-smtp",
            [
                *("--topic", Topics(s.topic_prefix).notifications("email")),
                *("--group", "bench-naive-email", "--port", str(smtp.port)),
                *("--count", str(naive_n), "--seconds", str(self.args.naive_seconds)),
            ],
            env,
        )
        naive = self.measure(lambda: smtp() - start, naive_n, [p], stall_s=30)
        self.finish(p, self.args.naive_seconds + 60)
        self.results.add(
            "email", "naive sink: smtplib, commit per message", naive, "msg/s", self.cpu_note()
        )
        self.results.ratio(
            "email", "email_ratio", "Herald / bare", ratio(herald, bare), ratio(herald_pc, bare_pc)
        )
        self.results.ratio("email", "email_speedup", "Herald / naive", ratio(herald, naive))
        self.results.put("email_mps", herald, 0)
        self.email_settings, self.email_smtp = s, smtp
        self.email_rate = herald

    def run_sinks(
        self,
        channel: str,
        s: HeraldSettings,
        counter: Callable[[], int],
        n: int,
        *,
        processes: int,
        tag: str = "",
        argv: list[str] | None = None,
        limit_s: float | None = None,
        receiver: int | None = None,
    ) -> float:
        """Start ``processes`` sinks in one fresh group with a fresh ledger, measure their
        delivery rate at the receiver over ``n`` intents (or ``limit_s``), stop them."""
        name = f"{channel}{tag}-{processes}"
        s = s.model_copy(
            update={
                "sink_group_prefix": f"bench-{name}",
                "ledger_url": f"sqlite:///{self.work / 'ledger' / f'{name}.db'}",
            }
        )
        env = self.env(s)
        start = counter()
        procs = [
            self.proc(
                f"sink-{name}-{i}",
                argv or self.herald("run", "sink", channel),
                {**env, "HERALD_SINK_INSTANCE_ID": f"bench-{name}-{i}"},
            )
            for i in range(processes)
        ]
        rate = self.measure(lambda: counter() - start, n, procs, limit_s=limit_s, receiver=receiver)
        for p in procs:
            p.stop()
        return rate

    # -- 3. webhook --------------------------------------------------------------------------

    def webhook_sink_argv(self) -> list[str]:
        from connectors.registry import load_connectors

        if "webhook" not in load_connectors():  # written but not registered (pip install -e)
            return ["-m", "bench.sinkrun", "connectors.webhook:WebhookConnector"]
        return self.herald("run", "sink", "webhook")

    def webhook(self) -> None:
        n = self.args.events
        nginx = Nginx(self.work / "nginx").start()
        self._cleanup.append(nginx.stop)
        s = self.settings("s.")
        ensure_topics(s)
        say(f"webhook: preloading {n} intents")
        produce_all(s, intent_records(s, "w", n, "webhook", nginx.url))
        env = self.env(s)
        conns = self.webhook_conns

        body = payload(intent("w", 0, "webhook", nginx.url))
        wrk = wrk_rate(nginx.url + "/hooks/0", body, connections=conns, seconds=5, work=self.work)
        self.results.add("webhook", f"wrk, {conns} connections (reference)", wrk, "req/s")

        start = nginx()
        p = self.baseline(
            "bare-http-loop",
            "http-loop",
            [
                *("--run", "w", "--count", str(n), "--concurrency", str(conns)),
                *("--channel", "webhook", "--url-base", nginx.url),
            ],
            env,
        )
        bare = self.measure(lambda: nginx() - start, n, [p])
        bare_pc = self.per_cpu(bare)
        self.finish(p)
        self.results.add(
            "webhook", f"bare aiohttp loop, {conns} concurrent", bare, "req/s", self.cpu_note()
        )

        argv = self.webhook_sink_argv()
        self.webhook_url = nginx.url
        self.webhook_argv = argv
        herald = self.run_sinks("webhook", s, nginx, n, processes=1, argv=argv)
        herald_pc = self.per_cpu(herald)
        self.results.add(
            "webhook",
            f"Herald webhook sink (max {conns} connections)",
            herald,
            "req/s",
            self.cpu_note(),
        )

        naive_n = min(n, self.args.naive_count)
        start = nginx()
        p = self.baseline(
            "naive-http",
            "naive-http",
            [
                *("--topic", Topics(s.topic_prefix).notifications("webhook")),
                *("--group", "bench-naive-webhook"),
                *("--count", str(naive_n), "--seconds", str(self.args.naive_seconds)),
            ],
            env,
        )
        naive = self.measure(lambda: nginx() - start, naive_n, [p], stall_s=30)
        self.finish(p, self.args.naive_seconds + 60)
        self.results.add(
            "webhook",
            "naive sink: blocking POST, commit per message",
            naive,
            "req/s",
            self.cpu_note(),
        )
        self.results.ratio(
            "webhook",
            "webhook_ratio",
            "Herald / bare",
            ratio(herald, bare),
            ratio(herald_pc, bare_pc),
        )
        self.results.ratio("webhook", "webhook_speedup", "Herald / naive", ratio(herald, naive))
        self.results.put("webhook_rps", herald, 0)
        self.results.put("wrk_rps", wrk, 0)

    # -- 4. a provider 50 ms away -------------------------------------------------------------

    def provider(self) -> None:
        """Herald's sinks against the naive ones when every answer takes
        ``--provider-delay-ms``, as from a provider across a network: what concurrency buys.
        Timed rows (``--provider-seconds`` each; a naive sink does ~1/delay per second), with
        each connector's default connection count."""
        delay, secs = self.args.provider_delay_ms, self.args.provider_seconds
        d = f"{delay:g}ms"
        n = self.args.events
        http = DelayReceiver("http", self.work / "delay-http", delay).start()
        self._cleanup.append(http.stop)
        smtp = DelayReceiver("smtp", self.work / "delay-smtp", delay).start()
        self._cleanup.append(smtp.stop)
        s = self.settings("d.", smtp_port=smtp.port)
        ensure_topics(s)
        say(f"provider: preloading {n} webhook and {n} email intents")
        produce_all(s, intent_records(s, "dw", n, "webhook", http.url))
        produce_all(s, intent_records(s, "de", n, "email"))
        env = self.env(s)
        rows = (
            ("webhook", http, f"max {self.webhook_conns} connections", "req/s", "naive-http"),
            (
                "email",
                smtp,
                f"{EmailSettings().smtp_connections} SMTP connections",
                "msg/s",
                "naive-smtp",
            ),
        )
        for channel, receiver, conns, unit, naive_loop in rows:
            argv = self.webhook_sink_argv() if channel == "webhook" else None
            receiver.reset_peaks()
            herald = self.run_sinks(
                channel,
                s,
                receiver,
                n,
                processes=1,
                tag=f"-{d}",
                argv=argv,
                limit_s=secs,
                receiver=receiver.pid,
            )
            peaks = receiver.status()
            self.results.add(
                "provider",
                f"Herald {channel} sink ({conns}), answers after {d}",
                herald,
                unit,
                # Little's law: requests waiting at the receiver, on average over the
                # window, are rate x delay; the receiver knows the most at any moment.
                f"{self.cpu_note()} in flight {herald * delay / 1000:.0f} on average, "
                f"at most {peaks['peak_waiting']}".strip(),
            )
            start = receiver()
            p = self.baseline(
                f"naive-{channel}-{d}",
                naive_loop,
                [
                    *("--topic", Topics(s.topic_prefix).notifications(channel)),
                    *("--group", f"bench-naive-{channel}-{d}", "--port", str(smtp.port)),
                    *("--count", str(n), "--seconds", str(secs)),
                ],
                env,
            )

            def sent_since(r: DelayReceiver = receiver, st: int = start) -> int:
                return r() - st

            naive = self.measure(
                sent_since,
                n,
                [p],
                stall_s=30,
                limit_s=secs + 30,
                receiver=receiver.pid,
            )
            self.finish(p, 60)
            self.results.add(
                "provider",
                f"naive {channel} sink, answers after {d}",
                naive,
                unit,
                self.cpu_note(),
            )
            errors = receiver.status()["errors"]
            if errors:
                say(f"provider: the {channel} receiver answered {errors} requests with errors")
            self.results.ratio(
                "provider",
                f"{channel}_speedup_{d}",
                "Herald / naive",
                ratio(herald, naive),
            )
            self.results.put(f"{channel}_{'rps' if channel == 'webhook' else 'mps'}_{d}", herald, 0)
        http.stop()
        smtp.stop()

    # -- 5. latency --------------------------------------------------------------------------

    def latency(self, label: str, key: str, rate: int, **router_env: str) -> None:
        seconds = self.args.latency_seconds
        smtp = SmtpSink(self.work / f"smtp-latency-{key}", dump=True).start()
        self._cleanup.append(smtp.stop)
        self._cleanup.append(smtp.cleanup)
        s = self.settings(
            f"l{key}.",
            smtp_port=smtp.port,
            router_app_id=f"bench-latency-{key}",
            processing_guarantee="exactly_once",
            topic_partitions=self.args.router_partitions,
        )
        ensure_topics(s)
        env = self.env(s)
        procs = [
            self.proc(
                f"latency-{key}-router",
                self.herald("run", "router"),
                {**env, **router_env},
            ),
            self.proc(f"latency-{key}-sink", self.herald("run", "sink", "email"), env),
        ]
        from pipeline.publisher import Publisher

        publisher = Publisher(s, producer_name="bench")
        say(f"latency ({label}): waiting for the pipeline to deliver")
        deadline = time.monotonic() + 120
        while smtp() == 0 and time.monotonic() < deadline:
            publisher.publish(
                "user-registered",
                {"user_id": "warm", "email": "warm@example.com", "display_name": "Warm"},
            )
            publisher.flush(5)
            time.sleep(0.5)
        time.sleep(3)
        warm = smtp()
        # When each intent became visible to the sink (committed to notifications.email):
        # splits the latency into the router's part and the sink's.
        visible = self.counter(Topics(s.topic_prefix).notifications("email"), h.NOTIFICATION_ID)
        say(f"latency ({label}): {rate} events/s for {seconds}s")
        sent: dict[str, float] = {}
        nids: dict[str, str] = {}  # Message-ID -> notification id
        total = int(rate * seconds)
        pids = {p.name.rsplit("-", 1)[1]: p.proc.pid for p in procs if p.proc is not None}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        runq0 = {name: runq_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        for i in range(total):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            email = f"user{i}@example.com"
            at = time.time()
            ev = publisher.publish(
                "user-registered", {"user_id": f"u{i}", "email": email, "display_name": f"U {i}"}
            )
            nid = notification_id(ev.event_id, "welcome-email", "email", email)
            sent[f"<{nid}@{MESSAGE_ID_DOMAIN}>"] = at
            nids[f"<{nid}@{MESSAGE_ID_DOMAIN}>"] = nid
            publisher.flush(0)  # serves delivery callbacks, does not wait
        elapsed = time.monotonic() - t0
        offered = total / elapsed
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) / elapsed for name, pid in pids.items()}
        runq = {name: (runq_seconds(pid) - runq0[name]) / elapsed for name, pid in pids.items()}
        publisher.flush(30)
        wait_count(lambda: smtp() - warm, total, stall_s=15, limit_s=120)
        for p in procs:
            p.stop()
        smtp.stop()
        visible.close()
        received = {mid: at for mid, at in smtp.received() if mid in sent}
        in_order = [(received[m] - sent[m]) * 1000 for m in sent if m in received]
        lat = sorted(in_order)
        seen = {m: visible.seen[nids[m]] for m in received if nids[m] in visible.seen}
        router_part = sorted((seen[m] - sent[m]) * 1000 for m in seen)
        sink_part = sorted((received[m] - seen[m]) * 1000 for m in seen)
        # A pipeline that keeps up has the same latency at the end as at the start; one
        # that does not builds a queue, and the latency grows with it.
        tenth = max(1, len(in_order) // 10)
        first, last = sorted(in_order[:tenth]), sorted(in_order[-tenth:])
        lost = total - len(lat)
        p50, p95, p99 = (percentile(lat, q) if lat else None for q in (50, 95, 99))
        self.results.add(
            "latency",
            f"{label}: offered",
            offered,
            "events/s",
            f"({len(lat)} of {total} received; CPU "
            + ", ".join(f"{name} {c:.2f}" for name, c in cpu.items())
            + " cores; waiting for one "
            + ", ".join(f"{name} {w:.2f}" for name, w in runq.items())
            + ")",
        )
        if lat:
            self.results.add(
                "latency",
                f"{label}: p50 of the first / last tenth",
                percentile(first, 50),
                "ms",
                f"/ {percentile(last, 50):,.0f} ms",
            )
        for q, v in (("p50", p50), ("p95", p95), ("p99", p99)):
            aim = judge(f"p99_ms_{rate}", v) if q == "p99" and key == "a" else ""
            self.results.add("latency", f"{label}: {q}", v, "ms", aim)
        if router_part:
            # Publish -> intent committed (router), intent committed -> received (sink).
            for part, values in (("router", router_part), ("sink", sink_part)):
                self.results.add(
                    "latency",
                    f"{label}: {part} part, p50",
                    percentile(values, 50),
                    "ms",
                    f"/ p99 {percentile(values, 99):,.0f} ms",
                )
        suffix = "" if key == "a" else f"_{key}"
        self.results.put(f"p50_ms{suffix}", p50, 0)
        self.results.put(f"p95_ms{suffix}", p95, 0)
        self.results.put(f"p99_ms{suffix}", p99, 0)
        if key == "a":  # the figure the aim names: p99_ms_500 at 500/s
            self.results.put(f"p99_ms_{rate}", p99, 0)
        if lost:
            self.results.put(f"latency_lost{suffix}", lost, 0)

    # -- 6. memory ---------------------------------------------------------------------------

    def memory(self) -> None:
        """Peak RSS of the router and of the email sink while each works through its first
        ``--memory-probe`` records, once with a backlog of that size and once with a
        backlog of ``--backlog``: the same work, only the records waiting behind differ."""
        probe = self.args.memory_probe
        peaks: dict[tuple[str, int], int] = {}
        smtp = SmtpSink(self.work / "smtp-memory").start()
        self._cleanup.append(smtp.stop)
        for size in (probe, self.args.backlog):
            say(f"memory: preloading {size:,} events and {size:,} intents")
            t = time.monotonic()
            rs = self.settings(
                f"mr{size}.",
                router_app_id=f"bench-memory-{size}",
                topic_partitions=self.args.router_partitions,
            )
            ss = self.settings(
                f"ms{size}.", smtp_port=smtp.port, topic_partitions=self.args.router_partitions
            )
            ensure_topics(rs)
            ensure_topics(ss)
            produce_all(rs, event_records(rs, f"m{size}", 0, size))
            produce_all(ss, intent_records(ss, f"m{size}", size, "email"))
            say(f"memory: preloaded in {time.monotonic() - t:.0f}s")

            out = self.counter(Topics(rs.topic_prefix).notifications("email"))
            start = smtp()
            for role, settings, argv, count in (
                ("router", rs, self.herald("run", "router"), out),
                (
                    "sink",
                    ss,
                    self.herald("run", "sink", "email"),
                    lambda st=start: smtp() - st,
                ),
            ):
                p = self.proc(f"memory-{role}-{size}", argv, self.env(settings))
                assert p.proc is not None
                pid = p.proc.pid
                wait_count(count, probe, stall_s=60, limit_s=600)
                # Hold on a moment: buffers that fill while the probe's records flow.
                time.sleep(self.args.memory_hold)
                peak = rss_kib(pid).get("VmHWM", 0)
                done = count()  # with a large backlog it went on working while held
                peaks[(role, size)] = peak
                p.stop()
                self.results.add(
                    "memory",
                    f"{role} peak RSS, backlog {size:,}",
                    peak / 1024,
                    "MiB",
                    f"({done:,} done when read)",
                )
            out.close()
        growth = {
            role: ratio(peaks[(role, self.args.backlog)], peaks[(role, probe)])
            for role in ("router", "sink")
        }
        for role, g in growth.items():
            self.results.add("memory", f"{role} RSS growth", g, "x")
        worst = max((g for g in growth.values() if g is not None), default=None)
        self.results.ratio("memory", "rss_growth", "the worse of the two", worst)
        self.results.put("rss_growth_router", growth["router"])
        self.results.put("rss_growth_sink", growth["sink"])

    # -- 7. scale ----------------------------------------------------------------------------

    def scale(self) -> None:
        s, smtp = self.email_settings, self.email_smtp
        assert s is not None and smtp is not None  # the email row ran (main() sees to it)
        n = self.args.events
        rates = {1: self.email_rate}
        for k in (2, 4):
            rates[k] = self.run_sinks("email", s, smtp, n, processes=k, tag="-scale")
            self.results.add(
                "scale",
                f"email sink, {k} processes, one group",
                rates[k],
                "msg/s",
                self.cpu_note(),
            )
        self.results.add("scale", "email sink, 1 process (from the email row)", rates[1], "msg/s")
        for k in (2, 4):
            self.results.add("scale", f"scale_{k}", ratio(rates[k], rates[1]), "x")
            self.results.put(f"scale_{k}", ratio(rates[k], rates[1]))

    # -- 8. profile --------------------------------------------------------------------------

    def profile(self) -> None:
        """Sample the router and each sink with py-spy while they work through a backlog
        of their own (``--profile-events``, enough for the start-up wait plus the profile
        time); separate from the measured runs, so sampling costs them nothing."""
        if pyspy() is None:
            say("profile: py-spy not installed; skipped")
            return
        seconds, n = self.args.profile_seconds, self.args.profile_events
        out = self.work / "profiles"
        out.mkdir()
        rs = self.settings(
            "pr.", router_app_id="bench-profile", topic_partitions=self.args.router_partitions
        )
        ss = self.settings("ps.", sink_group_prefix="bench-profile")
        if self.email_smtp is not None:
            self.smtp_ports[ss.topic_prefix] = self.email_smtp.port
        ensure_topics(rs)
        ensure_topics(ss)
        say(f"profile: preloading {n} events and {n} intents per sink")
        runs: list[tuple[str, HeraldSettings, list[str], int]] = []
        if "router" not in self.args.skip:
            produce_all(rs, event_records(rs, "pr", 0, n))
            runs.append(("router", rs, self.herald("run", "router"), 6))
            # The same kind of events through Herald's work alone: what the handler costs
            # per event, without the router's framework. Twice the backlog: it is faster.
            ws = self.settings("pw.", topic_partitions=self.args.router_partitions)
            ensure_topics(ws)
            produce_all(ws, event_records(ws, "pw", 0, 2 * n))
            work = [
                *("-m", "bench.baselines", "work-loop", "--group", "bench-profile-work"),
                *("--source", *Topics(ws.topic_prefix).all_events(["user", "order"])),
                *("--count", str(2 * n), "--seconds", "600"),
            ]
            runs.append(("router work loop", ws, work, 4))
        if self.email_smtp is not None:
            produce_all(ss, intent_records(ss, "pe", n, "email"))
            runs.append(("email sink", ss, self.herald("run", "sink", "email"), 3))
        if self.webhook_url is not None:
            produce_all(ss, intent_records(ss, "pw", n, "webhook", self.webhook_url))
            runs.append(("webhook sink", ss, self.webhook_argv, 3))
        for name, settings, argv, warmup in runs:
            p = self.proc(f"profile-{name.replace(' ', '-')}", argv, self.env(settings))
            assert p.proc is not None
            time.sleep(warmup)  # start-up (imports, joining the group) is not the hot path
            raw = out / f"{name.replace(' ', '-')}.txt"
            spy = pyspy_record(p.proc.pid, seconds, raw)
            try:
                spy.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
            p.stop()
            prof = Profile.load(name, raw)
            self.results.profiles.append(prof)
            say(f"profile: {name}: {prof.samples} samples ({raw})")

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        m = machine()
        say(f"work dir {self.work}")
        say(
            f"machine: {m['cpus']} CPUs, {m['model']}, {m['memory']}, Linux {m['kernel']}, "
            f"Python {m['python']}, librdkafka {m['librdkafka']}, load {m['load']}"
        )
        say(
            f"sizes: events={a.events} backlog={a.backlog} latency={a.latency_rate}/s x "
            f"{a.latency_seconds}s partitions={a.partitions} provider delay "
            f"{a.provider_delay_ms:g} ms x {a.provider_seconds:g}s; router: {self.router_engine}"
        )
        started = time.monotonic()
        try:
            self.start_broker()
            sections = {
                "router": self.router,
                "email": self.email,
                "webhook": self.webhook,
                "provider": self.provider,
                "scale": self.scale,
                "latency": self.latencies,
                "memory": self.memory,
                "profile": self.profile,
            }
            for name, section in sections.items():
                if name in a.skip:
                    continue
                t = time.monotonic()
                section()
                say(f"{name} done in {time.monotonic() - t:.0f}s")
        finally:
            for stop in reversed(self._cleanup):
                with contextlib.suppress(Exception):
                    stop()
        m_end = machine()
        print("\n" + "=" * 78)
        print(
            f"Herald benchmark: Kafka {self.kafka.version() if self.kafka else '?'}, "
            f"Python {m['python']}, librdkafka {m['librdkafka']}"
        )
        print(f"machine: {m['cpus']} x {m['model']}, {m['memory']}")
        print(f"load average at start {m['load']}, at end {m_end['load']}")
        print(
            f"sizes: events={a.events} backlog={a.backlog} "
            f"latency={a.latency_rate}/s x {a.latency_seconds}s partitions={a.partitions} "
            f"provider delay {a.provider_delay_ms:g} ms x {a.provider_seconds:g}s; "
            f"router: {self.router_engine}; took {time.monotonic() - started:.0f}s"
        )
        print(self.results.table())
        print()
        print(self.results.aims())
        for prof in self.results.profiles:
            print()
            print(prof.summary())
        print()
        print(self.results.result_line(), flush=True)
        if not a.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0

    def latencies(self) -> None:
        a = self.args
        self.latency(f"{a.latency_rate}/s, default settings", "a", a.latency_rate)
        if a.floor_rate and self.router_engine == "faust":
            # Context: a load the machine keeps up with, and the router committing its
            # transaction (making intents visible to the sink) every --commit-interval
            # instead of Faust's 2.8 s.
            self.latency(
                f"{a.floor_rate}/s, Faust commit every {a.commit_interval}s",
                "floor",
                a.floor_rate,
                BROKER_COMMIT_INTERVAL=str(a.commit_interval),
            )
        elif a.floor_rate:
            self.latency(f"{a.floor_rate}/s, default settings", "floor", a.floor_rate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.bench", description=__doc__.split("\n\n")[0])
    env = os.environ.get
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    p.add_argument("--events", type=int, default=None, help="events and intents per row")
    p.add_argument("--backlog", type=int, default=None, help="large backlog of the memory row")
    p.add_argument("--memory-probe", type=int, default=10_000, help="small backlog")
    p.add_argument("--memory-hold", type=float, default=3.0)
    p.add_argument(
        "--latency-rate", type=int, default=500, help="events/s of the latency row (defaults)"
    )
    p.add_argument("--latency-seconds", type=float, default=None)
    p.add_argument(
        "--commit-interval",
        type=float,
        default=0.1,
        help="Faust's BROKER_COMMIT_INTERVAL for the --floor-rate latency run",
    )
    p.add_argument(
        "--floor-rate",
        type=int,
        default=250,
        help="also measure latency at this lower rate (0: don't)",
    )
    p.add_argument("--partitions", type=int, default=12, help="of the sink rows' topics")
    p.add_argument(
        "--router-partitions",
        type=int,
        default=3,
        help="of the router, latency and memory rows' topics (Herald's default)",
    )
    p.add_argument(
        "--row-seconds",
        type=float,
        default=None,
        help="time limit per contender; a slower one is measured over what it did by then",
    )
    p.add_argument("--naive-count", type=int, default=None)
    p.add_argument("--naive-seconds", type=float, default=None)
    p.add_argument(
        "--webhook-connections",
        type=int,
        default=None,
        help="HERALD_WEBHOOK_MAX_CONNECTIONS and the bare loop's concurrency "
        "(default: the connector's default)",
    )
    p.add_argument(
        "--provider-delay-ms",
        type=float,
        default=50.0,
        help="how long the provider rows' receivers take to answer",
    )
    p.add_argument(
        "--provider-seconds",
        type=float,
        default=None,
        help="time per contender of the provider rows",
    )
    p.add_argument("--profile-seconds", type=float, default=None)
    p.add_argument("--profile-events", type=int, default=None, help="backlog per profile")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=[
            "router",
            "email",
            "webhook",
            "provider",
            "scale",
            "latency",
            "memory",
            "profile",
        ],
    )
    p.add_argument(
        "--router-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the router rows (Faust settings, e.g. PRODUCER_LINGER)",
    )
    p.add_argument(
        "--herald-root",
        type=Path,
        default=None,
        help="run the herald processes from another checkout (e.g. a git worktree of an "
        "older commit) to compare versions; the harness and the baselines stay this one's",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, profiles)")
    args = p.parse_args(argv)
    quick = args.quick or env("BENCH_QUICK") not in (None, "", "0")
    defaults = (
        {"events": 5_000, "backlog": 50_000, "latency_seconds": 10.0, "naive_count": 1_000}
        | {"naive_seconds": 5.0, "profile_seconds": 5.0, "profile_events": 20_000}
        | {"row_seconds": 30.0, "provider_seconds": 10.0}
        if quick
        else {"events": 50_000, "backlog": 1_000_000, "latency_seconds": 30.0}
        | {"naive_count": 5_000, "naive_seconds": 10.0, "profile_seconds": 10.0}
        | {"profile_events": 40_000, "row_seconds": 90.0, "provider_seconds": 20.0}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if "scale" not in args.skip and "email" in args.skip:
        args.skip.append("scale")
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
