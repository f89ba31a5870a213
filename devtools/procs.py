"""Starting Herald processes with their settings as environment, and free loopback ports:
the one implementation that tests, the fault-injection harness, the benchmark and the demo
share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.settings import HeraldSettings

__all__ = ["HeraldProcess", "free_port", "free_ports", "herald_env"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def herald_env(settings: HeraldSettings, **extra: str) -> dict[str, str]:
    """The environment that gives a child process exactly these settings (secrets included:
    the environment is how a process gets them), plus ``extra`` (connector settings such as
    HERALD_SMTP_PORT, SCHEMA_REGISTRY_URL, ...)."""
    env = {**os.environ}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"HERALD_{name.upper()}"] = str(value)
    env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    env.pop("HERALD_SCHEMA_REGISTRY_URL", None)
    if settings.schema_registry_url:
        env["SCHEMA_REGISTRY_URL"] = settings.schema_registry_url
    else:
        env.pop("SCHEMA_REGISTRY_URL", None)
    env.update(extra)
    return env


class HeraldProcess:
    """``python -m pipeline.cli ARGS`` (or another module, with ``module=``) in its own
    process group, logging to ``logdir/<name>.log``; stop() is graceful, kill() a crash."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        logdir: Path,
        module: str = "pipeline.cli",
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.module = module
        self.log = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> HeraldProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own module, our own arguments
                [sys.executable, "-m", self.module, *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group: a crash."""
        if self.alive():
            assert self.proc is not None  # noqa: S101
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``): a graceful stop."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def tail(self, lines: int = 80) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
