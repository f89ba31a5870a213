"""Herald's floors: a module imports only from its own floor or lower ones (imports inside
functions count too). This test fails the build when a lower floor reaches up, so the
channel contract stays usable alone and no import loop can form across floors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.settings import project_root

# Bottom up. The first matching prefix decides a module's floor.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    (
        "1 records and the channel contract",
        (
            "pipeline.records",
            "pipeline.headers",
            "connectors.base",
            "connectors.registry",
            "pipeline.people.records",
        ),
    ),
    (
        "2 schemas, serialization, settings, topics, observability",
        (
            "pipeline.schemas",
            "pipeline.serialization",
            "pipeline.settings",
            "pipeline.topics",
            "pipeline.deadletter",
            # Metrics, log format, tracing and the probe server: every floor above uses them.
            "pipeline.metrics",
            "pipeline.logs",
            "pipeline.tracing",
            "pipeline.observe",
            "pipeline.environment",
            "pipeline.examples",
            # Preference policy and unsubscribe tokens: pure, like settings.
            "pipeline.people.policy",
            "pipeline.people.unsubscribe",
        ),
    ),
    (
        "3 Kafka clients",
        (
            "pipeline.kafka",
            "pipeline.publisher",
            "pipeline.inspect",
            # Reading and writing the people topics (API, CLI) and the tables' reader.
            "pipeline.people.store",
            "pipeline.people.reader",
        ),
    ),
    ("4 connectors", ("connectors",)),
    # The router's people tables are router state.
    ("5 router and sink runtime", ("pipeline.router", "pipeline.sink", "pipeline.people.tables")),
    # The APIs' operations (validation, idempotency keys), transport-free, and the gRPC
    # API's generated messages.
    (
        "6 API service",
        ("pipeline.service", "pipeline.seed", "pipeline.proto", "pipeline.people.service"),
    ),
    (
        "7 CLI, HTTP and gRPC APIs, replay, trace, dlq",
        (
            "pipeline.cli",
            "pipeline.api",
            "pipeline.grpc_api",
            "pipeline.replay",
            "pipeline.trace",
            "pipeline.dlq",
            "pipeline.people",  # the package itself (its modules are placed above)
        ),
    ),
]

# Connectors know intents and results: never Kafka, settings of the core, or the runtime.
CONNECTORS_MAY_IMPORT = ("connectors", "pipeline.records", "pipeline.headers")


def floor_of(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(project_root()).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("pipeline", "connectors")}


SOURCES = sorted(
    p for package in ("pipeline", "connectors") for p in (project_root() / package).rglob("*.py")
)


def test_every_module_has_a_floor() -> None:
    assert SOURCES
    unplaced = [module_name(p) for p in SOURCES if floor_of(module_name(p)) is None]
    unplaced = [m for m in unplaced if m not in ("pipeline", "connectors")]
    assert unplaced == [], "give these modules a floor in FLOORS"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_floor(path: Path) -> None:
    me = module_name(path)
    mine = floor_of(me)
    if mine is None:
        return
    for imported in sorted(imports_of(path)):
        theirs = floor_of(imported)
        if theirs is None:
            continue
        assert theirs <= mine, (
            f"{me} (floor {FLOORS[mine][0]}) imports {imported} (floor {FLOORS[theirs][0]})"
        )
        if me.startswith("connectors."):
            assert imported.startswith(CONNECTORS_MAY_IMPORT), (
                f"{me} imports {imported}: a connector knows intents and results only"
            )
