"""A throwaway PostgreSQL server for tests.

``postgres_server()`` yields a DSN (a ``postgresql://`` URL of a superuser, database
``postgres``). With ``HERALD_TEST_POSTGRES_URL`` set it yields that URL and starts nothing;
otherwise it runs ``initdb`` into a temporary directory, starts the server on 127.0.0.1 on a
free port (its unix socket inside that directory, trust authentication: for local tests only),
waits until it accepts connections, and on exit stops it (``pg_ctl stop -m immediate``) and
removes the directory. As root, initdb and pg_ctl run as the ``postgres`` system user (the
server refuses to run as root).

The server binaries come from ``/usr/lib/postgresql/<version>/bin`` (Debian's layout; `make
postgres`, i.e. scripts/ensure-postgres.sh, installs them) or else from PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from devtools.procs import free_port as _free_port

__all__ = ["ENV_URL", "PostgresUnavailable", "find_bindir", "postgres_server"]

ENV_URL = "HERALD_TEST_POSTGRES_URL"
SUPERUSER = "postgres"
READY_TIMEOUT_S = 60.0


class PostgresUnavailable(RuntimeError):
    """No server binaries on this machine (and no HERALD_TEST_POSTGRES_URL)."""


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in path.parent.parent.name.split("."))
    except ValueError:
        return (0,)


def find_bindir() -> Path | None:
    """The newest PostgreSQL server bin directory: Debian's layout first, then PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key)
    if candidates:
        return candidates[-1].parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    return None


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SUPERUSER, "--", *argv]
    return argv


def _run(argv: list[str], log: Path | None = None) -> None:
    result = subprocess.run(
        _as_server_user(argv), capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        server_log = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            + (f"\nserver log:\n{server_log}" if server_log else "")
        )


def _wait_ready(dsn: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    configured = os.environ.get(ENV_URL)
    if configured:
        yield configured
        return
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl): run `make postgres` "
            f"(scripts/ensure-postgres.sh) or set {ENV_URL}"
        )
    root = Path(tempfile.mkdtemp(prefix="herald-pg-"))
    data, sockets, log = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        # mkdtemp makes root's 0700 directory: hand the whole tree to the server's user.
        for path in (root, sockets):
            shutil.chown(path, user=SUPERUSER, group=SUPERUSER)
    started = False
    try:
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{sockets}'",
            "max_connections": "50",
            "fsync": "on",  # the tests print throughput figures: keep commits real
            "log_min_messages": "warning",
        }
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pg.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        # Stopped in `finally` even if start fails half-way (stopping a stopped server is a
        # no-op). A free port can be taken before the server binds it: try a few.
        started = True
        for attempt in range(3):
            port = _free_port()
            try:
                pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w"]
                _run([*pg_ctl, "-o", f"-p {port}", "start"], log)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        dsn = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
        _wait_ready(dsn, READY_TIMEOUT_S)
        yield dsn
    finally:
        if started:
            with contextlib.suppress(Exception):
                _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
