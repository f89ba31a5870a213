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
- ``DelayReceiver``: a provider that takes its time. Every answer (HTTP 204, or SMTP's 250
  after the message) comes a fixed delay after the request, as from a provider across a
  network. Neither nginx (without the echo module) nor smtp-sink (whole seconds only:
  ``-w 0.05`` is refused as a non-positive delay) can wait 50 ms, so this is a small
  asyncio server of the bench's own, run as a process of its own
  (``python -m bench.receivers http|smtp --delay-ms 50 ...``) so that its CPU is not the
  harness's and can be measured apart. It waits with one timer per request (no task, no
  thread), answers in request order per connection, and counts what it answered; the
  count is read over a status port (one line: answered, errors, and the most requests
  ever waiting for their answer at once and connections ever open at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.procs import free_port

__all__ = ["DelayReceiver", "Nginx", "SmtpSink", "free_port", "wait_port", "wrk_rate"]

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


def terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a receiver still running; SIGKILL it if it has not gone in 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
        if self.proc is not None:
            terminate(self.proc)
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


# -- a receiver that answers after a delay ---------------------------------------------------


class _Delayed(asyncio.Protocol):
    """One connection: requests are parsed from the bytes as they come, each answered
    ``delay`` seconds after it was complete, in order. While an answer is pending the
    connection reads on (buffers) but starts nothing new, as a server answering one request
    at a time per connection does."""

    def __init__(self, server: _DelayServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.busy = False
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self.server.peak_connections = max(self.server.peak_connections, self.server.connections)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections -= 1

    def advance(self) -> None:
        """Parse what is buffered; answer at once, or later through ``later``."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def later(self, answer: bytes, *, close: bool = False) -> None:
        self.busy = True
        self.server.waiting += 1
        self.server.peak_waiting = max(self.server.peak_waiting, self.server.waiting)
        self.server.loop.call_later(self.server.delay, self._answer, answer, close)

    def _answer(self, answer: bytes, close: bool) -> None:
        self.busy = False
        self.server.waiting -= 1
        if self.closing:
            return
        self.write(answer)
        self.server.answered += 1
        if close and self.transport is not None:
            self.transport.close()
            return
        self.advance()


class _Http(_Delayed):
    """HTTP/1.1 with keep-alive: every request is answered ``204 No Content`` after the
    delay. Bodies by Content-Length only (what the bench's clients send); anything else is
    answered 400 at once and counted as an error."""

    ANSWER = b"HTTP/1.1 204 No Content\r\nServer: bench\r\n\r\n"
    CLOSE = b"HTTP/1.1 204 No Content\r\nServer: bench\r\nConnection: close\r\n\r\n"

    def advance(self) -> None:
        while not self.busy and not self.closing:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            length = 0
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if m is not None:
                length = int(m.group(1))
            elif b"\r\ntransfer-encoding:" in head:
                self.server.errors += 1
                self.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                assert self.transport is not None
                self.transport.close()
                return
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[: end + 4 + length]
            http10 = head.split(b"\r\n", 1)[0].endswith(b"http/1.0")
            close = b"\r\nconnection: close" in head or http10
            self.later(self.CLOSE if close else self.ANSWER, close=close)


class _Smtp(_Delayed):
    """Enough SMTP for smtplib and aiosmtplib: EHLO/HELO, MAIL, RCPT, DATA (up to the
    lone dot), RSET, NOOP, QUIT. The 250 that accepts a message comes after the delay;
    every other reply at once."""

    EHLO = b"250-bench\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 104857600\r\n"

    def __init__(self, server: _DelayServer) -> None:
        super().__init__(server)
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.write(b"220 bench ESMTP\r\n")

    def advance(self) -> None:
        while not self.busy and not self.closing:
            if self.in_data:
                if self.buf.startswith(b".\r\n"):
                    end, skip = 0, 3
                else:
                    end = self.buf.find(b"\r\n.\r\n")
                    skip = 5
                    if end < 0:
                        return
                del self.buf[: end + skip]
                self.in_data = False
                self.later(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line = bytes(self.buf[:end])
            del self.buf[: end + 2]
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.write(self.EHLO)
            elif verb == b"DATA":
                self.in_data = True
                self.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.write(b"221 Bye\r\n")
                assert self.transport is not None
                self.transport.close()
                return
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                self.write(b"250 Ok\r\n")
            else:
                self.server.errors += 1
                self.write(b"502 5.5.2 Error: command not recognized\r\n")


class _DelayServer:
    def __init__(self, protocol: str, delay: float, loop: asyncio.AbstractEventLoop) -> None:
        self.factory: Callable[[], _Delayed] = {
            "http": lambda: _Http(self),
            "smtp": lambda: _Smtp(self),
        }[protocol]
        self.delay = delay
        self.loop = loop
        self.answered = 0
        self.errors = 0
        self.waiting = self.peak_waiting = 0  # requests waiting for their answer
        self.connections = self.peak_connections = 0

    async def status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``status``: one line of counts; ``reset``: the peaks start over from now."""
        with contextlib.suppress(OSError):
            if (await reader.readline()).strip() == b"reset":
                self.peak_waiting, self.peak_connections = self.waiting, self.connections
        line = f"{self.answered} {self.errors} {self.peak_waiting} {self.peak_connections}\n"
        writer.write(line.encode())
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = _DelayServer(args.protocol, args.delay_ms / 1000, loop)
    main = await loop.create_server(server.factory, "127.0.0.1", args.port, backlog=4096)
    status = await asyncio.start_server(server.status, "127.0.0.1", args.status_port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with main, status:
        await stop.wait()


class DelayReceiver:
    """A ``python -m bench.receivers`` process answering HTTP (204) or SMTP (250) after
    ``delay_ms``; calling it returns how many requests or messages it answered."""

    def __init__(self, protocol: str, work: Path, delay_ms: float) -> None:
        self.protocol = protocol
        self.work = work
        self.delay_ms = delay_ms
        self.port = free_port()
        self.status_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> DelayReceiver:
        self.work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.receivers",
                self.protocol,
                *("--port", str(self.port), "--status-port", str(self.status_port)),
                *("--delay-ms", str(self.delay_ms)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / f"delay-{self.protocol}.log", "ab"),  # noqa: SIM115 - kept by the child
            start_new_session=True,
        )
        wait_port(self.port)
        wait_port(self.status_port)
        return self

    def status(self, request: bytes = b"status") -> dict[str, int]:
        """answered, errors, peak_waiting and peak_connections so far."""
        with socket.create_connection(("127.0.0.1", self.status_port), timeout=5) as s:
            s.sendall(request + b"\n")
            data = b""
            while chunk := s.recv(64):
                data += chunk
        names = ("answered", "errors", "peak_waiting", "peak_connections")
        return dict(zip(names, map(int, data.split()), strict=True))

    def __call__(self) -> int:
        return self.status()["answered"]

    def reset_peaks(self) -> None:
        """The peaks start over from what is waiting and open now."""
        self.status(b"reset")

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.receivers", description="a delaying receiver")
    p.add_argument("protocol", choices=["http", "smtp"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--status-port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=50.0)
    asyncio.run(_serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
