"""Local servers for the HTTP connector tests, and checks of what they received.

- ``serve_aiohttp``: an aiohttp.web application on 127.0.0.1 (HTTP/1.1), for providers
  reached over plain HTTP in tests (Twilio's and FCM's shapes).
- ``serve_h2``: an ASGI application under hypercorn over TLS with a trustme certificate, so
  a client speaks HTTP/2 as it does to APNs.
- ``verify_jwt``: checks a compact JWS (RS256 or ES256) with the public key, with
  ``cryptography`` directly, so the tests do not trust the library the connectors sign with.

Every server is stopped when its ``async with`` block ends, whatever the test did.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypercorn.asyncio import serve
from hypercorn.config import Config

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serve_aiohttp(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yields its base URL."""
    # A handler still sleeping (the timeout cases) is cancelled after 0.5 s at cleanup.
    runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def serve_h2(app: ASGIApp, ca: trustme.CA, workdir: Path, *names: str) -> AsyncIterator[str]:
    """Serve ``app`` under hypercorn over TLS (ALPN h2, http/1.1) with a certificate from
    ``ca`` for ``names`` (default 127.0.0.1 and localhost); yields ``https://127.0.0.1:port``.
    """
    cert = ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
    certfile, keyfile = workdir / "server.pem", workdir / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))

    # Bound and listening before hypercorn starts: the port is known and connections made
    # before hypercorn's first accept wait in the backlog instead of being refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        listening = os.dup(sock.fileno())  # hypercorn takes this one over and closes it
    config = Config()
    config.bind = [f"fd://{listening}"]
    config.certfile, config.keyfile = str(certfile), str(keyfile)
    config.graceful_timeout = 0.5
    config.accesslog = None
    config.errorlog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait, mode="asgi"))  # type: ignore[arg-type]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


# -- JWS ------------------------------------------------------------------------------------


class BadToken(Exception):
    """A JWT that does not verify; the message says why (for the server's error body)."""


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(
    token: str, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWS signed RS256 (RSA key) or ES256 (P-256 key).
    Raises BadToken."""
    try:
        head, body, sig = token.split(".")
        header, claims = json.loads(_b64decode(head)), json.loads(_b64decode(body))
        signature, signed = _b64decode(sig), f"{head}.{body}".encode()
    except ValueError as e:
        raise BadToken(f"malformed JWT: {e}") from None
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if header.get("alg") != "RS256":
                raise BadToken(f"alg {header.get('alg')!r}, expected RS256")
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            if header.get("alg") != "ES256":
                raise BadToken(f"alg {header.get('alg')!r}, expected ES256")
            if len(signature) != 64:  # JWS: r || s, 32 bytes each (RFC 7518 3.4), not DER
                raise BadToken(f"ES256 signature of {len(signature)} bytes, expected 64")
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA256()))
    except BadToken:
        raise
    except Exception as e:  # cryptography's InvalidSignature has no message
        raise BadToken(f"bad signature ({type(e).__name__})") from None
    return header, claims
