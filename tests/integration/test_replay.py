"""Replay on a real broker: replaying what was sent costs no provider call, --force sends
again under a new idempotency key, dead letters go back to their topic and get delivered."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.records import DeliveryState
from tests.integration.procs import herald_env
from tests.integration.test_effectively_once import WAIT, Pipeline, pipeline

pytestmark = pytest.mark.integration
__all__ = ["pipeline"]  # the fixture, shared with test_effectively_once


def herald_replay(p: Pipeline, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "replay", *args],
        env=herald_env(p.settings, HERALD_LOG_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def counts(line: str) -> dict[str, int]:
    return {
        k: int(v)
        for k, v in (part.split("=", 1) for part in line.split(": ", 1)[1].split() if "=" in part)
        if v.isdigit()
    }


def test_replaying_what_was_sent_makes_no_provider_call(pipeline: Pipeline) -> None:
    users = [pipeline.user(f"replay{i}") for i in range(3)]
    nids = [pipeline.welcome(u) for u in users]
    for nid in nids:
        pipeline.wait_status(nid, DeliveryState.SENT)
    topic = pipeline.topics.notifications("email")

    dry = counts(herald_replay(pipeline, topic, "--from-offset", "0", "--dry-run"))
    assert dry["read"] == 3 and dry["skipped_sent"] == 3 and dry["written"] == 0

    done = counts(herald_replay(pipeline, topic, "--from-offset", "0", "--no-ledger"))
    assert done["written"] == 3  # without the ledger's help the sink must skip them itself
    marker = pipeline.user("replay-marker")
    pipeline.wait_status(pipeline.welcome(marker), DeliveryState.SENT)
    for u in users:
        assert len(pipeline.smtp.to(u["email"])) == 1


def test_force_sends_again_under_a_new_idempotency_key(pipeline: Pipeline) -> None:
    user = pipeline.user("force")
    nid = pipeline.welcome(user)
    pipeline.wait_status(nid, DeliveryState.SENT)
    topic = pipeline.topics.notifications("email")

    done = counts(herald_replay(pipeline, topic, "--recipient", user["email"], "--force"))
    assert done["written"] == 1 and done["new_generation"] == 1
    got = pipeline.smtp.wait_for(2, user["email"], timeout=WAIT)
    assert len(got) == 2
    assert got[0].message_id != got[1].message_id  # generation 1 has its own key
    assert got[0].message["X-Herald-Notification-Id"] == got[1].message["X-Herald-Notification-Id"]


def test_dead_letters_go_back_to_their_topic_and_are_delivered(pipeline: Pipeline) -> None:
    user = pipeline.user("dlq")
    pipeline.smtp.reject_recipients.add(user["email"])
    nid = pipeline.welcome(user)
    pipeline.wait_status(nid, DeliveryState.REJECTED)
    pipeline.smtp.reject_recipients.discard(user["email"])  # the cause is fixed

    dlq = pipeline.topics.notifications_dlq("email")
    done = counts(herald_replay(pipeline, dlq, "--notification-id", nid))
    assert done["written"] == 1 and done["new_generation"] == 1  # REJECTED: a new key
    assert pipeline.smtp.wait_for(1, user["email"], timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while DeliveryState.SENT not in pipeline.statuses(nid):
        assert time.monotonic() < deadline
        time.sleep(0.3)
