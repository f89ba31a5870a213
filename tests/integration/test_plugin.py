"""A channel and a domain from outside Herald's code, end to end on a real broker.

The channel is a separate distribution (tests/plugin, `herald-pigeon`) installed with pip
into a directory of its own, as any third-party connector would be: Herald finds it through
the `herald.connectors` entry point, creates its topics, accepts it in rules and in the API,
and its sink delivers. The domain is a new event schema file with a new `herald.domain`:
no code names it, yet its topic is created and its events are routed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from pipeline.publisher import Publisher
from pipeline.records import notification_id
from pipeline.settings import HeraldSettings, project_root
from tests.conftest import free_port
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = pytest.mark.integration

WAIT = 90.0
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
PIP_INSTALL += ["--no-build-isolation"]

HATCHED = {
    "type": "record",
    "name": "PigeonHatched",
    "namespace": "herald.events",
    "doc": "A pigeon hatched in a user's aviary (a domain no Herald code knows).",
    "herald.event_type": "pigeon-hatched",
    "herald.domain": "aviary",
    "herald.key": "user_id",
    "fields": [
        {"name": "envelope", "type": "herald.Envelope"},
        {"name": "user_id", "type": "string"},
        {"name": "pigeon", "type": "string"},
    ],
}

RULES = """
[[rules]]
name = "welcome-pigeon"
event = "user-registered"
channel = "pigeon"
recipient = "user_id"
template = "welcome"

[[rules]]
name = "hatched-pigeon"
event = "pigeon-hatched"
channel = "pigeon"
recipient = "user_id"
template = "hatched"
"""


@dataclass
class PluginPipeline:
    settings: HeraldSettings
    outbox: Path
    api: str
    procs: list[HeraldProcess]

    def delivered(self) -> list[dict[str, str]]:
        if not self.outbox.exists():
            return []
        return [json.loads(line) for line in self.outbox.read_text().splitlines()]

    def wait_for(self, recipient: str) -> list[dict[str, str]]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            got = [d for d in self.delivered() if d["recipient"] == recipient]
            if got:
                time.sleep(1)  # a duplicate would be on its way by now
                return [d for d in self.delivered() if d["recipient"] == recipient]
            for p in self.procs:
                assert p.alive(), p.tail()
            time.sleep(0.3)
        raise AssertionError(
            f"nothing for {recipient}:\n" + "\n".join(p.tail() for p in self.procs)
        )


def _install_plugin(target: Path) -> None:
    """pip installs the plugin as a user would, into a directory of its own (so the test
    environment itself is left as it was)."""
    subprocess.run(
        [*PIP_INSTALL, "--target", str(target), str(project_root() / "tests" / "plugin")],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def plugin_pipeline(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PluginPipeline]:
    tmp = tmp_path_factory.mktemp("plugin")
    site = tmp / "site"
    _install_plugin(site)
    schemas = tmp / "schemas"
    shutil.copytree(project_root() / "schemas", schemas)
    (schemas / "events" / "PigeonHatched.v1.avsc").write_text(json.dumps(HATCHED))
    templates = tmp / "templates"
    shutil.copytree(project_root() / "config" / "templates", templates)
    (templates / "hatched").mkdir()
    (templates / "hatched" / "subject.txt").write_text("{{ pigeon }} hatched")
    (templates / "hatched" / "body.txt").write_text("Say hello to {{ pigeon }}.")
    rules = tmp / "rules.toml"
    rules.write_text(RULES)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    settings = HeraldSettings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        router_app_id=f"{prefix}router",
        sink_group_prefix=f"{prefix}sink",
        router_data_dir=tmp / "router",
        rules_file=rules,
        templates_dir=templates,
        schemas_dir=schemas,
        ledger_url=f"sqlite:///{tmp / 'ledger.db'}",  # type: ignore[arg-type]
        api_port=free_port(),
    )
    outbox = tmp / "outbox.jsonl"
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = herald_env(settings, PYTHONPATH=path, HERALD_PIGEON_OUTBOX=str(outbox))
    procs = [
        HeraldProcess("all", ["run", "all", "pigeon"], env, tmp).start(),
        HeraldProcess("api", ["run", "api"], env, tmp).start(),
    ]
    running = PluginPipeline(settings, outbox, f"http://127.0.0.1:{settings.api_port}", procs)
    try:
        yield running
    finally:
        for p in procs:
            p.stop()


def _wait_for_topics(settings: HeraldSettings, names: list[str]) -> None:
    admin = AdminClient(settings.admin_config())
    deadline = time.monotonic() + WAIT
    while not set(names) <= set(admin.list_topics(timeout=10).topics):
        assert time.monotonic() < deadline, f"topics {names} never created"
        time.sleep(0.5)


def test_connectors_list_shows_the_installed_plugin(plugin_pipeline: PluginPipeline) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "connectors", "list"],
        env=plugin_pipeline.procs[0].env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "pigeon" in out
    assert "HERALD_PIGEON_OUTBOX" in out


def test_plugin_channel_and_schema_domain_route_end_to_end(
    plugin_pipeline: PluginPipeline,
) -> None:
    p = plugin_pipeline
    s = p.settings
    # Created by the router and the sink at start, from the entry point and the schema file.
    _wait_for_topics(
        s,
        [f"{s.topic_prefix}notifications.pigeon", f"{s.topic_prefix}events.aviary"],
    )
    with Publisher(s, producer_name="tests") as publisher:
        uid = f"u-{uuid.uuid4().hex[:8]}"
        registered = publisher.publish_sync(
            "user-registered", {"user_id": uid, "email": f"{uid}@example.com", "display_name": "P"}
        )
        assert registered.topic == f"{s.topic_prefix}events.user"
        bird = f"b-{uuid.uuid4().hex[:8]}"
        hatched = publisher.publish_sync("pigeon-hatched", {"user_id": bird, "pigeon": "Coo"})
        assert hatched.topic == f"{s.topic_prefix}events.aviary"

    [welcome] = p.wait_for(uid)
    assert welcome["notification_id"] == notification_id(
        registered.event_id, "welcome-pigeon", "pigeon", uid
    )
    assert welcome["subject"] == "Welcome to Herald, P!"
    [news] = p.wait_for(bird)
    assert news["subject"] == "Coo hatched"
    assert news["body_text"].strip() == "Say hello to Coo."


def test_the_api_accepts_the_plugin_channel(plugin_pipeline: PluginPipeline) -> None:
    p = plugin_pipeline
    deadline = time.monotonic() + WAIT
    body = json.dumps(
        {"channel": "pigeon", "recipient": "loft-7", "subject": "Hi", "body_text": "coo"}
    ).encode()
    while True:
        request = urllib.request.Request(  # noqa: S310 - a loopback URL of the test's own
            f"{p.api}/v1/notifications",
            data=body,
            headers={"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310
                assert r.status == 202
                break
        except (ConnectionError, urllib.error.URLError):
            assert time.monotonic() < deadline, p.procs[1].tail()
            time.sleep(0.5)
    [got] = p.wait_for("loft-7")
    assert got["body_text"] == "coo"
