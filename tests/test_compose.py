"""docker-compose.yml and the Dockerfile, checked without a Docker engine: what the file
promises (pinned images, PostgreSQL as every sink's ledger, a sink per installed channel,
healthchecks and the conditions that wait on them, ports on loopback only, only setting names
Herald reads), and `docker compose config` when the compose CLI is installed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.registry import installed_channels
from pipeline.environment import valid_names
from pipeline.settings import project_root
from tests.compose_cli import compose_cli

ROOT = project_root()
# Images whose healthcheck is defined by the image itself, not in the compose file.
IMAGE_HEALTHCHECKS = {"schema-registry"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def herald_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == "herald:local"}


def test_images_are_pinned_and_kafka_matches_the_local_broker(compose: dict[str, Any]) -> None:
    pom = (ROOT / "kafka" / "pom.xml").read_text()
    kafka_version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert kafka_version
    for name, service in compose["services"].items():
        image = service["image"]
        if image == "herald:local":
            assert service.get("build") == ".", name
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag not in ("latest", "develop"), f"{name}: pin {image}"
        assert re.fullmatch(r"v?\d+(\.\d+)+", tag), f"{name}: {image} is not a version"
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{kafka_version[1]}"


def test_every_channel_has_a_sink_and_every_sink_and_the_api_use_postgresql(
    compose: dict[str, Any],
) -> None:
    services = herald_services(compose)
    sinks = {
        s["command"][2]: name
        for name, s in services.items()
        if s["command"][:2] == ["run", "sink"] and len(s["command"]) == 3
    }
    assert set(sinks) == set(installed_channels())
    assert services["api"]["command"] == ["run", "api"]
    assert services["router"]["command"] == ["run", "router"]
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    for name in [*sinks.values(), "api", "router"]:
        env = services[name]["environment"]
        assert env["HERALD_LEDGER_URL"].startswith("postgresql://herald:"), name
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert "postgres" in services[name]["depends_on"], name
    # Channels that need a provider's credentials are opt-in.
    for channel in ("webhook", "sms", "webpush", "fcm", "apns"):
        assert services[sinks[channel]]["profiles"] == ["channels"]
    assert "profiles" not in services[sinks["email"]]


def test_healthchecks_and_the_conditions_that_wait_on_them(compose: dict[str, Any]) -> None:
    services = compose["services"]
    healthy = {n for n, s in services.items() if "healthcheck" in s} | IMAGE_HEALTHCHECKS
    for name, service in herald_services(compose).items():
        if name == "topics":  # one-shot
            assert service["restart"] == "no"
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "herald", "health"] or "/healthz" in " ".join(test), name
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            condition = rule["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), name
            if condition == "service_healthy":
                assert dependency in healthy, f"{name} waits on {dependency}, which has none"
    assert services["api"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
    assert "127.0.0.1:8080:8080" in compose["services"]["api"]["ports"]


def test_the_file_sets_only_settings_herald_reads(compose: dict[str, Any]) -> None:
    names = valid_names()
    for name, service in herald_services(compose).items():
        for variable in service["environment"]:
            if variable.startswith(("HERALD_", "KAFKA_", "SCHEMA_")):
                assert variable in names, f"{name}: {variable} is not a Herald setting"


def test_the_image_installs_the_package_with_its_data_and_every_channel() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install '/tmp/herald[channels]'" in dockerfile
    copied = re.findall(r"^COPY (.+) /tmp/herald/", dockerfile, flags=re.M)
    sources = {word.rstrip("/") for line in copied for word in line.split()}
    # What tests/test_packaging.py builds its wheel from.
    assert sources == {
        "pyproject.toml",
        "setup.py",
        "MANIFEST.in",
        "README.md",
        "pipeline",
        "connectors",
        "schemas",
        "config",
    }


@pytest.mark.parametrize("profile", [[], ["--profile", "channels"]], ids=["default", "channels"])
def test_docker_compose_config_accepts_the_file(profile: list[str], tmp_path: Path) -> None:
    cli = compose_cli()
    out = subprocess.run(
        [*cli, "-f", str(ROOT / "docker-compose.yml"), *profile, "config", "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
