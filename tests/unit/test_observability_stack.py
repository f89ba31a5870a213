"""docker-compose.observability.yml on top of docker-compose.yml is a valid stack (checked by
`docker compose config`, which needs no engine), its Prometheus scrapes every Herald
process where it serves /metrics, and the Grafana dashboard queries only metrics Herald
exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import pipeline.metrics  # noqa: F401 - registers every herald_* metric
from pipeline.settings import HeraldSettings, project_root
from tests.compose_cli import compose_cli

ROOT = project_root()
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "herald.json"


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.observability.yml"]
    out = subprocess.run(
        [*compose_cli(), *files, "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = json.loads(out.stdout)
    return config


def test_the_stack_adds_prometheus_and_grafana_and_opens_the_probe_ports(
    stack: dict[str, Any],
) -> None:
    services = stack["services"]
    assert {"kafka", "router", "sink-email", "api", "prometheus", "grafana"} <= set(services)
    for name in ("router", "sink-email"):
        env = services[name]["environment"]
        assert env["HERALD_OBSERVE_HOST"] == "0.0.0.0"  # noqa: S104 - inside the container
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"  # the base file's, merged
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]
    header = (ROOT / "docker-compose.observability.yml").read_text()
    assert "-f docker-compose.yml -f docker-compose.observability.yml up" in header


def test_prometheus_scrapes_each_process_where_it_serves_metrics(stack: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    defaults = HeraldSettings()
    api_port = stack["services"]["api"]["ports"][0]["target"]
    assert targets == {
        f"router:{defaults.observe_port}",
        f"sink-email:{defaults.observe_port}",
        f"api:{api_port}",
    }
    assert all(
        job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"]
    )


def _exported_names() -> set[str]:
    names = set()
    for metric in REGISTRY.collect():
        if not metric.name.startswith("herald_"):
            continue
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_count", "_sum"],
        }.get(metric.type, [""])
        names.update(metric.name + s for s in suffixes)
    return names


def test_the_dashboard_queries_only_metrics_herald_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bherald_[a-z_]+", e)}
    assert used, "no herald_* metric in the dashboard"
    assert used <= _exported_names(), used - _exported_names()
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for must in ("deliveries by channel and outcome", "latency", "lag", "dead letters", "breaker"):
        assert must in titles
    # Every panel uses the provisioned data source.
    datasource = yaml.safe_load(
        (ROOT / "ops/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {
        datasource["uid"]
    }
