"""The SSRF guard (connectors/ssrf.py) and the HTTP stack it sits in (connectors/http.py):
which addresses it refuses, the allowlist, and that a connection goes to the address that was
checked (no DNS rebinding), with TLS still verified for the URL's hostname, through every
connector whose URLs Herald does not choose itself: webhook, Slack, Web Push (and SMS's base
URL). Servers are real aiohttp servers on loopback.

Every connection in these tests is made by :class:`RecordingSockets`, aiohttp's public
socket factory hook, which records it and refuses anything but loopback, so even a broken
guard cannot send traffic off this machine. A test that needs a name to resolve to a given
address injects a resolver: the guard checks whatever the resolver answers.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from connectors.base import Connector, DeliveryResult, Outcome
from connectors.http import Answer, HttpClient, parse_retry_after
from connectors.slack import SlackConnector, SlackSettings
from connectors.sms import SmsConnector, SmsSettings
from connectors.ssrf import AddressGuard, ForbiddenAddressError, Resolver, forbidden_reason
from connectors.webhook import WebhookConnector, WebhookSettings, new_secret
from connectors.webpush import WebPushConnector, WebPushSettings, generate_vapid_key
from pipeline.records import NotificationIntent, notification_id
from tests.connectors.pushservice import b64url, public_point

# -- shared helpers (test_webhook and test_slack import these) ------------------------------------


def _loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class RecordingSockets:
    """A socket factory for aiohttp's ``TCPConnector(socket_factory=...)``: records the
    address of every connection, refuses anything but loopback (the guard hands aiohttp
    vetted IPs only, so a hostname here fails the test too)."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    def __call__(self, addr_info: aiohttp.AddrInfoType) -> socket.socket:
        family, kind, proto, _, address = addr_info
        host, port = str(address[0]), int(address[1])
        self.connects.append((host, port))
        if not _loopback(host):
            raise OSError(errno.ENETUNREACH, f"test safety net: not connecting to {host}")
        return socket.socket(family, kind, proto)


@pytest.fixture
def sockets() -> RecordingSockets:
    return RecordingSockets()


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


class ScriptedResolver:
    """Answers each lookup with the next list of addresses (the last one repeats)."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = [list(a) for a in answers]
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


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


# URLs whose host is, or stands for, a forbidden address.
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
    "https://0177.0.0.1:{port}/hook",  # octal
    "https://0x7f.1:{port}/hook",
    "https://localhost.:{port}/hook",
    "https://api.localhost:{port}/hook",  # RFC 6761: loopback without asking DNS
    "https://169.254.169.254/latest/meta-data/",
    "https://[::ffff:a9fe:a9fe]/latest/meta-data/",
]


@dataclass
class Recorder:
    """An aiohttp app that answers ``status`` (204) and records what reached it."""

    status: int = 204
    location: str | None = None  # the Location header of the answer
    requests: list[tuple[str, str]] = field(default_factory=list)  # (Host header, path)
    sni: list[str | None] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((request.headers.get("Host", ""), request.path))
            headers = {"Location": self.location} if self.location else None
            return web.Response(status=self.status, headers=headers)

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


# -- the guarded connectors -----------------------------------------------------------------------

GUARDED = ["webhook", "slack", "webpush"]
# The secret last part of a Slack webhook URL: never in a result.
SLACK_PATH_PART = "S3cr3tWebh00kT0ken"
# A browser subscription's keys (never used to decrypt: nothing here is delivered).
KEYS = {
    "p256dh": b64url(public_point(ec.generate_private_key(ec.SECP256R1()))),
    "auth": b64url(os.urandom(16)),
}
VAPID_KEY, _ = generate_vapid_key()


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


def guarded(
    channel: str,
    url: str,
    *,
    allow: Sequence[str] = (),
    resolver: Resolver | None = None,
    sockets: RecordingSockets | None = None,
    ca_file: Path | None = None,
    connect_timeout_s: float = 2.0,
) -> tuple[Connector, NotificationIntent]:
    """The ``channel``'s connector and an intent that makes it POST to ``url`` (for Slack: a
    webhook under ``url``'s origin, which is its base URL)."""
    common: dict[str, Any] = {
        "allow_hosts": list(allow),
        "connect_timeout_s": connect_timeout_s,
        "read_timeout_s": 2.0,
        "ca_file": ca_file,
    }
    hooks = {"resolver": resolver, "socket_factory": sockets}
    connector: Connector
    if channel == "webhook":
        secrets = SecretStr(json.dumps({"default": [new_secret()]}))
        connector = WebhookConnector(WebhookSettings(secrets=secrets, **common), **hooks)
        return connector, intent(url)
    if channel == "slack":
        origin = url.split("/", 3)[:3]
        base = "/".join(origin) + "/services/"
        connector = SlackConnector(SlackSettings(base_url=base, **common), **hooks)
        return connector, intent(f"{base}T0HERALD/B0HERALD/{SLACK_PATH_PART}")
    assert channel == "webpush"
    settings = WebPushSettings(
        vapid_private_key=VAPID_KEY, vapid_subject="mailto:ops@herald.localhost", **common
    )
    connector = WebPushConnector(settings, **hooks)
    return connector, intent(json.dumps({"endpoint": url, "keys": KEYS}))


