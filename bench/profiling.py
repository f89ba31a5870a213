"""A sampling profile of a running Herald process (py-spy, from outside the process, without
pausing it) and a summary of where its CPU time goes.

py-spy's raw output is one line per distinct stack, ``frame;frame;...;leaf count``, each
frame ``function (file:line)``. The summary has three views:

- by component: the leaf frame's library (where the CPU actually is: Faust, aiokafka,
  Jinja2, fastavro, the email package, SQLite, the event loop, Herald's own code...);
- by function, self time: the leaf frames;
- Herald's own functions, inclusive: samples with that function anywhere on the stack.

Samples whose leaf is a thread waiting (the event loop in ``select``, an idle executor
thread) are counted apart as "waiting"; percentages are of the other, busy samples. A call
into C (librdkafka's poll and flush, SQLite) shows as the Python function that made it.
librdkafka's own threads are native and do not appear at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Profile", "pyspy", "record"]

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

# (component, start of the frame's file path), first match wins. py-spy writes paths
# relative to the sys.path entry they were found on ("faust/streams.py", "email/utils.py").
_COMPONENTS = [
    ("herald: router", "pipeline/router/"),
    ("herald: sink runtime", "pipeline/sink/"),
    ("herald: serialization/records", "pipeline/serialization"),
    ("herald: serialization/records", "pipeline/records"),
    ("herald: other", "pipeline/"),
    ("herald: connectors", "connectors/"),
    ("faust/mode", "faust/"),
    ("faust/mode", "mode/"),
    ("aiokafka", "aiokafka/"),
    ("confluent_kafka", "confluent_kafka/"),
    ("jinja2/markupsafe", "jinja2/"),
    ("jinja2/markupsafe", "markupsafe/"),
    ("fastavro", "fastavro/"),
    ("email (stdlib)", "email/"),
    ("aiosmtplib", "aiosmtplib/"),
    ("smtplib/http.client (stdlib)", "smtplib"),
    ("smtplib/http.client (stdlib)", "http/"),
    ("httpx/httpcore/h11/anyio", "httpx/"),
    ("httpx/httpcore/h11/anyio", "httpcore/"),
    ("httpx/httpcore/h11/anyio", "h11/"),
    ("httpx/httpcore/h11/anyio", "anyio/"),
    ("aiohttp", "aiohttp/"),
    ("sqlite3", "sqlite3/"),
    ("json", "json/"),
    ("uuid/datetime/dataclasses/enum", "uuid.py"),
    ("uuid/datetime/dataclasses/enum", "dataclasses.py"),
    ("uuid/datetime/dataclasses/enum", "datetime.py"),
    ("uuid/datetime/dataclasses/enum", "enum.py"),
    ("logging", "logging/"),
    ("asyncio event loop", "asyncio/"),
    ("asyncio event loop", "selectors.py"),
    ("threads/executors", "concurrent/"),
    ("threads/executors", "threading.py"),
    ("pydantic", "pydantic"),
    ("random/re/struct/io (stdlib)", "random.py"),
    ("random/re/struct/io (stdlib)", "re/"),
]


def pyspy() -> str | None:
    """py-spy from the checkout's venv, the running interpreter's, or the PATH."""
    for venv in (
        Path(__file__).resolve().parent.parent / ".venv" / "bin",
        Path(sys.executable).parent,
    ):
        if (venv / "py-spy").exists():
            return str(venv / "py-spy")
    return shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` in the background; raw stacks go to ``out``."""
    exe = pyspy()
    if exe is None:
        raise RuntimeError("py-spy not found: run scripts/ensure-bench-tools.sh")
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            str(rate),
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(out.with_suffix(".log"), "wb"),
    )


# Leaf frames of a thread that is waiting, not working: the event loop in epoll, an idle
# executor thread, and an executor thread inside a blocking C call it was handed directly
# (the sink's producer.flush, waiting for acknowledgements).
_WAITING = {"EpollSelector.select", "_worker", "_WorkItem.run", "Condition.wait", "Event.wait"}


def _frame(text: str) -> tuple[str, str]:
    """(function, file) of one frame."""
    m = _FRAME.match(text.strip())
    if m is None:
        return text.strip(), ""
    return m.group("func"), m.group("file")


def _component(path: str) -> str:
    for name, prefix in _COMPONENTS:
        if path.startswith(prefix):
            return name
    return f"other ({path})"


def _short(func: str, path: str) -> str:
    return f"{func} ({path})"


@dataclass
class Profile:
    name: str
    samples: int = 0
    waiting: int = 0
    components: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)
    herald_inclusive: Counter[str] = field(default_factory=Counter)

    @classmethod
    def load(cls, name: str, raw: Path) -> Profile:
        prof = cls(name)
        if not raw.exists():
            return prof
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_frame(f) for f in stack.split(";") if f]
            if not frames:
                continue
            func, path = frames[-1]
            if func in _WAITING:
                prof.waiting += count
                continue
            prof.samples += count
            prof.components[_component(path)] += count
            prof.self_time[_short(func, path)] += count
            seen = set()
            for f, p in frames:
                if p.startswith(("pipeline/", "connectors/")) and not p.endswith("cli.py"):
                    key = _short(f, p)
                    if key not in seen:
                        seen.add(key)
                        prof.herald_inclusive[key] += count
        return prof

    def summary(self, top: int = 12) -> str:
        if not self.samples:
            return f"{self.name}: no samples"
        pct = 100.0 / self.samples

        def rows(counter: Counter[str]) -> list[str]:
            return [f"  {n * pct:5.1f}%  {k}" for k, n in counter.most_common(top)]

        total = self.samples + self.waiting
        return "\n".join(
            [
                f"{self.name}: {self.samples} busy samples of Python threads "
                f"({100 * self.waiting / total:.0f}% of {total} were waiting)",
                "by component (leaf frame):",
                *rows(self.components),
                "by function, self time:",
                *rows(self.self_time),
                "Herald functions, inclusive:",
                *rows(self.herald_inclusive),
            ]
        )
