"""The SSRF guard of the HTTP connectors whose URLs Herald does not choose itself: webhook
and Web Push endpoints come from intents (a rule, an event, a browser), Slack's and the SMS
provider's from settings.

Without a guard Herald would POST wherever it is told: to the cloud metadata service
(169.254.169.254), to an admin port on loopback, into the private network. The guard:

- resolves the host once (``asyncio`` getaddrinfo, or an injected resolver) and refuses the
  connection if ANY resolved address is not public unicast: loopback, private (RFC 1918,
  fc00::/7), link-local (169.254/16 and fe80::/10, which hold the metadata services
  169.254.169.254 and fd00:ec2::254), shared (100.64/10), multicast, unspecified, reserved,
  documentation and benchmark ranges, and IPv6 forms that carry one of those inside
  (IPv4-mapped ``::ffff:127.0.0.1``, IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16;
  Teredo lies in 2001::/23 and is refused whole). Numeric host spellings (``2130706433``,
  ``0x7f.1``, ``127.1``) are caught because the guard checks what they stand for. Names
  under ``localhost`` are loopback (RFC 6761) without asking the resolver;
- then the connection goes to exactly the addresses it checked, so a DNS answer that changes
  between the check and the connect (DNS rebinding) cannot move it elsewhere.

How, on aiohttp's public interfaces (connectors/http.py builds the session):

- :class:`GuardedResolver` is the ``TCPConnector``'s resolver (``aiohttp.abc.
  AbstractResolver``). aiohttp asks it for every host name it connects to and connects to
  the numeric addresses it returns, nothing else; its DNS cache only ever holds those. The
  URL is not rewritten, so the pool key, the Host header, TLS SNI and certificate
  verification all keep the URL's hostname; only the TCP connect goes to the vetted IP.
- aiohttp does not ask a resolver about an IP literal (anything with a ``:`` or made of
  digits and dots), so :func:`literal_middleware`, a client middleware that runs before the
  connection is made, checks such hosts.

A refusal raises :class:`ForbiddenAddressError` before any socket is opened; the connectors
turn it into a REJECTED result with error_class ``ForbiddenAddress``. The session never
follows redirects and never reads proxy settings from the environment (a proxy would resolve
the name itself, unguarded).

``allow_hosts`` lists exceptions for local use and tests: hostnames (their addresses are
accepted whatever they are, and still pinned) and IP networks such as ``127.0.0.0/8``
(addresses inside are accepted).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiohttp import ClientHandlerType, ClientRequest, ClientResponse
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = [
    "AddressGuard",
    "ForbiddenAddressError",
    "GuardedResolver",
    "Resolver",
    "forbidden_reason",
    "literal_middleware",
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
        # URL hosts check_literal passed: its answer depends only on the host and this
        # guard's allowlist, and a sink sends many requests to the same few endpoints.
        self._passed: set[str] = set()

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

    def _check(self, host: str, text: str, ip: IPAddress) -> None:
        if self._allowed_ip(ip):
            return
        reason = forbidden_reason(ip)
        if reason is not None:
            raise ForbiddenAddressError(host, text, reason)

    def check_literal(self, host: str) -> None:
        """Checks a URL host that aiohttp connects to without resolving: an IP address in any
        spelling aiohttp takes for one (a ``:``, or only digits and dots). Names pass (the
        resolver checks them). Raises ForbiddenAddressError."""
        if host in self._passed:
            return
        checked = host
        host = host.strip("[]")
        ip = _parse_ip(host)
        if ip is None:
            if ":" not in host and not host.replace(".", "").isdigit():
                return  # a name: GuardedResolver sees it
            ip = _legacy_ipv4(host)
            if ip is None:  # nothing a socket could connect to; refuse rather than guess
                raise ForbiddenAddressError(host, host, "not an IP address Herald can check")
        self._check(host, str(ip), ip)
        if len(self._passed) < 1024:
            self._passed.add(checked)

    async def vet(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``: every one it resolves to, each checked.
        Raises ForbiddenAddressError if any of them is forbidden, OSError if the name does
        not resolve (aiohttp reports it as a ClientConnectorDNSError)."""
        literal = _parse_ip(host.strip("[]")) or _legacy_ipv4(host)
        name = _normal_host(host)
        if literal is not None:
            resolved: list[tuple[str, IPAddress]] = [(str(literal), literal)]
        elif (name == "localhost" or name.endswith(".localhost")) and name not in self._names:
            raise ForbiddenAddressError(host, name, "loopback (a localhost name, RFC 6761)")
        else:
            try:
                answers = await self._resolve(host, port)
            except OSError as e:
                raise OSError(f"cannot resolve {host}: {e}") from e
            resolved = []
            for answer in answers:
                ip = _parse_ip(answer)
                if ip is None:
                    raise OSError(f"{host} resolved to a non-address {answer!r}")
                resolved.append((answer, ip))
            if not resolved:
                raise OSError(f"{host} resolved to no address")
        if literal is None and name in self._names:
            return [text for text, _ in resolved]
        for text, ip in resolved:
            self._check(host, text, ip)
        return [text for text, _ in resolved]


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a legacy spelling stands for (``2130706433``, ``127.1``,
    ``0x7f.1``, octal ``0177.0.0.1``), as inet_aton and getaddrinfo read it; None if it is
    not one."""
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver for a guarded session: the host's vetted addresses, as numeric
    results, so aiohttp connects to them and to nothing else."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for address in await self.guard.vet(host, port):
            v6 = ":" in address
            af = socket.AF_INET6 if v6 else socket.AF_INET
            if family not in (socket.AF_UNSPEC, af):
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=port,
                    family=af,
                    proto=socket.IPPROTO_TCP,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        if not results:
            raise OSError(f"{host} has no vetted address of family {family!r}")
        return results

    async def close(self) -> None:
        pass


def literal_middleware(
    guard: AddressGuard,
) -> Callable[[ClientRequest, ClientHandlerType], Awaitable[ClientResponse]]:
    """A client middleware that checks a request's IP-literal host before aiohttp connects
    (aiohttp does not pass literals to the resolver)."""

    async def check(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        guard.check_literal(request.url.raw_host or "")
        return await handler(request)

    return check