async def send(connector: Connector, sent: NotificationIntent) -> DeliveryResult:
    try:
        return await connector.send(sent)
    finally:
        await connector.aclose()


def assert_forbidden(result: DeliveryResult, address: str | None = None) -> None:
    assert result.outcome is Outcome.REJECTED, result
    assert result.error_class == "ForbiddenAddress", result
    assert "allow_hosts" in (result.response or "")
    assert SLACK_PATH_PART not in repr(result)
    if address is not None:
        assert address in (result.response or "")


@pytest.mark.parametrize("template", FORBIDDEN_URLS)
async def test_forbidden_urls_make_no_connection(template: str, sockets: RecordingSockets) -> None:
    """Through the HTTP stack itself, plain http included: REJECTED before any socket."""
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        client = HttpClient(
            guard=AddressGuard(), connect_timeout_s=2, read_timeout_s=2, socket_factory=sockets
        )
        try:
            result = await client.request("POST", template.format(port=port), body=b"{}")
        finally:
            await client.aclose()
    assert isinstance(result, DeliveryResult)
    assert_forbidden(result)
    assert sockets.connects == []
    assert recorder.requests == []


@pytest.mark.parametrize("channel", GUARDED)
@pytest.mark.parametrize("template", FORBIDDEN_URLS)
async def test_connectors_reject_forbidden_urls(
    channel: str, template: str, sockets: RecordingSockets
) -> None:
    """Every guarded connector: REJECTED with error_class ForbiddenAddress, no connection."""
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        url = template.format(port=port).replace("http://", "https://")
        connector, sent = guarded(channel, url, sockets=sockets)
        result = await send(connector, sent)
    assert_forbidden(result)
    assert sockets.connects == []
    assert recorder.requests == []


# What a name may resolve to that must not be connected to: the resolver is the attacker's.
PRIVATE_ANSWERS = [
    ["127.0.0.1"],
    ["10.0.0.7"],
    ["192.168.1.20"],
    ["169.254.169.254"],
    ["fd00:ec2::254"],
    ["::ffff:169.254.169.254"],
    ["::ffff:10.0.0.7"],
    ["::1"],
    ["0.0.0.0"],  # noqa: S104 - an answer, not a bind
    ["93.184.215.14", "10.0.0.7"],  # one forbidden answer among public ones refuses all
]


@pytest.mark.parametrize("channel", GUARDED)
@pytest.mark.parametrize("answers", PRIVATE_ANSWERS, ids=[",".join(a) for a in PRIVATE_ANSWERS])
async def test_names_resolving_to_forbidden_addresses(
    channel: str, answers: list[str], sockets: RecordingSockets
) -> None:
    resolver = ScriptedResolver(answers)
    connector, sent = guarded(
        channel, "https://push.example.test/hook", resolver=resolver, sockets=sockets
    )
    result = await send(connector, sent)
    assert_forbidden(result, answers[-1])
    assert resolver.calls == ["push.example.test"]
    assert sockets.connects == []


async def test_ip_literals_never_reach_the_resolver(sockets: RecordingSockets) -> None:
    """aiohttp connects to an IP-literal host without asking the resolver: the guard's
    middleware is what refuses it, and what lets an allowlisted one through."""
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        for allow, expected in (((), "ForbiddenAddress"), (("127.0.0.1",), None)):
            resolver = ScriptedResolver(["93.184.215.14"])
            client = HttpClient(
                guard=AddressGuard(allow, resolver),
                connect_timeout_s=2,
                read_timeout_s=2,
                socket_factory=sockets,
            )
            try:
                result = await client.request("POST", f"http://127.0.0.1:{port}/hook", body=b"")
            finally:
                await client.aclose()
            assert resolver.calls == []
            if expected is None:
                assert isinstance(result, Answer) and result.status == 204
            else:
                assert isinstance(result, DeliveryResult) and result.error_class == expected
    assert sockets.connects == [("127.0.0.1", port)]
    assert len(recorder.requests) == 1


