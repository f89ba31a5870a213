"""The gRPC API on a real broker: ``herald run api`` started as a process serves HTTP and
gRPC; a client built on the code generated from proto/herald/v1/notifications.proto sends
notifications and events, reads deliveries, and gets the HTTP API's refusals as status codes
(UNAUTHENTICATED, INVALID_ARGUMENT naming the field, ALREADY_EXISTS for a reused idempotency
key, RESOURCE_EXHAUSTED over the record limit, NOT_FOUND)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc import aio
from pydantic import SecretStr

from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.proto.herald.v1 import notifications_pb2 as pb
from pipeline.proto.herald.v1 import notifications_pb2_grpc as pb_grpc
from pipeline.records import NOTIFICATION_INTENT, DeliveryState
from pipeline.serialization import serde_from_settings
from pipeline.service import IDEMPOTENCY_KEY_REUSED
from pipeline.settings import HeraldSettings
from pipeline.sink.ledger import LedgerOutcome, open_ledger
from pipeline.topics import Topics
from tests.conftest import free_port
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = pytest.mark.integration

TOKEN = "grpc-s3cret"  # noqa: S105 - the test server's token
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@dataclass
class Server:
    """``herald run api`` on topics of its own, with no router or sink."""

    settings: HeraldSettings
    process: HeraldProcess
    http_url: str
    grpc_address: str

    def records(self, topic: str) -> list[Any]:
        return read_all(self.settings.kafka_bootstrap_servers, topic)

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix)


@pytest.fixture
def server(settings: HeraldSettings, tmp_path: Path) -> Iterator[Server]:
    http_port, grpc_port = free_port(), free_port()
    s = settings.model_copy(update={"ledger_url": SecretStr(f"sqlite:///{tmp_path / 'ledger.db'}")})
    ensure_topics(s)
    env = herald_env(
        s,
        HERALD_API_TOKEN=TOKEN,
        HERALD_API_PORT=str(http_port),
        HERALD_GRPC_PORT=str(grpc_port),
        HERALD_LOG_LEVEL="INFO",
    )
    process = HeraldProcess("api", ["run", "api"], env, tmp_path).start()
    http_url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:  # HTTP answers once the application, gRPC server included, has started
        assert process.alive(), process.tail()
        try:
            with urllib.request.urlopen(f"{http_url}/healthz", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, process.tail()
        time.sleep(0.2)
    try:
        yield Server(s, process, http_url, f"127.0.0.1:{grpc_port}")
    finally:
        assert process.stop(30) == 0, process.tail()


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[pb_grpc.NotificationServiceStub]:
    async with aio.insecure_channel(server.grpc_address) as channel:
        await channel.channel_ready()
        yield pb_grpc.NotificationServiceStub(channel)


def email(recipient: str, text: str = "Your code: 123456") -> pb.SendNotificationRequest:
    return pb.SendNotificationRequest(
        channel="email", recipient=recipient, subject="Your code", body_text=text
    )


def intents(server: Server, channel: str) -> list[dict[str, Any]]:
    serde = serde_from_settings(server.settings)
    found = []
    for m in server.records(server.topics.notifications(channel)):
        intent = serde.decode(m.value(), expect=NOTIFICATION_INTENT).record
        intent["notification_id"] = str(intent["notification_id"])  # a uuid logical type
        found.append({**intent, "headers": h.as_dict(m.headers())})
    return found


async def refused(call: Any) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await call
    return info.value


def trailing(e: aio.AioRpcError) -> dict[str, str]:
    return {k: str(v) for k, v in e.trailing_metadata() or ()}


async def test_send_notification_lands_on_the_channel_topic_once(
    server: Server, stub: pb_grpc.NotificationServiceStub
) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    key = (*AUTH, ("idempotency-key", "grpc-otp-1"), ("traceparent", tp))
    request = email("ada@example.com")
    request.data["order"] = "o-42"
    first = stub.SendNotification(request, metadata=key)
    answer = await first
    assert answer.status == "accepted"
    assert ("idempotent-replayed", "true") not in tuple(await first.trailing_metadata())

    retry = stub.SendNotification(request, metadata=key)
    assert (await retry).notification_id == answer.notification_id
    assert ("idempotent-replayed", "true") in tuple(await retry.trailing_metadata())

    e = await refused(stub.SendNotification(email("mallory@example.com"), metadata=key))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "different request to gRPC /herald.v1.NotificationService/SendNotification" in (
        e.details() or ""
    )
    assert trailing(e)["herald-problem-type"] == IDEMPOTENCY_KEY_REUSED
    assert trailing(e)["herald-idempotency-key"] == "grpc-otp-1"

    [intent] = intents(server, "email")
    assert intent["notification_id"] == answer.notification_id
    assert intent["headers"][h.NOTIFICATION_ID] == answer.notification_id
    assert (intent["recipient"], intent["subject"]) == ("ada@example.com", "Your code")
    assert intent["body_text"] == "Your code: 123456" and intent["body_html"] is None
    assert intent["data"] == {"order": "o-42"}
    assert intent["traceparent"] == tp == intent["headers"][h.TRACEPARENT]


async def test_publish_event_lands_on_events_user(
    server: Server, stub: pb_grpc.NotificationServiceStub
) -> None:
    fields = struct_pb2.Struct()
    fields.update({"user_id": "u-g1", "email": "ada@example.com", "display_name": "Ada"})
    as_struct = pb.PublishEventRequest(event_type="user-registered", fields=fields)
    as_json = pb.PublishEventRequest(
        event_type="user-registered",
        json=json.dumps({"user_id": "u-g2", "email": "bob@example.com", "display_name": "Bob"}),
        producer="accounts-service",
    )
    one = await stub.PublishEvent(as_struct, metadata=AUTH)
    two = await stub.PublishEvent(as_json, metadata=AUTH)
    assert one.status == two.status == "accepted"
    assert one.topic == server.topics.events("user")

    serde = serde_from_settings(server.settings)
    events = {}
    for m in server.records(server.topics.events("user")):
        record = serde.decode(m.value()).record
        events[record["user_id"]] = (h.as_dict(m.headers())[h.EVENT_ID], record)
    assert sorted(events) == ["u-g1", "u-g2"]
    assert events["u-g1"][0] == one.event_id
    assert events["u-g1"][1]["envelope"]["producer"] == "grpc-api"
    assert events["u-g2"][0] == two.event_id
    assert events["u-g2"][1]["envelope"]["producer"] == "accounts-service"

    # A Struct's numbers are doubles: integral ones reach Avro int fields as ints.
    order = struct_pb2.Struct()
    order.update(
        {
            "order_id": "o-1",
            "user_id": "u-g1",
            "email": "ada@example.com",
            "carrier": "DHL",
            "tracking_number": "JD01",
            "items": [{"sku": "s-1", "name": "Lamp", "quantity": 2}],
        }
    )
    answer = await stub.PublishEvent(
        pb.PublishEventRequest(event_type="order-shipped", fields=order), metadata=AUTH
    )
    [shipped] = server.records(server.topics.events("order"))
    assert h.as_dict(shipped.headers())[h.EVENT_ID] == answer.event_id
    assert serde.decode(shipped.value()).record["items"][0]["quantity"] == 2


async def test_an_idempotent_event_retry_gets_the_same_id(
    server: Server, stub: pb_grpc.NotificationServiceStub
) -> None:
    data = {"user_id": "u-g3", "email": "cy@example.com", "display_name": "Cy"}
    fields = struct_pb2.Struct()
    fields.update(data)
    key = (*AUTH, ("idempotency-key", "signup-g3"))
    first = await stub.PublishEvent(
        pb.PublishEventRequest(event_type="user-registered", fields=fields), metadata=key
    )
    # The same data as JSON text: the same request.
    again = await stub.PublishEvent(
        pb.PublishEventRequest(event_type="user-registered", json=json.dumps(data)), metadata=key
    )
    assert again.event_id == first.event_id
    other = pb.PublishEventRequest(
        event_type="user-registered", json=json.dumps({**data, "display_name": "Eve"})
    )
    e = await refused(stub.PublishEvent(other, metadata=key))
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(server.records(server.topics.events("user"))) == 1


async def test_get_notification(server: Server, stub: pb_grpc.NotificationServiceStub) -> None:
    unknown = pb.GetNotificationRequest(notification_id="00000000-0000-0000-0000-000000000000")
    e = await refused(stub.GetNotification(unknown, metadata=AUTH))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "no delivery recorded" in (e.details() or "")
    e = await refused(
        stub.GetNotification(pb.GetNotificationRequest(notification_id="x"), metadata=AUTH)
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT

    # What a sink records, read back through the API.
    answer = await stub.SendNotification(email("ada@example.com"), metadata=AUTH)
    nid = answer.notification_id
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    ledger = open_ledger(server.settings.ledger_url.get_secret_value())
    try:
        ledger.record(
            "tests",
            [
                LedgerOutcome(
                    nid,
                    0,
                    "email",
                    "ada@example.com",
                    DeliveryState.SENT,
                    1,
                    "2.0.0 Ok: queued",
                    None,
                    "m-1",
                    at,
                )
            ],
            {},
        )
    finally:
        ledger.close()
    found = await stub.GetNotification(
        pb.GetNotificationRequest(notification_id=nid), metadata=AUTH
    )
    assert found.notification_id == nid
    [delivery] = found.deliveries
    assert delivery.state == pb.DELIVERY_STATE_SENT
    assert (delivery.channel, delivery.recipient, delivery.attempts) == (
        "email",
        "ada@example.com",
        1,
    )
    assert delivery.provider_response == "2.0.0 Ok: queued"
    assert not delivery.HasField("error_class")
    assert delivery.first_attempt_at.ToDatetime(tzinfo=UTC) == at


async def test_no_token_is_unauthenticated(
    server: Server, stub: pb_grpc.NotificationServiceStub
) -> None:
    for metadata in ((), (("authorization", TOKEN),), (("authorization", "Bearer wrong"),)):
        e = await refused(stub.SendNotification(email("ada@example.com"), metadata=metadata))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        e = await refused(
            stub.GetNotification(
                pb.GetNotificationRequest(notification_id="00000000-0000-0000-0000-000000000000"),
                metadata=metadata,
            )
        )
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert intents(server, "email") == []


async def test_refusals_are_status_codes_naming_the_field(
    server: Server, stub: pb_grpc.NotificationServiceStub
) -> None:
    e = await refused(
        stub.SendNotification(pb.SendNotificationRequest(channel="email"), metadata=AUTH)
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "recipient is required; body_text is required"
    assert trailing(e)["herald-fields"] == "recipient,body_text"

    fax = pb.SendNotificationRequest(channel="fax", recipient="+15551234", body_text="hi")
    e = await refused(stub.SendNotification(fax, metadata=AUTH))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "channel must be one of" in (e.details() or "")

    bad_event = pb.PublishEventRequest(event_type="user-registered", json='{"user_id": 7}')
    e = await refused(stub.PublishEvent(bad_event, metadata=AUTH))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id: got int" in (e.details() or "")
    assert "user_id" in trailing(e)["herald-fields"].split(",")

    for request, detail in (
        (pb.PublishEventRequest(event_type="user-deleted"), "event_type: "),
        (pb.PublishEventRequest(), "event_type is required"),
        (pb.PublishEventRequest(event_type="user-registered", json="[1]"), "json must be"),
        (pb.PublishEventRequest(event_type="user-registered", json="{"), "json is not JSON"),
    ):
        e = await refused(stub.PublishEvent(request, metadata=AUTH))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert detail in (e.details() or ""), e.details()

    bad_key = (*AUTH, ("idempotency-key", "k" * 256))
    e = await refused(stub.SendNotification(email("ada@example.com"), metadata=bad_key))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Idempotency-Key must be 1 to 255" in (e.details() or "")

    limit = server.settings.max_record_bytes
    e = await refused(
        stub.SendNotification(email("ada@example.com", "y" * (limit - 100)), metadata=AUTH)
    )
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "HERALD_MAX_RECORD_BYTES" in (e.details() or "")
    assert trailing(e)["herald-limit"] == str(limit)
    # Over twice the limit, gRPC itself refuses the message with the same code.
    e = await refused(
        stub.SendNotification(email("ada@example.com", "z" * (2 * limit + 10)), metadata=AUTH)
    )
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert intents(server, "email") == []
    assert server.records(server.topics.events("user")) == []


async def test_calls_are_counted_by_method_and_status_on_the_http_metrics(
    server: Server, stub: pb_grpc.NotificationServiceStub
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    await stub.SendNotification(email("counted@example.com"), metadata=AUTH)
    e = await refused(stub.SendNotification(email("counted@example.com"), metadata=()))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    counted = {
        (s.labels["method"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "herald_grpc_requests_total"
    }
    assert counted[("SendNotification", "OK")] == 1
    assert counted[("SendNotification", "UNAUTHENTICATED")] == 1
