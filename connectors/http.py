"""The HTTP stack of the HTTP/1.1 connectors (webhook, slack, webpush, sms, fcm): one aiohttp
session per connector, behind the SSRF guard (connectors/ssrf.py) when its URLs are not
fixed provider hosts. APNs needs HTTP/2, which aiohttp's client does not speak: it keeps
httpx (connectors/apns.py).

:class:`HttpClient` is made with the connector and opens its session on first use, inside
the running loop:

- ``TCPConnector(limit=max_connections, resolver=GuardedResolver(guard))`` plus the guard's
  IP-literal middleware when a guard is given, so every connection goes to a vetted address;
  ``ca_file`` makes it trust that CA only;
- redirects are never followed (``allow_redirects=False``: a 3xx is the connector's to
  judge), proxies and netrc in the environment are ignored (``trust_env=False``), cookies
  are neither kept nor sent, answers are not decompressed (a small compressed body cannot
  expand past the read limit);
- at most ``max_connections`` requests are in flight; the others wait their turn in the
  client, before their deadline starts, so a deep queue of sends does not time out while
  it waits (and aiohttp's pool never has a queue to scan);
- every request carries the W3C ``traceparent`` of the sink's send in progress
  (``connectors.base.TRACEPARENT``), so a provider that traces continues Herald's trace.

:meth:`HttpClient.request` returns an :class:`Answer` once a status line arrived, or the
:class:`DeliveryResult` of a request that got none. Failures are named as Herald's results
have always named them, whatever the HTTP library: ``ConnectError`` (refused, unreachable,
name not resolved, TLS or certificate failure), ``ConnectTimeout``, ``ReadTimeout``,
``RemoteProtocolError`` (dropped connection, garbled answer), ``ReadError`` (another socket
error), ``Timeout`` (the whole-exchange deadline). A text never repeats the URL's path or
query, which may hold a credential (Slack's webhook token): only its origin.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from yarl import URL

from connectors.base import DeliveryResult, trace_headers
from connectors.ssrf import AddressGuard, ForbiddenAddressError, GuardedResolver, literal_middleware

__all__ = ["Answer", "HttpClient", "error_class", "parse_retry_after"]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110
    10.2.3). None when absent or unreadable; a date in the past gives 0."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, headers (case-insensitive) and the first bytes of the body as
    text. ``cut`` names what broke the body off (a dropped connection, the deadline), if
    anything did."""

    status: int
    reason: str
    headers: Mapping[str, str]
    text: str
    cut: str | None = None

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON (or was cut)."""
        try:
            return json.loads(self.text)
        except ValueError:
            return None

    def summary(self, limit: int = 300) -> str:
        """The answer on one line, "<status> <reason>: <body>", cut to ``limit`` characters."""
        head = f"{self.status} {self.reason}".strip()
        if self.cut:
            head += f" (answer cut short: {self.cut})"
        body = " ".join(self.text.split())
        text = f"{head}: {body}" if body else head
        return text if len(text) <= limit else text[: limit - 3] + "..."


# The server hung up without an answer, garbled it, or broke its body off.
_PROTOCOL_ERRORS = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,
)


def error_class(exc: BaseException) -> str:
    """Herald's name for a transport failure (see the module docstring)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "ReadTimeout"
    if isinstance(exc, aiohttp.ClientConnectorError):  # DNS, refused, TLS, certificate
        return "ConnectError"
    if isinstance(exc, _PROTOCOL_ERRORS):
        return "RemoteProtocolError"
    if isinstance(exc, OSError):
        return "ReadError"
    return type(exc).__name__


def _describe(exc: BaseException, url: URL) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        text = exc.message  # its str() carries the URL
    elif isinstance(exc, aiohttp.ClientConnectorError):
        text = f"cannot connect to {exc.host}:{exc.port}: {exc.os_error}"
    else:
        text = str(exc)
    text = (text or type(exc).__name__).replace(str(url), str(url.origin()))
    path = url.raw_path_qs
    return text.replace(path, "/...") if len(path) > 1 else text


