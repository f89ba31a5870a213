"""An SSRF guard for connectors that POST to URLs taken from intents (webhook, slack).

A recipient URL is chosen by whoever wrote the rule or the event, so without a guard Herald
would POST wherever it is told: to the cloud metadata service (169.254.169.254), to an admin
port on loopback, into the private network. The guard:

- resolves the host once (``asyncio`` getaddrinfo, or an injected resolver) and refuses the
  connection if ANY resolved address is not public unicast: loopback, private (RFC 1918,
  fc00::/7), link-local (169.254/16 and fe80::/10, which hold the metadata services
  169.254.169.254 and fd00:ec2::254), shared (100.64/10), multicast, unspecified, reserved,
  documentation and benchmark ranges, and IPv6 forms that carry one of those inside
  (IPv4-mapped ``::ffff:127.0.0.1``, IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16;
  Teredo lies in 2001::/23 and is refused whole). Numeric host spellings (``2130706433``,
  ``0x7f.1``, ``127.1``) are caught because the guard checks what getaddrinfo made of them;
- then connects to exactly the addresses it checked, so a DNS answer that changes between
  the check and the connect (DNS rebinding) cannot move the connection elsewhere.

How: the check sits in the network backend under httpcore's connection pool
(:class:`GuardedBackend`), not in front of the client. The URL is not rewritten, so the
pool, the Host header, TLS SNI and certificate verification all keep using the URL's
hostname; only the TCP connect goes to the vetted IP. (Rewriting the URL to the IP instead
would key pooled connections by IP: a TLS connection verified for a.example could then be
reused for b.example on the same address, without b.example's certificate ever being
checked.) A refusal raises :class:`ForbiddenAddressError` before any socket is opened; the
connectors turn it into a REJECTED result with error_class ``ForbiddenAddress``.

Callers must not follow redirects (a redirect target would be fetched by a new connection
that is guarded too, but the connectors reject 3xx anyway), and the client never reads proxy
settings from the environment: a proxy would resolve the name itself, unguarded.

``allow_hosts`` lists exceptions for local use and tests: hostnames (their addresses are
accepted whatever they are, and still pinned) and IP networks such as ``127.0.0.0/8``
(addresses inside are accepted).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import httpcore
import httpx

from connectors.base import DeliveryResult
from connectors.http import parse_retry_after

__all__ = [
    "AddressGuard",
    "Answer",
    "ForbiddenAddressError",
    "GuardedBackend",
    "GuardedTransport",
    "LazyGuardedClient",
    "Resolver",
    "forbidden_reason",
    "guarded_client",
    "parse_retry_after",
    "post",
    "split_hosts",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: (host, port) -> the addresses the host resolves to, as strings, in preference order.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class ForbiddenAddressError(Exception):
    """The host resolves to an address Herald must not connect to. No connection was made."""

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(
            f"refused to connect to {host}: {address} is {reason} "
            "(add the host or network to allow_hosts to permit it)"
        )
        self.host = host
        self.address = address
        self.reason = reason


def _networks(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), reason) for net, reason in pairs)


# Checked in order; the first match names the reason. Anything not listed that Python still
# does not call global (``is_global``) is refused as well.
_V4_FORBIDDEN = _networks(
    ("0.0.0.0/8", "unspecified ('this network')"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata lives here)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
    ("192.0.2.0/24", "reserved (documentation)"),
    ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "reserved (benchmarking)"),
    ("198.51.100.0/24", "reserved (documentation)"),
    ("203.0.113.0/24", "reserved (documentation)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (incl. broadcast)"),
)
_V6_FORBIDDEN = _networks(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "reserved (local-use NAT64)"),
    ("100::/64", "reserved (discard-only)"),
    ("2001::/23", "reserved (IETF protocol assignments, incl. Teredo)"),
    ("2001:db8::/32", "reserved (documentation)"),
    ("3fff::/20", "reserved (documentation)"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address stands for, where it stands for one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return low32, "NAT64"
    if ip in _IPV4_TRANSLATED:
        return low32, "IPv4-translated"
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves
        return low32, "IPv4-compatible"
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why Herald must not connect to ``ip`` (e.g. "loopback"), or None for a public
    unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])  # drop a zone id
        embedded = _embedded_v4(ip)
        if embedded is not None:
            v4, how = embedded
            inner = forbidden_reason(v4)
            if inner is not None:
                return f"{how} {v4}, {inner}"
            if how == "IPv4-mapped":  # a socket to it is a socket to the IPv4 address
                return None
        table = _V6_FORBIDDEN
    else:
        table = _V4_FORBIDDEN
    for net, reason in table:
        if ip in net:
            return reason
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:
        return "not globally routable"
    return None


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (asyncio's getaddrinfo)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def split_hosts(value: Any) -> Any:
    """An ``allow_hosts`` setting from the environment: a JSON list or comma-separated.
    (A pydantic "before" validator; other values pass through.)"""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class AddressGuard:
    """Decides which addresses a host may be reached at. ``allow_hosts``: hostnames and IP
    networks that are allowed even when private. ``resolver``: how names become addresses
    (the system resolver unless a test injects one)."""

    def __init__(self, allow_hosts: Iterable[str] = (), resolver: Resolver | None = None) -> None:
        self._names: set[str] = set()
        self._networks: list[IPNetwork] = []
        for entry in allow_hosts:
            entry = entry.strip()
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self._names.add(_normal_host(entry))
        self._resolve = resolver or system_resolver

    def allowlisted(self, host: str) -> bool:
        """Whether ``host`` itself is allowlisted: listed by name, or an IP literal inside an
        allowed network. (Plain-HTTP endpoints are accepted only for such hosts.)"""
        ip = _parse_ip(host)
        if ip is None:
            return _normal_host(host) in self._names
        return self._allowed_ip(ip)

    def _allowed_ip(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(
            c in net for c in candidates for net in self._networks if c.version == net.version
        )

    async def vet(self, host: str, port: int, timeout: float | None = None) -> list[str]:
        """The addresses to connect to for ``host``: every one it resolves to, each checked.
        Raises ForbiddenAddressError if any of them is forbidden, httpcore.ConnectError or
        ConnectTimeout if the name does not resolve (in time)."""
        literal = _parse_ip(host)
        if literal is not None:
            resolved: list[tuple[str, IPAddress]] = [(str(literal), literal)]
        else:
            try:
                async with asyncio.timeout(timeout):
                    answers = await self._resolve(host, port)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
            except OSError as e:
                raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from e
            resolved = []
            for answer in answers:
                ip = _parse_ip(answer)
                if ip is None:
                    raise httpcore.ConnectError(f"{host} resolved to a non-address {answer!r}")
                resolved.append((answer, ip))
            if not resolved:
                raise httpcore.ConnectError(f"{host} resolved to no address")
        if literal is None and _normal_host(host) in self._names:
            return [text for text, _ in resolved]
        for text, ip in resolved:
            if self._allowed_ip(ip):
                continue
            reason = forbidden_reason(ip)
            if reason is not None:
                raise ForbiddenAddressError(host, text, reason)
        return [text for text, _ in resolved]


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend that vets the host and connects only to vetted addresses,
    trying them in order. ``backend`` makes the actual connections (anyio's by default)."""

    def __init__(
        self, guard: AddressGuard, backend: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self.guard = guard
        self._backend = backend or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.guard.vet(host, port, timeout)
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as e:  # refused: try the next vetted address
                failure = e
        assert failure is not None  # noqa: S101 - vet() returns at least one address
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ForbiddenAddressError(path, path, "a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool built on :class:`GuardedBackend`."""

    def __init__(
        self,
        guard: AddressGuard,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: httpx.Limits = httpx.Limits(),  # noqa: B008 - immutable
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        ctx = ssl_context or httpx.create_ssl_context()
        super().__init__(verify=ctx, trust_env=False, limits=limits)
        # httpx offers no network_backend argument, so the pool is replaced: same settings
        # as httpx's own, plus the guarded backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ctx,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(guard, backend),
        )


class _HttpConfig(Protocol):
    connect_timeout_s: float
    read_timeout_s: float
    ca_file: Path | None
    max_connections: int
    user_agent: str


class LazyGuardedClient:
    """One guarded client per connector, made on first use (inside the running loop) and
    closed with the connector."""

    def __init__(
        self,
        guard: AddressGuard,
        config: _HttpConfig,
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._guard, self._config, self._backend = guard, config, backend
        self._client: httpx.AsyncClient | None = None

    def get(self) -> httpx.AsyncClient:
        if self._client is None:
            c = self._config
            self._client = guarded_client(
                self._guard,
                connect_timeout_s=c.connect_timeout_s,
                read_timeout_s=c.read_timeout_s,
                ca_file=c.ca_file,
                max_connections=c.max_connections,
                headers={"user-agent": c.user_agent},
                backend=self._backend,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def guarded_client(
    guard: AddressGuard,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    ca_file: Path | None = None,
    max_connections: int = 100,
    headers: dict[str, str] | None = None,
    backend: httpcore.AsyncNetworkBackend | None = None,
) -> httpx.AsyncClient:
    """An httpx client whose every connection passes ``guard``. Redirects are not followed
    and the environment's proxy and netrc settings are ignored. ``ca_file``: trust only this
    CA (a private endpoint, tests) instead of the usual bundle."""
    ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    transport = GuardedTransport(guard, ssl_context=ctx, limits=limits, backend=backend)
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=connect_timeout_s + read_timeout_s,
        ),
        follow_redirects=False,
        trust_env=False,
        headers=headers,
    )


# -- posting through the guard --------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, headers and the first bytes of the body as text. ``cut``
    names what broke the body off (a dropped connection, the deadline), if anything did."""

    status: int
    reason: str
    headers: httpx.Headers
    text: str
    cut: str | None = None

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))

    def summary(self, limit: int = 300) -> str:
        """The answer on one line, "<status> <reason>: <body>", cut to ``limit`` characters."""
        head = f"{self.status} {self.reason}".strip()
        if self.cut:
            head += f" (answer cut short: {self.cut})"
        body = " ".join(self.text.split())
        text = f"{head}: {body}" if body else head
        return text if len(text) <= limit else text[: limit - 3] + "..."


async def post(
    client: httpx.AsyncClient,
    url: httpx.URL,
    content: bytes,
    headers: dict[str, str],
    *,
    deadline_s: float,
    max_answer_bytes: int = 4096,
) -> Answer | DeliveryResult:
    """POST ``content`` and read at most ``max_answer_bytes`` of the answer (a receiver
    cannot make Herald buffer a large body), all within ``deadline_s`` (a receiver that
    trickles bytes cannot hold a send forever).

    Returns the Answer once a status line arrived, even if the body then broke off: the
    status is the receiver's decision. Otherwise the DeliveryResult: REJECTED
    "ForbiddenAddress" when the guard refused the address (no connection was made),
    RETRYABLE for timeouts and network failures (the receiver may or may not have it)."""
    resp: httpx.Response | None = None
    chunks: list[bytes] = []
    cut: str | None = None
    try:
        async with asyncio.timeout(deadline_s):
            async with client.stream("POST", url, content=content, headers=headers) as resp:
                size = 0
                # raw: undecoded, so a compressed answer cannot expand past the limit
                raw = cast(AsyncGenerator[bytes, None], resp.aiter_raw())
                try:
                    async with aclosing(raw) as stream:
                        async for chunk in stream:
                            chunks.append(chunk)
                            size += len(chunk)
                            if size >= max_answer_bytes:
                                break
                except httpx.TransportError as e:
                    cut = type(e).__name__
    except ForbiddenAddressError as e:
        return DeliveryResult.rejected("ForbiddenAddress", str(e))
    except TimeoutError:
        if resp is None:
            return DeliveryResult.retryable("Timeout", f"no answer within {deadline_s:g}s")
        cut = f"not complete within {deadline_s:g}s"
    except httpx.TransportError as e:  # timeouts, refused and dropped connections, TLS
        if resp is None:
            return DeliveryResult.retryable(type(e).__name__, str(e) or type(e).__name__)
        cut = type(e).__name__
    assert resp is not None  # noqa: S101 - every other path returned
    text = b"".join(chunks)[:max_answer_bytes].decode("utf-8", "replace")
    return Answer(resp.status_code, resp.reason_phrase, resp.headers, text, cut)
