"""OpenTelemetry on a real broker: a trace context set on an event continues through
`herald publish`, the router and the webhook sink to the provider's request, and every span
reaches an OTLP/HTTP receiver running in the test (protobuf on /v1/traces, decoded with
opentelemetry-proto), as a collector would receive it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from connectors.webhook import new_secret
from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.records import notification_id
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics
from tests.connectors import test_webhook as webhook
from tests.connectors.peers import serve_aiohttp
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    attributes: dict[str, object]


@dataclass
class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf exports on /v1/traces and keeps the spans."""

    spans: list[Span] = field(default_factory=list)

    def app(self) -> web.Application:
        async def traces(request: web.Request) -> web.Response:
            assert request.content_type == "application/x-protobuf"
            export = ExportTraceServiceRequest()
            export.ParseFromString(await request.read())
            for rs in export.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attributes: dict[str, object] = {}
                        for a in s.attributes:
                            v = a.value
                            attributes[a.key] = (
                                v.string_value if v.HasField("string_value") else v.int_value
                            )
                        self.spans.append(
                            Span(
                                s.name,
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                resource.get("service.name", ""),
                                attributes,
                            )
                        )
            body = ExportTraceServiceResponse().SerializeToString()
            return web.Response(body=body, content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        return app

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    async with serve_aiohttp(receiver.app()) as url:
        yield receiver, url


async def _until(what: str, check: object, proc: HeraldProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline or not proc.alive():
            raise AssertionError(f"{what}; herald run all said:\n{proc.tail(80)}")
        await asyncio.sleep(0.2)


async def test_the_events_trace_continues_to_the_provider_and_every_span_is_exported(
    settings: HeraldSettings, tmp_path: Path
) -> None:
    secret = new_secret()
    hooks = webhook.Receiver(knows=[secret])
    async with webhook.receiving(hooks) as hook_base, otlp_receiver() as (collector, otlp):
        rules = tmp_path / "rules.toml"
        rules.write_text(
            '[[rules]]\nname = "welcome-webhook"\nevent = "user-registered"\n'
            f'channel = "webhook"\nto = "{hook_base}/hooks/{{{{ user_id }}}}"\n'
            'template = "welcome"\n'
        )
        s = HeraldSettings.model_validate(
            settings.model_dump()
            | {"rules_file": rules, "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}
        )
        ensure_topics(s)
        env = herald_env(
            s,
            HERALD_WEBHOOK_SECRETS=json.dumps({"default": [secret]}),
            HERALD_WEBHOOK_ALLOW_HOSTS='["127.0.0.0/8"]',
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp,
            OTEL_BSP_SCHEDULE_DELAY="100",
            HERALD_OBSERVE_PORT="0",
        )
        proc = HeraldProcess("run-all", ["run", "all", "webhook"], env, tmp_path).start()
        try:
            uid = f"u-{uuid.uuid4().hex[:8]}"
            data = {
                "user_id": uid,
                "email": f"{uid}@example.com",
                "display_name": "Traced",
                "envelope": {"traceparent": CALLER},
            }
            # `herald publish` with the same OTLP settings: the publish span is the first hop.
            argv = ["publish", "user-registered", "--data", json.dumps(data)]
            published = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", *argv],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert published.returncode == 0, published.stderr
            event_id = published.stdout.split()[2]
            nid = notification_id(
                event_id, "welcome-webhook", "webhook", f"{hook_base}/hooks/{uid}"
            )
            await _until("no webhook request", lambda: hooks.requests, proc)
            await _until(
                "spans not exported",
                lambda: (
                    collector.named("herald.send webhook")
                    and collector.named("herald.route user-registered")
                    and collector.named("herald.publish user-registered")
                ),
                proc,
            )
        finally:
            proc.stop()

    [publish] = collector.named("herald.publish user-registered")
    [route] = collector.named("herald.route user-registered")
    [send] = collector.named("herald.send webhook")
    # One trace, the caller's, one hop after the other.
    assert {publish.trace_id, route.trace_id, send.trace_id} == {TRACE_ID}
    assert publish.parent_span_id == CALLER_SPAN
    assert route.parent_span_id == publish.span_id
    assert send.parent_span_id == route.span_id
    assert (publish.service, route.service, send.service) == (
        "herald-publish",
        "herald-all",
        "herald-all",
    )
    assert send.attributes["herald.notification_id"] == nid
    assert send.attributes["herald.outcome"] == "sent"
    assert route.attributes["herald.event_id"] == event_id
    # The provider's request carries the send span's context.
    [request] = hooks.requests
    assert request.headers["traceparent"] == f"00-{TRACE_ID}-{send.span_id}-01"
    # The records carry the trace too: the intent the routing span, the status as well.
    topics = Topics(s.topic_prefix)
    for topic in (topics.notifications("webhook"), topics.status):
        [record] = [
            h.as_dict(r.headers())
            for r in read_all(s.kafka_bootstrap_servers, topic)
            if h.as_dict(r.headers()).get(h.NOTIFICATION_ID) == nid
        ]
        assert record[h.TRACEPARENT] == f"00-{TRACE_ID}-{route.span_id}-01", topic
