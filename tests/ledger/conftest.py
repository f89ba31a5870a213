"""Ledger fixtures: every test that takes ``ledger_url`` or ``ledger`` runs on both backends.

SQLite gets a file in the test's tmp_path; PostgreSQL a database of its own, created on the
session's throwaway server (tests/pg.py) and dropped afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.sink.ledger import Ledger, open_ledger

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of empty ledger storage, once per backend."""
    if request.param == "sqlite":
        return "sqlite:///" + str(tmp_path / "ledger" / "ledger.db")
    return str(request.getfixturevalue("fresh_postgres_database"))


@pytest.fixture
def open_ledgers(ledger_url: str) -> Iterator[Callable[[], Ledger]]:
    """Opens ledgers on the test's storage; closes them all after the test."""
    opened: list[Ledger] = []

    def _open() -> Ledger:
        ledger = open_ledger(ledger_url)
        opened.append(ledger)
        return ledger

    yield _open
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_ledgers: Callable[[], Ledger]) -> Ledger:
    return open_ledgers()