async def test_sms_base_url_is_guarded() -> None:
    """HERALD_SMS_BASE_URL may name any provider: a private one must be allowlisted."""
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        config = SmsSettings(
            base_url=f"http://127.0.0.1:{port}",
            account_sid="AC0123456789abcdef0123456789abcdef",
            auth_token=SecretStr("t0ken"),
            from_number="+15005550006",
        )
        connector = SmsConnector(config)
        result = await send(connector, intent("+14155550100"))
    assert_forbidden(result, "127.0.0.1")
    assert recorder.requests == []


# -- the allowlist --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowCase:
    id: str
    allow: tuple[str, ...]
    host: str
    answers: tuple[str, ...] = ()  # what the injected resolver says
    allowed: bool = True
    addresses: tuple[str, ...] = ()  # what vet() returns, if not the answers or the host


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
    AllowCase("localhost-name", (), "localhost", ("93.184.215.14",), allowed=False),
    AllowCase("localhost-subdomain", (), "a.b.localhost", ("93.184.215.14",), allowed=False),
    AllowCase("localhost-listed", ("localhost",), "localhost", ("127.0.0.1",)),
    AllowCase("legacy-spelling", (), "0x7f.1", allowed=False),
    AllowCase("legacy-spelling-in-network", ("127.0.0.0/8",), "127.1", addresses=("127.0.0.1",)),
]


@pytest.mark.parametrize("case", ALLOW_CASES, ids=[c.id for c in ALLOW_CASES])
async def test_allowlist(case: AllowCase) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return list(case.answers)

    guard = AddressGuard(case.allow, resolver)
    if case.allowed:
        got = await guard.vet(case.host, 443)
        want = case.addresses or case.answers or (str(ipaddress.ip_address(case.host)),)
        assert got == list(want)
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


async def test_allowlisted_name_connects(sockets: RecordingSockets) -> None:
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        client = HttpClient(
            guard=AddressGuard(["localhost"]),
            connect_timeout_s=2,
            read_timeout_s=2,
            socket_factory=sockets,
        )
        try:
            answer = await client.request("POST", f"http://localhost:{port}/hook", body=b"{}")
        finally:
            await client.aclose()
    assert isinstance(answer, Answer) and answer.status == 204
    assert sockets.connects == [("127.0.0.1", port)]
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


@pytest.mark.parametrize("channel", GUARDED)
async def test_no_dns_rebinding(
    channel: str, ca: trustme.CA, ca_file: Path, sockets: RecordingSockets
) -> None:
    """The name first resolves to an allowed address, then (a rebinding attacker's second
    answer) to a forbidden one. The request goes to the first address; nothing ever
    reaches the second, which has a server of its own listening on the same port."""
    good, evil = Recorder(), Recorder()
    async with (
        serve(good.app(), "127.0.0.1", ssl_context=good.tls(ca, "hooks.test")) as port,
        serve(evil.app(), "127.0.0.2", port, ssl_context=evil.tls(ca, "hooks.test")),
    ):
        resolver = ScriptedResolver(["127.0.0.1"], ["127.0.0.2"])
        connector, sent = guarded(
            channel,
            f"https://hooks.test:{port}/hook",
            allow=["127.0.0.1/32"],
            resolver=resolver,
            sockets=sockets,
            ca_file=ca_file,
        )
        try:
            first = await connector.send(sent)
            await connector.aclose()  # no pooled connection or cached answer: resolve again
            second = await connector.send(sent)
        finally:
            await connector.aclose()
    assert first.outcome is Outcome.SENT, first
    assert_forbidden(second, "127.0.0.2")
    assert resolver.calls == ["hooks.test", "hooks.test"]  # once per connection, no more
    assert sockets.connects == [("127.0.0.1", port)]
    assert [host for host, _ in good.requests] == [f"hooks.test:{port}"]
    assert good.sni == ["hooks.test"]  # TLS for the hostname, not the IP
    assert evil.requests == [] and evil.sni == []


@pytest.mark.parametrize("channel", GUARDED)
async def test_public_answer_then_private_answer(channel: str, sockets: RecordingSockets) -> None:
    """One answer is checked and connected to. A name that answers with a public address,
    then (TTL 0) with a private one: the connection goes to the public address (which this
    test's safety net refuses), never to the private one, where a server listens; a guard
    that checked one answer and connected with another would reach it. The next lookup's
    private answer is refused."""
    recorder = Recorder()
    async with serve(recorder.app()) as port:
        resolver = ScriptedResolver(["93.184.215.14"], ["127.0.0.1"])
        connector, sent = guarded(
            channel, f"https://rebind.example.test:{port}/hook", resolver=resolver, sockets=sockets
        )
        try:
            first = await connector.send(sent)
            await connector.aclose()
            second = await connector.send(sent)
        finally:
            await connector.aclose()
    assert (first.outcome, first.error_class) == (Outcome.RETRYABLE, "ConnectError"), first
    assert_forbidden(second, "127.0.0.1")
    assert resolver.calls == ["rebind.example.test", "rebind.example.test"]
    assert sockets.connects == [("93.184.215.14", port)]
    assert recorder.requests == []


