"""The SSRF guard (connectors/ssrf.py): which addresses it refuses, the allowlist, and that a
connection goes to the address that was checked (no DNS rebinding), with TLS still verified
for the URL's hostname. Servers are real aiohttp servers on loopback.

Every connection in these tests goes through :class:`RecordingBackend`, which records it and
refuses anything but loopback, so even a broken guard cannot send traffic off this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trustme
from aiohttp import web
from pydantic import SecretStr

from connectors.base import Outcome
from connectors.ssrf import (
    AddressGuard,
    ForbiddenAddressError,
    GuardedBackend,
    forbidden_reason,
    guarded_client,
    parse_retry_after,
)
from connectors.webhook import WebhookConnector, WebhookSettings, new_secret
from pipeline.records import NotificationIntent, notification_id

# -- shared helpers (test_webhook and test_slack import these) ------------------------------------


def _loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """The real socket layer, recording every connect; anything but loopback is refused
    (the guard hands over vetted IPs only: a hostname here fails the test)."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []
        self._real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        if not _loopback(host):
            raise httpcore.ConnectError(f"test safety net: not connecting to {host}")
        return await self._real.connect_tcp(host, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AssertionError("no Unix sockets in these tests")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def closed_port() -> int:
    with bound_socket() as s:
        return int(s.getsockname()[1])


@asynccontextmanager
async def serve(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    """Run ``app`` on host:port (0: a free port) until the block ends; yields the port."""
    sock = bound_socket(host, port)
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    try:
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=ssl_context)
        await site.start()
        yield int(sock.getsockname()[1])
    finally:
        await runner.cleanup()
        sock.close()


# -- which addresses are refused ------------------------------------------------------------------

ADDRESSES: list[tuple[str, str | None]] = [
    # (address, a word of the reason, or None for allowed)
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("169.254.169.254", "link-local"),  # AWS, GCP, Azure metadata
    ("169.254.170.2", "link-local"),  # ECS task metadata
    ("fd00:ec2::254", "private"),  # AWS metadata over IPv6
    ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local"),
    ("100.64.0.1", "shared"),
    ("100.127.255.255", "shared"),
    ("0.0.0.0", "unspecified"),  # noqa: S104 - a case, not a bind
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.10", "documentation"),
    ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254"),
    ("::ffff:10.0.0.1", "IPv4-mapped 10.0.0.1"),
    ("::127.0.0.1", "IPv4-compatible 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 169.254.169.254"),
    ("2002:7f00:1::1", "6to4 127.0.0.1"),
    ("2002:c0a8:101::1", "6to4 192.168.1.1"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    # public unicast
    ("93.184.215.14", None),
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("100.63.255.255", None),  # just below the shared range
    ("172.32.0.1", None),  # just above 172.16/12
    ("2606:4700:4700::1111", None),
    ("2a00:1450:4001:80b::200e", None),
    ("::ffff:8.8.8.8", None),  # the same host as 8.8.8.8
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
]


@pytest.mark.parametrize(("address", "reason"), ADDRESSES, ids=[a for a, _ in ADDRESSES])
def test_forbidden_reason(address: str, reason: str | None) -> None:
    got = forbidden_reason(ipaddress.ip_address(address))
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


# URLs whose host is, or resolves (through the system resolver) to, a forbidden address.
# None of them may lead to a connection.
FORBIDDEN_URLS = [
    "https://127.0.0.1:{port}/hook",
    "http://127.0.0.1:{port}/hook",
    "https://localhost:{port}/hook",
    "https://LocalHost:{port}/hook",
    "https://[::1]:{port}/hook",
    "https://[::ffff:127.0.0.1]:{port}/hook",
    "https://[::ffff:7f00:1]:{port}/hook",
    "https://2130706433:{port}/hook",  # 127.0.0.1 as one number
    "https://0x7f000001:{port}/hook",
    "https://127.1:{port}/hook",
    "https://0.0.0.0:{port}/hook",
    "https://[::]:{port}/hook",
    "https://10.0.0.1/hook",
    "https://192.168.0.1/hook",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "https://100.64.0.1/hook",
    "https://[fe80::1]/hook",
    "https://224.0.0.1/hook",
    "https://[64:ff9b::7f00:1]/hook",
    "https://[2002:a9fe:a9fe::1]/hook",
]


@dataclass
class Recorder:
    """An aiohttp app that answers 204 and records what reached it."""

    requests: list[tuple[str, str]] = field(default_factory=list)  # (Host header, path)
    sni: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((request.headers.get("Host", ""), request.path))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    def tls(self, ca: trustme.CA, *names: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)

        def record(obj: Any, name: str | None, _: Any) -> None:
            self.sni.append(name)

        ctx.sni_callback = record
        return ctx


@pytest.mark.parametrize("template", FORBIDDEN_URLS)
async def test_forbidden_urls_make_no_connection(template: str, backend: RecordingBackend) -> None:
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        client = guarded_client(
            AddressGuard(), connect_timeout_s=2, read_timeout_s=2, backend=backend
        )
        async with client:
            with pytest.raises(ForbiddenAddressError) as caught:
                await client.post(template.format(port=port), content=b"{}")
    assert backend.connects == []
    assert recorder.requests == []
    assert "allow_hosts" in str(caught.value)


@pytest.mark.parametrize("template", FORBIDDEN_URLS[:6] + FORBIDDEN_URLS[12:15])
async def test_connector_rejects_forbidden_address(
    template: str, backend: RecordingBackend
) -> None:
    """Through the connector: REJECTED with error_class ForbiddenAddress."""
    url = template.format(port=closed_port()).replace("http://", "https://")
    config = WebhookSettings(secrets=SecretStr(f'{{"default": ["{new_secret()}"]}}'))
    connector = WebhookConnector(config, network_backend=backend)
    try:
        result = await connector.send(intent(url))
    finally:
        await connector.aclose()
    assert result.outcome is Outcome.REJECTED, result
    assert result.error_class == "ForbiddenAddress"
    assert backend.connects == []


# -- the allowlist --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowCase:
    id: str
    allow: tuple[str, ...]
    host: str
    answers: tuple[str, ...] = ()  # what the injected resolver says
    allowed: bool = True


ALLOW_CASES = [
    AllowCase("network-covers-literal", ("127.0.0.0/8",), "127.0.0.5"),
    AllowCase("single-address", ("127.0.0.1",), "127.0.0.1"),
    AllowCase("single-address-not-neighbour", ("127.0.0.1",), "127.0.0.2", allowed=False),
    AllowCase("network-covers-resolved", ("10.0.0.0/8",), "svc.internal", ("10.1.2.3",)),
    AllowCase(
        "network-must-cover-every-answer",
        ("10.0.0.0/8",),
        "svc.internal",
        ("10.1.2.3", "192.168.0.1"),
        allowed=False,
    ),
    AllowCase("name-allows-its-addresses", ("svc.internal",), "svc.internal", ("10.1.2.3",)),
    AllowCase("name-is-case-insensitive", ("SVC.internal.",), "svc.INTERNAL", ("10.1.2.3",)),
    AllowCase("other-name", ("svc.internal",), "evil.internal", ("10.1.2.3",), allowed=False),
    AllowCase("ipv6-network", ("fd00::/8",), "fd00::1"),
    AllowCase("v4-network-covers-mapped", ("127.0.0.0/8",), "::ffff:127.0.0.1"),
    AllowCase("v4-network-not-v6-loopback", ("127.0.0.0/8",), "::1", allowed=False),
    AllowCase("empty-allowlist", (), "127.0.0.1", allowed=False),
    AllowCase("public-needs-no-allowlist", (), "example.test", ("93.184.215.14",)),
]


@pytest.mark.parametrize("case", ALLOW_CASES, ids=[c.id for c in ALLOW_CASES])
async def test_allowlist(case: AllowCase) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return list(case.answers)

    guard = AddressGuard(case.allow, resolver)
    if case.allowed:
        got = await guard.vet(case.host, 443)
        assert got == (list(case.answers) or [str(ipaddress.ip_address(case.host))])
    else:
        with pytest.raises(ForbiddenAddressError):
            await guard.vet(case.host, 443)


def test_allowlisted_host_for_plain_http() -> None:
    guard = AddressGuard(["127.0.0.0/8", "Hooks.Local"])
    assert guard.allowlisted("127.0.0.1")
    assert guard.allowlisted("hooks.local")
    assert guard.allowlisted("hooks.local.")
    assert not guard.allowlisted("localhost")  # resolves into the network, but is not listed
    assert not guard.allowlisted("10.0.0.1")


async def test_allowlisted_name_connects(backend: RecordingBackend) -> None:
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        client = guarded_client(
            AddressGuard(["localhost"]), connect_timeout_s=2, read_timeout_s=2, backend=backend
        )
        async with client:
            resp = await client.post(f"http://localhost:{port}/hook", content=b"{}")
    assert resp.status_code == 204
    assert backend.connects == [("127.0.0.1", port)]
    assert recorder.requests == [(f"localhost:{port}", "/hook")]


# -- the connection goes to the checked address ---------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def intent(recipient: str, **kw: Any) -> NotificationIntent:
    fields: dict[str, Any] = {
        "notification_id": notification_id("e-1", "hook", "webhook", recipient),
        "event_id": "0b9f3c5e-7a61-4d2b-9c8e-5f4a3b2c1d0e",
        "event_type": "user-registered",
        "rule": "hook",
        "channel": "webhook",
        "recipient": recipient,
        "subject": "Welcome",
        "body_text": "Hi Ada",
    }
    fields.update(kw)
    return NotificationIntent(**fields)


class ScriptedResolver:
    """Answers each lookup with the next list of addresses (the last one repeats)."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = [list(a) for a in answers]
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def webhook_config(ca_file: Path, allow: list[str]) -> WebhookSettings:
    return WebhookSettings(
        secrets=SecretStr(f'{{"default": ["{new_secret()}"]}}'),
        allow_hosts=allow,
        ca_file=ca_file,
        connect_timeout_s=2,
        read_timeout_s=2,
    )


async def test_no_dns_rebinding(ca: trustme.CA, ca_file: Path, backend: RecordingBackend) -> None:
    """The name first resolves to an allowed address, then (a rebinding attacker's second
    answer) to a forbidden one. The request goes to the first address; nothing ever
    reaches the second, which has a server of its own listening on the same port."""
    good, evil = Recorder(), Recorder()
    async with (
        serve(good.app(), "127.0.0.1", ssl_context=good.tls(ca, "hooks.test")) as port,
        serve(evil.app(), "127.0.0.2", port, ssl_context=evil.tls(ca, "hooks.test")),
    ):
        resolver = ScriptedResolver(["127.0.0.1"], ["127.0.0.2"])
        config = webhook_config(ca_file, ["127.0.0.1/32"])
        connector = WebhookConnector(config, resolver=resolver, network_backend=backend)
        try:
            first = await connector.send(intent(f"https://hooks.test:{port}/hook"))
            await connector.aclose()  # no pooled connection: the next send resolves again
            second = await connector.send(intent(f"https://hooks.test:{port}/hook"))
        finally:
            await connector.aclose()
    assert first.outcome is Outcome.SENT, first
    assert second.outcome is Outcome.REJECTED and second.error_class == "ForbiddenAddress"
    assert "127.0.0.2" in (second.response or "")
    assert resolver.calls == ["hooks.test", "hooks.test"]  # once per connection, no more
    assert backend.connects == [("127.0.0.1", port)]
    assert good.requests == [(f"hooks.test:{port}", "/hook")]
    assert good.sni == ["hooks.test"]  # TLS for the hostname, not the IP
    assert evil.requests == [] and evil.sni == []


async def test_one_forbidden_answer_refuses_all(
    ca: trustme.CA, ca_file: Path, backend: RecordingBackend
) -> None:
    """An allowed address first and a forbidden one second in the same answer: refused
    before any connection, not "connect to the first and hope"."""
    good, evil = Recorder(), Recorder()
    async with (
        serve(good.app(), "127.0.0.1", ssl_context=good.tls(ca, "hooks.test")) as port,
        serve(evil.app(), "127.0.0.2", port, ssl_context=evil.tls(ca, "hooks.test")),
    ):
        resolver = ScriptedResolver(["127.0.0.1", "127.0.0.2"])
        config = webhook_config(ca_file, ["127.0.0.1/32"])
        connector = WebhookConnector(config, resolver=resolver, network_backend=backend)
        try:
            result = await connector.send(intent(f"https://hooks.test:{port}/hook"))
        finally:
            await connector.aclose()
    assert result.outcome is Outcome.REJECTED and result.error_class == "ForbiddenAddress"
    assert resolver.calls == ["hooks.test"]
    assert backend.connects == []
    assert good.requests == evil.requests == []


async def test_next_vetted_address_when_one_refuses(
    ca: trustme.CA, ca_file: Path, backend: RecordingBackend
) -> None:
    recorder = Recorder()
    async with serve(recorder.app(), ssl_context=recorder.tls(ca, "hooks.test")) as port:
        resolver = ScriptedResolver(["127.0.0.3", "127.0.0.1"])  # nothing on 127.0.0.3
        config = webhook_config(ca_file, ["127.0.0.0/8"])
        connector = WebhookConnector(config, resolver=resolver, network_backend=backend)
        try:
            result = await connector.send(intent(f"https://hooks.test:{port}/hook"))
        finally:
            await connector.aclose()
    assert result.outcome is Outcome.SENT, result
    assert backend.connects == [("127.0.0.3", port), ("127.0.0.1", port)]
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    ("cert_names", "host"),
    [(("hooks.test",), "127.0.0.1"), (("other.test", "127.0.0.1"), "hooks.test")],
    ids=["cert-for-name-url-by-ip", "cert-for-other-name"],
)
async def test_certificate_is_verified_for_the_url_host(
    ca: trustme.CA,
    ca_file: Path,
    backend: RecordingBackend,
    cert_names: tuple[str, ...],
    host: str,
) -> None:
    """Pinning the IP does not weaken TLS: the certificate must match the URL's host."""
    recorder = Recorder()
    async with serve(recorder.app(), ssl_context=recorder.tls(ca, *cert_names)) as port:
        resolver = ScriptedResolver(["127.0.0.1"])
        config = webhook_config(ca_file, ["127.0.0.1/32"])
        connector = WebhookConnector(config, resolver=resolver, network_backend=backend)
        try:
            result = await connector.send(intent(f"https://{host}:{port}/hook"))
        finally:
            await connector.aclose()
    assert result.outcome is Outcome.RETRYABLE, result
    assert "certificate" in (result.response or "").lower()
    assert recorder.requests == []


async def test_resolution_failures_are_retryable(backend: RecordingBackend) -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.215.14"]

    async def empty(host: str, port: int) -> list[str]:
        return []

    cases = ((nxdomain, "ConnectError"), (slow, "ConnectTimeout"), (empty, "ConnectError"))
    for resolver, error_class in cases:
        config = WebhookSettings(
            secrets=SecretStr(f'{{"default": ["{new_secret()}"]}}'), connect_timeout_s=0.2
        )
        connector = WebhookConnector(config, resolver=resolver, network_backend=backend)
        try:
            result = await connector.send(intent("https://hooks.test/hook"))
        finally:
            await connector.aclose()
        assert result.outcome is Outcome.RETRYABLE, result
        assert result.error_class == error_class
    assert backend.connects == []


async def test_environment_proxies_are_ignored(
    monkeypatch: pytest.MonkeyPatch, backend: RecordingBackend
) -> None:
    """A proxy would resolve the name itself, past the guard: the client never uses one."""
    target, proxy = Recorder(), Recorder()
    async with serve(target.app()) as port, serve(proxy.app()) as proxy_port:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_port}")
        client = guarded_client(
            AddressGuard(["127.0.0.1"]), connect_timeout_s=2, read_timeout_s=2, backend=backend
        )
        async with client:
            resp = await client.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
    assert resp.status_code == 204
    assert len(target.requests) == 1 and proxy.requests == []


async def test_unix_sockets_are_refused() -> None:
    with pytest.raises(ForbiddenAddressError):
        await GuardedBackend(AddressGuard()).connect_unix_socket("/run/docker.sock")


# -- Retry-After ----------------------------------------------------------------------------------

RETRY_AFTER = [
    (None, None),
    ("", None),
    ("7", 7.0),
    ("0", 0.0),
    ("1.5", 1.5),
    ("-3", None),
    ("soon", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
]


@pytest.mark.parametrize(("header", "seconds"), RETRY_AFTER)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


def test_parse_retry_after_date_in_the_future() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    got = parse_retry_after(when)
    assert got is not None and 115 <= got <= 120