class HttpClient:
    """One connector's HTTP client (see the module docstring). ``guard``: the SSRF guard, or
    None for a connector that only talks to its provider's fixed hosts. ``total_timeout_s``:
    the whole exchange, however slowly the answer trickles (None: only the connect and read
    timeouts apply). ``socket_factory`` makes the sockets (tests record where they go)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        total_timeout_s: float | None = None,
        max_connections: int = 100,
        guard: AddressGuard | None = None,
        ca_file: Path | None = None,
        headers: Mapping[str, str] | None = None,
        socket_factory: aiohttp.SocketFactoryType | None = None,
    ) -> None:
        self.guard = guard
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._deadline_s = total_timeout_s
        self._max_connections = max(1, max_connections)
        self._slots = asyncio.Semaphore(self._max_connections)
        self._ca_file = ca_file
        # Identity: answers are read as they come (see auto_decompress below).
        self._headers = {"accept-encoding": "identity", **(headers or {})}
        self._socket_factory = socket_factory
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The session, made on first use (aiohttp wants a running loop)."""
        if self._session is None:
            ctx: ssl.SSLContext | bool = True
            if self._ca_file is not None:
                ctx = ssl.create_default_context(cafile=str(self._ca_file))
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                ssl=ctx,
                resolver=GuardedResolver(self.guard) if self.guard is not None else None,
                socket_factory=self._socket_factory,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                headers=self._headers,
                middlewares=(literal_middleware(self.guard),) if self.guard is not None else (),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        max_answer_bytes: int = 4096,
    ) -> Answer | DeliveryResult:
        """Send one request and read at most ``max_answer_bytes`` of the answer (a server
        cannot make Herald buffer a large body), within the total timeout if there is one.

        Returns the Answer once a status line arrived, even if the body then broke off: the
        status is the server's decision. Otherwise the DeliveryResult: REJECTED
        "ForbiddenAddress" when the guard refused the address (no connection was made),
        REJECTED "InvalidRecipient" for a URL aiohttp cannot send to, RETRYABLE for timeouts
        and network failures (the server may or may not have it)."""
        url = URL(url) if isinstance(url, str) else url
        trace = trace_headers()  # the sink's send in progress continues on the provider
        if trace:
            headers = {**trace, **(headers or {})}
        async with self._slots:
            return await self._request(method, url, body, headers, max_answer_bytes)

    async def _request(
        self,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        max_answer_bytes: int,
    ) -> Answer | DeliveryResult:
        deadline_s = self._deadline_s
        resp: aiohttp.ClientResponse | None = None
        chunks: list[bytes] = []
        cut: str | None = None
        try:
            async with asyncio.timeout(deadline_s):
                async with self.session().request(
                    method, url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    size = 0
                    try:
                        while size < max_answer_bytes:
                            chunk = await resp.content.readany()
                            if not chunk:
                                break
                            chunks.append(chunk)
                            size += len(chunk)
                    except (aiohttp.ClientError, OSError) as e:
                        cut = error_class(e)
        except ForbiddenAddressError as e:
            return DeliveryResult.rejected("ForbiddenAddress", str(e))
        except aiohttp.InvalidURL as e:
            why = _describe(e, url)
            return DeliveryResult.rejected("InvalidRecipient", f"cannot send to this URL: {why}")
        except TimeoutError as e:
            within = "in time" if deadline_s is None else f"within {deadline_s:g}s"
            if resp is None:
                if isinstance(e, aiohttp.ServerTimeoutError):
                    return DeliveryResult.retryable(error_class(e), _describe(e, url))
                return DeliveryResult.retryable("Timeout", f"no answer {within}")
            cut = f"not complete {within}"
        except (aiohttp.ClientError, OSError) as e:  # refused, dropped, TLS, garbled answer
            if resp is None:
                return DeliveryResult.retryable(error_class(e), _describe(e, url))
            cut = error_class(e)
        assert resp is not None  # noqa: S101 - every other path returned
        text = b"".join(chunks)[:max_answer_bytes].decode("utf-8", "replace")
        return Answer(resp.status, resp.reason or "", resp.headers, text, cut)

    async def aclose(self) -> None:
        """Closes the session and its connections; the next request opens a new one."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class EndpointSettings(Protocol):
    """The settings of a connector that posts to endpoints its recipients name (webhook,
    Slack): what its guarded client is made of."""

    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_connections: int
    ca_file: Path | None
    user_agent: str


def endpoint_client(
    config: EndpointSettings,
    guard: AddressGuard,
    socket_factory: aiohttp.SocketFactoryType | None = None,
) -> HttpClient:
    """The guarded client of a connector with EndpointSettings."""
    return HttpClient(
        guard=guard,
        connect_timeout_s=config.connect_timeout_s,
        read_timeout_s=config.read_timeout_s,
        total_timeout_s=config.total_timeout_s,
        max_connections=config.max_connections,
        ca_file=config.ca_file,
        headers={"user-agent": config.user_agent},
        socket_factory=socket_factory,
    )
