"""Herald as a wheel, installed into a new virtual environment and run outside the checkout.

What this proves: the wheel built from the sources alone (pyproject.toml, setup.py, the two
packages, schemas/ and config/) gives a `herald` command whose schemas, default rules and
templates come from the wheel itself (pipeline/_data), that `herald init` writes an editable
copy the settings can point at, and that the Publisher (validation and encoding) and the
router's handler work from the installed package. No broker is involved.

How, without downloading anything: the venv is made with `python -m venv` (no system site
packages), the wheel is installed into it with --no-deps, and Herald's dependencies come from
the environment running this test, appended to the venv's path by a .pth file, so they sit
*after* the venv's own site-packages. The checkout is on no path (the commands run from a
temporary directory, without PYTHONPATH), and the test asserts that `pipeline` is imported
from the venv. What it does not prove: that pip resolves the declared dependencies from an
index (that needs the network and minutes; the Dockerfile's build does it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pipeline.settings import project_root

SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")
TREES = ("pipeline", "connectors", "schemas", "config")
PIP = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the wheel installed; returns its bin directory."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    root = project_root()
    for name in SOURCES:
        shutil.copy2(root / name, src / name)
    for name in TREES:
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True,
        cwd=tmp,
    )
    (wheel,) = dist.glob("herald-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*PIP, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        cwd=tmp,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies, after the venv's own packages (a .pth line appends to sys.path).
    (site / "zz-herald-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def run(bin_dir: Path, cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HERALD_", "KAFKA_", "SCHEMA_", "PYTHON", "VIRTUAL_ENV"))
    }
    return subprocess.run(
        [str(bin_dir / argv[0]), *argv[1:]],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_herald_runs_from_the_wheel_with_its_packaged_data(installed: Path, tmp_path: Path) -> None:
    where = run(installed, tmp_path, "python", "-c", "import pipeline; print(pipeline.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(installed.parent)), where.stdout
    assert str(project_root()) not in where.stdout

    help_ = run(installed, tmp_path, "herald", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "rules" in help_.stdout and "init" in help_.stdout

    channels = run(installed, tmp_path, "herald", "connectors", "list")
    assert channels.returncode == 0, channels.stderr
    assert [line.split()[0] for line in channels.stdout.splitlines() if line[:1] != " "] == [
        "apns",
        "email",
        "fcm",
        "slack",
        "sms",
        "webhook",
        "webpush",
    ]

    check = run(installed, tmp_path, "herald", "rules", "check")
    assert check.returncode == 0, check.stderr
    assert "3 rules, 3 templates" in check.stdout
    assert "/pipeline/_data/config/rules.toml" in check.stdout
    assert str(installed.parent) in check.stdout


def test_herald_init_writes_a_copy_the_settings_point_at(installed: Path, tmp_path: Path) -> None:
    out = run(installed, tmp_path, "herald", "init", "notifications")
    assert out.returncode == 0, out.stderr
    project = tmp_path / "notifications"
    assert (project / "rules.toml").is_file()
    assert (project / "templates" / "welcome" / "body.txt").is_file()
    assert (project / "schemas" / "events" / "UserRegistered.v3.avsc").is_file()
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in out.stdout.splitlines()
        if line.startswith("export ")
    )
    assert exports == {
        "HERALD_RULES_FILE": str(project / "rules.toml"),
        "HERALD_TEMPLATES_DIR": str(project / "templates"),
        "HERALD_SCHEMAS_DIR": str(project / "schemas"),
    }
    (project / "templates" / "welcome" / "subject.txt").write_text("Hello {{ display_name }}")
    check = run(installed, tmp_path, "herald", "rules", "check", **exports)
    assert check.returncode == 0, check.stderr
    assert "subject='Hello example'" in check.stdout

    again = run(installed, tmp_path, "herald", "init", "notifications")
    assert again.returncode == 1
    assert "already has" in again.stderr


SMOKE = """
import json
from pipeline.publisher import Publisher
from pipeline.router.app import create_handler
from pipeline.serialization import RecordValidationError
from pipeline.settings import HeraldSettings

settings = HeraldSettings()
publisher = Publisher(settings, producer_name="smoke")
event, record = publisher.prepare(
    "user-registered", {"user_id": "u-1", "email": "ada@example.com", "display_name": "Ada"}
)
try:
    publisher.prepare("user-registered", {"user_id": 7})
    refused = None
except RecordValidationError as e:
    refused = str(e)
outputs = create_handler(settings).handle(
    key=record.key.encode(), value=record.value, headers=record.headers,
    topic=record.topic, partition=0, offset=0,
)
print(json.dumps({
    "schemas": str(settings.schemas_dir),
    "topic": event.topic,
    "refused": refused,
    "outputs": [o.topic for o in outputs],
    "dead": [o.dead for o in outputs],
}))
"""


def test_the_publisher_and_the_router_work_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    out = run(installed, tmp_path, "python", "-c", SMOKE)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["schemas"].startswith(str(installed.parent))
    assert result["schemas"].endswith("pipeline/_data/schemas")
    assert result["topic"] == "events.user"
    assert "user_id" in result["refused"]
    assert result["outputs"] == ["notifications.email"]
    assert result["dead"] == [False]
