"""The receiving end of the benchmark: Debian's nginx (webhooks) and Postfix's smtp-sink
(email), each started in a work directory on a free loopback port, each with a counter of
what it accepted, so every contender is measured at the same place: the receiver.

- ``Nginx``: one worker, ``return 204`` for any POST, ``stub_status`` at /status for the
  request counter (the counter's own polls are subtracted), optional access log of
  ``$msec $http_webhook_id`` per request for latencies.
- ``SmtpSink``: ``smtp-sink -c`` prints a running ``mesg=N`` counter on every message; a
  reader thread keeps the last value. With ``dump_dir`` every message is also written to a
  file (``-d``), whose modification time is the receipt time used for latencies.
- ``wrk``: the reference HTTP rate against the same endpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from devtools.procs import free_port

__all__ = ["Nginx", "SmtpSink", "free_port", "wait_port", "wrk_rate"]

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    {access_log}
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /status {{ stub_status; }}
        location / {{ return 204; }}
    }}
}}
"""


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _shm() -> str | None:
    """tmpfs when there is one: dumps are many small files."""
    shm = "/dev/shm"  # noqa: S108 - a fresh mkdtemp directory inside it
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} not found: run scripts/ensure-bench-tools.sh")
    return found


class Nginx:
    def __init__(self, work: Path, *, access_log: bool = False) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = work / "access.log" if access_log else None
        self._polls = 0
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        self.work.mkdir(parents=True, exist_ok=True)
        log = (
            "log_format bench '$msec $http_webhook_id';\n"
            f"    access_log {self.access_log} bench buffer=256k flush=1s;"
            if self.access_log
            else "access_log off;"
        )
        conf = self.work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=self.work, port=self.port, access_log=log))
        self.proc = subprocess.Popen(
            [_binary("nginx"), "-c", str(conf), "-p", str(self.work)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "stderr.log", "ab"),  # noqa: SIM115 - kept by the child
            start_new_session=True,
        )
        wait_port(self.port)
        return self

    def requests(self) -> int:
        """Requests served so far, not counting this counter's own polls."""
        with self._lock, socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"GET /status HTTP/1.0\r\nHost: bench\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            self._polls += 1
            polls = self._polls
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n", data)
        if m is None:
            raise RuntimeError(f"unexpected stub_status answer: {data[:200]!r}")
        return int(m.group(3)) - polls

    def __call__(self) -> int:
        return self.requests()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class SmtpSink:
    def __init__(self, work: Path, *, dump: bool = False) -> None:
        self.work = work
        self.port = free_port()
        # smtp-sink writes as 'nobody': the dump directory lives in a world-writable tmpfs
        # directory of its own, not under the (private) work directory.
        self.dump_dir = (
            Path(tempfile.mkdtemp(prefix="herald-bench-dump-", dir=_shm())) if dump else None
        )
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> SmtpSink:
        self.work.mkdir(parents=True, exist_ok=True)
        argv = [_binary("smtp-sink"), "-c", "-m", "1024"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        if self.dump_dir is not None:
            self.dump_dir.chmod(0o777)
            argv += ["-d", f"{self.dump_dir}/%H%M%S."]
        argv += [f"127.0.0.1:{self.port}", "1024"]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=open(self.work / "smtp-sink.log", "ab"),  # noqa: SIM115 - kept by the child
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="smtp-sink-counter", daemon=True)
        self._reader.start()
        wait_port(self.port)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stdout: Any = self.proc.stdout  # a BufferedReader: read1 returns what is there
        pattern = re.compile(rb"mesg=(\d+)")
        tail = b""
        while chunk := stdout.read1(65536):
            found = pattern.findall(tail + chunk)
            if found:
                self.count = int(found[-1])
            tail = chunk[-32:]

    def __call__(self) -> int:
        return self.count

    def received(self) -> list[tuple[str, float]]:
        """(Message-ID, receipt time as epoch seconds) of every dumped message."""
        out = []
        assert self.dump_dir is not None
        for f in self.dump_dir.iterdir():
            head = f.read_bytes()[:4096]
            m = re.search(rb"\nMessage-ID: (<[^>\r\n]+>)", head, re.IGNORECASE)
            if m:
                out.append((m.group(1).decode(), f.stat().st_mtime))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)

    def cleanup(self) -> None:
        if self.dump_dir is not None:
            shutil.rmtree(self.dump_dir, ignore_errors=True)


def wrk_rate(url: str, body: bytes, *, connections: int, seconds: int, work: Path) -> float:
    """wrk's requests/s POSTing ``body`` to ``url`` (one thread: the machine has two cores
    and nginx needs one)."""
    script = work / "post.lua"
    lua_body = body.decode().replace("\\", "\\\\").replace('"', '\\"')
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = "{lua_body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    out = subprocess.run(
        [
            _binary("wrk"),
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"unexpected wrk output: {out}")
    return float(m.group(1))
