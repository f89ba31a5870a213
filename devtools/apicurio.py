"""Apicurio Registry, a real schema registry, run from the distribution registry/pom.xml
provisions (``make registry-jars`` unpacks it to ``.herald/apicurio``).

Herald speaks to it through its Confluent-compatible API, ``/apis/ccompat/v7``, which is
the URL to give SCHEMA_REGISTRY_URL. It keeps its schemas in an in-memory H2 database (its
default storage): a restart forgets them. Listens on loopback only; optionally with basic
auth (users of its own), bearer tokens (JWTs signed by a given key) and https, none of which
needs an identity server::

    registry = Apicurio(workdir, users={"herald": "s3cret"})
    registry.start()          # seconds it took; about 15 on two cores
    registry.url              # http://127.0.0.1:PORT/apis/ccompat/v7
    registry.stop()

Or by hand: ``python -m devtools.apicurio --port 8081``.

Its configuration, passwords included, goes to ``WORKDIR/config/application.properties``
(mode 0600; Quarkus reads it from the working directory), never to its command line, where
any local user could read it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pipeline.settings import project_root

__all__ = [
    "CCOMPAT_PATH",
    "Apicurio",
    "ApicurioNotProvisionedError",
    "ApicurioStartError",
    "default_home",
    "find_java",
]

CCOMPAT_PATH = "/apis/ccompat/v7"
# The application is compiled for Java 21 (class file version 65).
MIN_JAVA = 21
# Apicurio's role for a user allowed everything (apicurio.auth.roles.admin).
ADMIN_ROLE = "sr-admin"


class ApicurioNotProvisionedError(RuntimeError):
    """The distribution is missing: run ``make registry-jars``."""


class ApicurioStartError(RuntimeError):
    """The registry did not become ready; the message holds the tail of its log."""


def default_home() -> Path:
    return Path(os.environ.get("HERALD_APICURIO_HOME", project_root() / ".herald" / "apicurio"))


def _java_major(java: Path) -> int | None:
    """The major version of the JDK ``java`` belongs to, from its ``release`` file."""
    release = java.resolve().parent.parent / "release"
    with contextlib.suppress(OSError):
        m = re.search(r'^JAVA_VERSION="(\d+)', release.read_text(), re.MULTILINE)
        if m:
            return int(m[1])
    return None


def find_java(minimum: int = MIN_JAVA) -> str:
    """A ``java`` of version ``minimum`` or newer: HERALD_APICURIO_JAVA, else JAVA_HOME's,
    the one on PATH, or the newest under /usr/lib/jvm."""
    if configured := os.environ.get("HERALD_APICURIO_JAVA"):
        return configured
    candidates: list[Path] = []
    if java_home := os.environ.get("JAVA_HOME"):
        candidates.append(Path(java_home) / "bin" / "java")
    if on_path := shutil.which("java"):
        candidates.append(Path(on_path))
    jvms = Path("/usr/lib/jvm")
    if jvms.is_dir():
        found = [(_java_major(j) or 0, j) for j in jvms.glob("*/bin/java")]
        candidates += [j for _, j in sorted(found, key=lambda v: v[0], reverse=True)]
    for java in candidates:
        major = _java_major(java) if java.exists() else None
        if major is not None and major >= minimum:
            return str(java)
    raise ApicurioStartError(
        f"Apicurio Registry needs Java {minimum} or newer; none found (JAVA_HOME, PATH, "
        "/usr/lib/jvm). Install one or set HERALD_APICURIO_JAVA to its java binary."
    )


@dataclass
class Apicurio:
    """One Apicurio Registry process. ``workdir`` holds its configuration and log."""

    workdir: Path
    home: Path = field(default_factory=default_home)
    port: int = 0  # 0: a free port
    management_port: int = 0  # health and metrics, on a port of their own; 0: a free port
    # Basic auth: user -> password, each with the admin role. Empty: no basic auth.
    users: Mapping[str, str] = field(default_factory=dict)
    # Bearer tokens (JWT) signed by this key are accepted: a PEM public key. Apicurio checks
    # them with Quarkus OIDC, which verifies locally with a configured key, so no identity
    # server is needed. None: no bearer auth.
    bearer_public_key: str | None = None
    # https with this PEM certificate chain and key; ``tls_ca`` (PEM) verifies it when
    # probing for readiness.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    java: str | None = None
    heap: str = "512m"
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls_cert is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The Confluent-compatible API: what SCHEMA_REGISTRY_URL should be."""
        return self.base_url + CCOMPAT_PATH

    @property
    def log_file(self) -> Path:
        return self.workdir / "apicurio.log"

    def version(self) -> str:
        for jar in (self.home / "app").glob("apicurio-registry-app-*.jar"):
            return jar.name.removeprefix("apicurio-registry-app-").removesuffix(".jar")
        return "unknown"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> float:
        """Start the registry and wait until its ccompat API answers. Returns the seconds
        it took."""
        if self._proc is not None and self._proc.poll() is None:
            return 0.0
        runner = self.home / "quarkus-run.jar"
        if not runner.is_file():
            raise ApicurioNotProvisionedError(
                f"no Apicurio Registry in {self.home}: run `make registry-jars` "
                "(mvn -f registry/pom.xml dependency:unpack)"
            )
        java = self.java or find_java()
        if self.port == 0:
            self.port = _free_port()
        if self.management_port == 0:
            self.management_port = _free_port()
        self._write_config()
        started = time.monotonic()
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    java,
                    f"-Xmx{self.heap}",
                    "-XX:TieredStopAtLevel=1",
                    "-XX:+UseSerialGC",
                    # Class data sharing: the first run writes the archive, later runs map it.
                    "-XX:+AutoCreateSharedArchive",
                    f"-XX:SharedArchiveFile={self.home.resolve() / 'registry.jsa'}",
                    "-jar",
                    str(runner.resolve()),
                ],
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            deadline = started + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise ApicurioStartError(
                        f"Apicurio Registry exited with code {self._proc.returncode}:\n"
                        + self.log_tail()
                    )
                if self.answers():
                    return time.monotonic() - started
                time.sleep(0.25)
            raise ApicurioStartError(
                f"Apicurio Registry not ready after {timeout:.0f}s:\n{self.log_tail()}"
            )
        except BaseException:
            self.stop()  # not left running when it failed, timed out or was interrupted
            raise

    def answers(self) -> bool:
        """The ccompat API answers (200, or 401 when auth is on: it is up either way)."""
        context = None
        if self.tls_cert is not None:
            context = ssl.create_default_context(
                cafile=str(self.tls_ca) if self.tls_ca is not None else None
            )
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own loopback URL
                self.url + "/subjects", timeout=2, context=context
            ) as response:
                return int(response.status) == 200
        except urllib.error.HTTPError as e:
            return e.code == 401
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Quarkus shuts down gracefully), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> Apicurio:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------------

    def _write_config(self) -> None:
        props: dict[str, str] = {
            "quarkus.http.host": "127.0.0.1",
            "quarkus.http.port": str(self.port),
            "quarkus.management.host": "127.0.0.1",
            "quarkus.management.port": str(self.management_port),
            # The H2 pool opens 20 connections by default; a test registry needs few.
            "apicurio.datasource.jdbc.initial-size": "2",
            "apicurio.datasource.jdbc.min-size": "2",
            "quarkus.log.console.json": "false",
        }
        if self.users:
            # Quarkus's embedded users: Apicurio checks basic credentials itself, with no
            # identity server (OIDC would need one, e.g. Keycloak).
            props["quarkus.http.auth.basic"] = "true"
            props["quarkus.security.users.embedded.plain-text"] = "true"
            for user, password in self.users.items():
                if not re.fullmatch(r"[A-Za-z0-9_.-]+", user):
                    raise ValueError(f"user name {user!r}: letters, digits, _ . - only")
                if password != password.strip():
                    # Quarkus trims configuration values: the password would not match.
                    raise ValueError(f"the password of {user} starts or ends with a blank")
                props[f"quarkus.security.users.embedded.users.{user}"] = password
                props[f"quarkus.security.users.embedded.roles.{user}"] = ADMIN_ROLE
        if self.bearer_public_key is not None:
            # The key's base64 body, without the PEM armour and line breaks.
            body = "".join(
                line.strip()
                for line in self.bearer_public_key.splitlines()
                if line.strip() and not line.startswith("-----")
            )
            props["quarkus.oidc.tenant-enabled"] = "true"
            props["quarkus.oidc.public-key"] = body
        if self.users or self.bearer_public_key is not None:
            # Which mechanisms Apicurio tries, in order; one left out of it locks its users out.
            props["apicurio.authn.mechanism.priority"] = ",".join(
                ["basic"] * bool(self.users) + ["oidc"] * (self.bearer_public_key is not None)
            )
        if self.tls_cert is not None:
            if self.tls_key is None:
                raise ValueError("tls_cert needs tls_key")
            props["quarkus.http.ssl-port"] = str(self.port)
            props["quarkus.http.ssl.certificate.files"] = str(self.tls_cert.resolve())
            props["quarkus.http.ssl.certificate.key-files"] = str(self.tls_key.resolve())
            props["quarkus.http.insecure-requests"] = "disabled"
            props["quarkus.http.port"] = str(_free_port())  # unused: plain http is off
        config = self.workdir / "config"
        config.mkdir(parents=True, exist_ok=True)
        path = config / "application.properties"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={_escape(v)}\n" for k, v in props.items())


def _escape(value: str) -> str:
    """``value`` as a .properties value that Quarkus reads back as is (checked with \\,
    ${x}, $, :, =, # and !). Quarkus expands ${...}: \\\\$ in the file is a literal $."""
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return escaped.replace("$", "\\\\$")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.apicurio", description=__doc__)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--workdir", type=Path, help="configuration and log (default: a temp dir)")
    parser.add_argument("--basic-auth", help="USER:PASSWORD, the one user allowed in")
    args = parser.parse_args(argv)
    users: dict[str, str] = {}
    if args.basic_auth:
        user, _, password = args.basic_auth.partition(":")
        users[user] = password
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        registry = Apicurio(workdir, port=args.port, users=users)
        took = registry.start()
        stack.callback(registry.stop)
        print(
            f"Apicurio Registry {registry.version()} ready in {took:.1f}s: "
            f"SCHEMA_REGISTRY_URL={registry.url} (log: {registry.log_file})",
            flush=True,
        )
        # Wait for Ctrl-C or SIGTERM, then stop the registry (it runs in its own session).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
