"""The chaos harness's inputs and accounting (bench/chaos_inputs.py, bench/chaos_accounting.py):
each kind of bad input meets the fate the harness expects of it, and the accounting sorts
inputs by what became of them."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bench.chaos_accounting import DeadLetterSeen, account, dead_letter_seen, extra_copies
from bench.chaos_inputs import (
    EXPECTED,
    POISON_KINDS,
    Input,
    display_name,
    plan_kinds,
    poison_value,
)
from pipeline import headers as h
from pipeline.router.handler import RouterHandler
from pipeline.router.rules import RuleSet
from pipeline.router.templates import Templates
from pipeline.schemas import SchemaSet
from pipeline.serialization import AvroSerde
from pipeline.topics import Topics
from tests.unit.test_serialization import mock_registry
from tests.unit.unit_helpers import NOW, USER_REGISTERED, user_registered


class _Record:
    """What dead_letter_seen reads of a consumed record."""

    def __init__(self, topic: str, headers: h.Headers) -> None:
        self._topic, self._headers = topic, headers

    def topic(self) -> str:
        return self._topic

    def headers(self) -> h.Headers:
        return self._headers


@pytest.mark.parametrize("framing", ["single-object", "registry"])
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_bad_input_is_dead_lettered_as_the_harness_expects(
    kind: str, framing: str, schemas: SchemaSet, rules: RuleSet, templates: Templates
) -> None:
    serde = AvroSerde(schemas, registry=mock_registry() if framing == "registry" else None)
    handler = RouterHandler(serde, rules, templates, Topics("chaos."), clock=lambda: NOW)
    value, _ = serde.encode(USER_REGISTERED, user_registered(display_name=display_name(7, kind)))
    if kind in POISON_KINDS:
        value = poison_value(
            kind,
            value,
            max_record_bytes=serde.max_record_bytes,
            rng=random.Random(1),  # noqa: S311 - not crypto
        )

    [out] = handler.handle(
        key=b"u7", value=value, headers=[], topic="chaos.events.user", partition=2, offset=9
    )

    assert out.dead and out.topic == "chaos.events.dlq"
    seen = dead_letter_seen(_Record(out.topic, out.headers))  # type: ignore[arg-type]
    want = EXPECTED[kind]
    assert (seen.error_class, seen.rule, seen.truncated) == (
        want.error_class,
        want.rule,
        want.truncated,
    )
    assert seen.original == ("chaos.events.user", 2, 9)


def test_plan_kinds_places_exact_shares_and_every_poison_kind() -> None:
    kinds = plan_kinds(1000, 0.01, 0.005, random.Random(3))  # noqa: S311 - not crypto
    counts = Counter(kinds)
    assert counts["oversize"] == 5
    assert sum(counts[k] for k in POISON_KINDS) == 10
    assert all(counts[k] == 2 for k in POISON_KINDS)
    assert counts["normal"] == 985


def _input(index: int, kind: str, coords: tuple[str, int, int]) -> Input:
    return Input(index, kind, f"e{index}", f"u{index}@x", f"<m{index}>", coords)


def test_account_sorts_every_input_by_its_fate() -> None:
    inputs = [
        _input(0, "normal", ("ev", 0, 0)),  # delivered: right
        _input(1, "normal", ("ev", 0, 1)),  # dead-lettered by the sink: wrong, and lost
        _input(2, "bad-magic", ("ev", 1, 0)),  # dead-lettered for its reason: right
        _input(3, "oversize", ("ev", 1, 1)),  # dead-lettered without the rule: wrong reason
        _input(4, "truncated", ("ev", 1, 2)),  # nowhere: unaccounted
        _input(5, "unknown-id", ("ev", 2, 0)),  # delivered: wrong
    ]
    dead = [
        DeadLetterSeen("ev.dlq", ("ev", 1, 0), None, "UnknownFramingError", None, False),
        # The sink's dead letter carries the intent's coordinates: found by event id.
        DeadLetterSeen("n.dlq", ("notifications.email", 3, 4), "e1", "SMTPError", None, False),
        DeadLetterSeen("ev.dlq", ("ev", 1, 1), "e3", "RecordTooLargeError", None, False),
        DeadLetterSeen("ev.dlq", ("elsewhere", 0, 0), None, "UnknownFramingError", None, False),
    ]

    v = account(inputs, {"<m0>", "<m5>"}, dead)

    assert v.delivered == 2
    assert v.lost == 1
    assert v.dead_lettered == 3
    assert [i.index for i in v.unaccounted] == [4]
    assert len(v.wrong) == 3
    assert "input 1 " in v.wrong[0] and "SMTPError" in v.wrong[0]
    assert "input 3 " in v.wrong[1] and "rule welcome-email" in v.wrong[1]
    assert "input 5 " in v.wrong[2] and "delivered" in v.wrong[2]
    assert [d.original for d in v.stray] == [("elsewhere", 0, 0)]


def test_extra_copies_counts_records_beyond_the_first() -> None:
    assert extra_copies(Counter({"a": 1, "b": 3, "c": 2})) == 3
