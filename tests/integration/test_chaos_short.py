"""The short version of `make chaos`: a few thousand inputs, every process SIGKILLed once,
the broker hard-killed and restarted once, the schema registry down while the router and a
sink restart, poison and oversize records mixed in; nothing lost, nothing delivered twice,
every input delivered or dead-lettered for its reason."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipeline.settings import project_root

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RESULT = re.compile(
    r"^RESULT events=(?P<events>\d+) delivered=(?P<delivered>\d+) lost=(?P<lost>\d+) "
    r"duplicates=(?P<duplicates>\d+) raw_duplicates=(?P<raw>\d+) kills=(?P<kills>\d+) "
    r"broker_restarts=(?P<restarts>\d+) seconds=\d+ dead_lettered=(?P<dead>\d+) "
    r"unaccounted=(?P<unaccounted>\d+) router_duplicates=(?P<router_duplicates>\d+) "
    r"not_in_kafka=(?P<not_in_kafka>\d+)$",
    re.MULTILINE,
)
EVENTS = 1500
# The harness's default shares: 1% poison (every kind), 0.5% oversize.
BAD = round(EVENTS * 0.01) + round(EVENTS * 0.005)


def run_chaos(*args: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.chaos", *args],
        cwd=project_root(),
        capture_output=True,
        text=True,
        timeout=840,
    )
    match = RESULT.search(out.stdout)
    assert match, out.stdout[-3000:] + out.stderr[-3000:]
    result = {k: int(v) for k, v in match.groupdict().items()}
    assert out.returncode == 0, out.stdout[-3000:]
    # The outage really bit: a process restarted during it had to hold records.
    assert "registry outage: down" in out.stdout
    assert " held 0 records or starts" not in out.stdout, out.stdout[-3000:]
    return result


def short_run(seed: int, *extra: str) -> dict[str, int]:
    # The registry stays down at least until the restarted router and sink each hold a
    # record; a short planned length keeps the run short.
    return run_chaos(
        *("--events", str(EVENTS), "--kills", "1", "--seed", str(seed), "--settle", "3"),
        *("--registry-outage", "1", "2"),
        *extra,
    )


def check(r: dict[str, int]) -> None:
    assert r["events"] == EVENTS
    assert r["delivered"] == EVENTS - BAD
    assert r["dead"] == BAD
    assert r["unaccounted"] == 0
    assert r["not_in_kafka"] == 0
    assert r["lost"] == 0
    assert r["duplicates"] == 0
    assert r["raw"] <= r["kills"] * 8 * 3  # in-flight window per sink process


def test_chaos_short_sqlite_ledger() -> None:
    r = short_run(42)
    check(r)
    assert r["kills"] == 3  # router and two sinks, once each
    assert r["restarts"] == 1


def test_chaos_short_postgres_ledger(fresh_postgres_database: str) -> None:
    check(short_run(43, "--ledger-url", fresh_postgres_database))
