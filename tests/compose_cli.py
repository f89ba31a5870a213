"""The Compose CLI the compose tests validate with: `docker compose` where the plugin is
installed, else the one `make compose-cli` builds from its Go module (`make test` does)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pipeline.settings import project_root


def compose_cli() -> list[str]:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    built = project_root() / ".herald" / "bin" / "docker-compose"
    if built.is_file():
        return [str(built)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no Compose CLI: run `make compose-cli` (make test builds it)")
