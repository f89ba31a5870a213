"""`herald trace` and `herald dlq` on a real broker, against a running router and email sink:
a trace shows every hop of an event in time order; dead letters are listed with their reason,
shown whole, and redriven idempotently (twice redriven, delivered once)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.records import DeliveryState, notification_id
from tests.integration.procs import herald_env
from tests.integration.test_effectively_once import Pipeline, pipeline

pytestmark = pytest.mark.integration
__all__ = ["pipeline"]  # the fixture, shared with test_effectively_once


def herald(p: Pipeline, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=herald_env(p.settings, HERALD_LOG_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def test_trace_shows_every_hop_of_an_event_in_order(pipeline: Pipeline) -> None:
    p = pipeline
    user = p.user("traced")
    event = p.publisher.publish_sync("user-registered", user)
    nid = notification_id(event.event_id, "welcome-email", "email", user["email"])
    p.wait_status(nid, DeliveryState.SENT)

    out = herald(p, "trace", event.event_id, "--json").stdout
    lines = [json.loads(x) for x in out.splitlines() if x]
    kinds = [e["kind"] for e in lines]
    # The ledger's entry and the status record are written in the same group commit: their
    # times are close and either may come first.
    assert kinds[:2] == ["event", "intent"], kinds
    assert sorted(kinds[2:4]) == ["ledger", "status"], kinds
    assert [e["at"] for e in lines] == sorted(e["at"] for e in lines)
    assert lines[0]["where"].startswith(f"{p.topics.events('user')}[")
    assert lines[1]["notification_id"] == nid
    assert user["email"] in lines[1]["summary"]
    status = next(e for e in lines if e["kind"] == "status")
    assert status["summary"].startswith("SENT")
    # The same, starting from the notification id, finds the event it came from.
    table = herald(p, "trace", nid).stdout
    assert "event " in table and "user-registered" in table and "SENT" in table


def test_dlq_list_show_and_a_redrive_twice_delivers_once(pipeline: Pipeline) -> None:
    p = pipeline
    user = p.user("bounced")
    p.smtp.reject_recipients.add(user["email"])
    nid = p.welcome(user)
    p.wait_status(nid, DeliveryState.REJECTED)

    listed = herald(p, "dlq", "list", "--channel", "email", "--json").stdout.splitlines()
    mine = [json.loads(x) for x in listed if nid in x]
    assert len(mine) == 1, listed
    assert mine[0]["error_class"] == "RecipientGone"  # 550 5.1.1: the mailbox does not exist
    assert mine[0]["error_message"].startswith("550")
    assert mine[0]["original"].startswith(f"{p.topics.notifications('email')}[")
    none = herald(p, "dlq", "list", "--channel", "email", "--error-class", "NoSuchError")
    assert nid not in none.stdout

    shown = json.loads(herald(p, "dlq", "show", mine[0]["where"]).stdout)
    assert shown["headers"]["herald-notification-id"] == nid
    assert shown["value"]["recipient"] == user["email"]

    # A trace of the notification shows the dead letter with its reason.
    trace = herald(p, "trace", nid).stdout
    assert "dead letter" in trace and "REJECTED" in trace

    p.smtp.reject_recipients.discard(user["email"])
    first = herald(p, "dlq", "redrive", "--channel", "email", "--notification-id", nid).stdout
    assert "written=1" in first, first
    assert p.smtp.wait_for(1, user["email"], timeout=60), p.sink.tail()
    second = herald(p, "dlq", "redrive", "--channel", "email", "--notification-id", nid).stdout
    assert "written=0" in second, second
    p.wait_status(nid, DeliveryState.SENT)
    assert len(p.smtp.to(user["email"])) == 1


async def test_the_api_serves_the_same_trace(pipeline: Pipeline) -> None:
    """GET /v1/trace/{id} answers what `herald trace --json` prints."""
    import aiohttp
    from aiohttp import web

    from pipeline.api import create_api
    from pipeline.sink.ledger import open_ledger

    p = pipeline
    user = p.user("api-traced")
    event = p.publisher.publish_sync("user-registered", user)
    nid = notification_id(event.event_id, "welcome-email", "email", user["email"])
    p.wait_status(nid, DeliveryState.SENT)

    app = create_api(p.settings, open_ledger(p.settings.ledger_url.get_secret_value()))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            r = await http.get(f"{url}/v1/trace/{nid}")
            assert r.status == 200, await r.text()
            body = await r.json()
            missing = await http.get(f"{url}/v1/trace/no-such-id")
            assert missing.status == 404
            assert missing.content_type == "application/problem+json"
    finally:
        await runner.cleanup()
    kinds = [e["kind"] for e in body["records"]]
    assert body["id"] == nid
    assert kinds[:2] == ["event", "intent"], kinds
    assert sorted(kinds[2:4]) == ["ledger", "status"], kinds
    assert body["records"][1]["notification_id"] == nid
    cli = [json.loads(x) for x in herald(p, "trace", nid, "--json").stdout.splitlines() if x]
    assert [e["where"] for e in cli] == [e["where"] for e in body["records"]]
