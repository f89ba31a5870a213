"""The short version of `make chaos`: a few thousand events, every process SIGKILLed once,
the broker hard-killed and restarted once; nothing lost, nothing delivered twice."""

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
    r"broker_restarts=(?P<restarts>\d+) seconds=\d+$",
    re.MULTILINE,
)


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
    return result


def test_chaos_short_sqlite_ledger() -> None:
    r = run_chaos("--events", "1500", "--kills", "1", "--seed", "42", "--settle", "3")
    assert r["events"] == r["delivered"] == 1500
    assert r["lost"] == 0
    assert r["duplicates"] == 0
    assert r["kills"] == 3  # router and two sinks, once each
    assert r["restarts"] == 1
    assert r["raw"] <= r["kills"] * 8 * 3  # in-flight window per sink process


def test_chaos_short_postgres_ledger(fresh_postgres_database: str) -> None:
    r = run_chaos(
        "--events",
        "1500",
        "--kills",
        "1",
        "--seed",
        "43",
        "--settle",
        "3",
        "--ledger-url",
        fresh_postgres_database,
    )
    assert r["events"] == r["delivered"] == 1500
    assert r["lost"] == 0
    assert r["duplicates"] == 0
    assert r["raw"] <= r["kills"] * 8 * 3