REDIRECT_CLASS = {"webhook": "Redirect", "slack": "Redirect", "webpush": "HTTP302"}


@pytest.mark.parametrize("channel", GUARDED)
async def test_redirects_are_not_followed(channel: str, sockets: RecordingSockets) -> None:
    recorder = Recorder(status=302)
    async with serve(recorder.app()) as port:
        recorder.location = f"http://127.0.0.1:{port}/elsewhere"
        connector, sent = guarded(
            channel, f"http://127.0.0.1:{port}/hook", allow=["127.0.0.1"], sockets=sockets
        )
        result = await send(connector, sent)
    assert (result.outcome, result.error_class) == (Outcome.REJECTED, REDIRECT_CLASS[channel])
    assert len(recorder.requests) == 1
    assert "/elsewhere" not in recorder.requests[0][1]
    assert len(sockets.connects) == 1


async def test_next_vetted_address_when_one_refuses(
    ca: trustme.CA, ca_file: Path, sockets: RecordingSockets
) -> None:
    recorder = Recorder()
    async with serve(recorder.app(), ssl_context=recorder.tls(ca, "hooks.test")) as port:
        resolver = ScriptedResolver(["127.0.0.3", "127.0.0.1"])  # nothing on 127.0.0.3
        connector, sent = guarded(
            "webhook",
            f"https://hooks.test:{port}/hook",
            allow=["127.0.0.0/8"],
            resolver=resolver,
            sockets=sockets,
            ca_file=ca_file,
        )
        result = await send(connector, sent)
    assert result.outcome is Outcome.SENT, result
    assert sockets.connects == [("127.0.0.3", port), ("127.0.0.1", port)]
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    ("cert_names", "host"),
    [(("hooks.test",), "127.0.0.1"), (("other.test", "127.0.0.1"), "hooks.test")],
    ids=["cert-for-name-url-by-ip", "cert-for-other-name"],
)
async def test_certificate_is_verified_for_the_url_host(
    ca: trustme.CA,
    ca_file: Path,
    sockets: RecordingSockets,
    cert_names: tuple[str, ...],
    host: str,
) -> None:
    """Pinning the IP does not weaken TLS: the certificate must match the URL's host."""
    recorder = Recorder()
    async with serve(recorder.app(), ssl_context=recorder.tls(ca, *cert_names)) as port:
        connector, sent = guarded(
            "webhook",
            f"https://{host}:{port}/hook",
            allow=["127.0.0.1/32"],
            resolver=ScriptedResolver(["127.0.0.1"]),
            sockets=sockets,
            ca_file=ca_file,
        )
        result = await send(connector, sent)
    assert result.outcome is Outcome.RETRYABLE, result
    assert result.error_class == "ConnectError"
    assert "certificate" in (result.response or "").lower()
    assert recorder.requests == []


async def test_resolution_failures_are_retryable(sockets: RecordingSockets) -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.215.14"]

    async def empty(host: str, port: int) -> list[str]:
        return []

    cases = ((nxdomain, "ConnectError"), (slow, "ConnectTimeout"), (empty, "ConnectError"))
    for resolver, error_class in cases:
        connector, sent = guarded(
            "webhook",
            "https://hooks.test/hook",
            resolver=resolver,
            sockets=sockets,
            connect_timeout_s=0.2,
        )
        result = await send(connector, sent)
        assert result.outcome is Outcome.RETRYABLE, result
        assert result.error_class == error_class
    assert sockets.connects == []


async def test_environment_proxies_are_ignored(
    monkeypatch: pytest.MonkeyPatch, sockets: RecordingSockets
) -> None:
    """A proxy would resolve the name itself, past the guard: the client never uses one."""
    target, proxy = Recorder(), Recorder()
    async with serve(target.app()) as port, serve(proxy.app()) as proxy_port:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_port}")
        client = HttpClient(
            guard=AddressGuard(["127.0.0.1"]),
            connect_timeout_s=2,
            read_timeout_s=2,
            socket_factory=sockets,
        )
        try:
            answer = await client.request("POST", f"http://127.0.0.1:{port}/hook", body=b"{}")
        finally:
            await client.aclose()
    assert isinstance(answer, Answer) and answer.status == 204
    assert len(target.requests) == 1 and proxy.requests == []


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
