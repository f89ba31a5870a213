"""A Web Push service on loopback (aiohttp.web), strict like a real one and a browser in one.

As the push service (RFC 8030, RFC 8292) it checks every request before answering: the VAPID
JWT's ES256 signature against the ``k=`` key of the Authorization header, ``aud`` against its
own origin, ``exp`` in the future and at most 24 hours away, ``sub`` a mailto:/https: contact,
``k`` against the key the subscription was made with (403 otherwise, RFC 8292 section 4.2),
TTL, Urgency, Topic, Content-Encoding and the 4096-byte body limit. Its error bodies are
shaped like Mozilla autopush's (``{"code", "errno", "error", "message", "more_info"}``).

As the browser (RFC 8291) it holds each subscription's private key and auth secret and
decrypts the body with ``http_ece``, so a test sees the payload a service worker would get.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import http_ece
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

MORE_INFO = "http://autopush.readthedocs.io/en/latest/http.html#error-codes"
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_AUTH = re.compile(r"^vapid\s+t=([^,\s]+)\s*,\s*k=([^,\s]+)\s*$", re.IGNORECASE)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass
class Answer:
    """What the service answers once a request passed its checks."""

    status: int = 201
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    delay_s: float = 0.0  # sleep before answering (timeouts)
    echo_authorization: bool = False  # put the request's Authorization in the body


def error(status: int, errno: int, reason: str, message: str, **headers: str) -> Answer:
    body = {"code": status, "errno": errno, "error": reason, "message": message}
    body["more_info"] = MORE_INFO
    return Answer(status, {"Content-Type": "application/json", **headers}, json.dumps(body))


@dataclass
class Subscriber:
    """A browser's side of one subscription: the key pair and auth secret it created."""

    token: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes
    application_server_key: str | None  # the VAPID public key it subscribed with
    answer: Answer | None = None  # once checks pass; None: 201 Created with a Location

    def subscription(self) -> dict[str, Any]:
        """What PushSubscription.toJSON() gives the web page."""
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64url(public_point(self.private_key)), "auth": b64url(self.auth)},
        }

    def recipient(self) -> str:
        return json.dumps(self.subscription())


@dataclass
class Pushed:
    """A push message the service accepted, decrypted as the browser sees it."""

    token: str
    headers: dict[str, str]
    claims: dict[str, Any]
    vapid_key: str
    sender_key: bytes  # the keyid of the aes128gcm header: the sender's ECDH public key
    body_bytes: int
    payload: dict[str, Any]
    location: str | None


class PushService:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.subscribers: dict[str, Subscriber] = {}
        self.unsubscribed: set[str] = set()
        self.received: list[Pushed] = []  # passed the checks, whatever the answer
        self.pushed: list[Pushed] = []  # ...and were accepted (2xx)
        self.requests = 0
        self.refusals: list[str] = []  # why requests failed the service's own checks
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> PushService:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/wpush/v2/{token}", self._push)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PushService:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def subscribe(
        self, application_server_key: str | None = None, answer: Answer | None = None
    ) -> Subscriber:
        token = secrets.token_urlsafe(24)
        sub = Subscriber(
            token=token,
            endpoint=f"{self.origin}/wpush/v2/{token}",
            private_key=ec.generate_private_key(ec.SECP256R1()),
            auth=os.urandom(16),
            application_server_key=application_server_key,
            answer=answer,
        )
        self.subscribers[token] = sub
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        del self.subscribers[sub.token]
        self.unsubscribed.add(sub.token)

    # -- the push resource -----------------------------------------------------------------

    async def _push(self, request: web.Request) -> web.Response:
        self.requests += 1
        token = request.match_info["token"]
        checked = self._check(request, token, await request.read())
        if isinstance(checked, Answer):
            return await self._answer(checked, request)
        self.received.append(checked)
        answer = self.subscribers[token].answer
        if answer is None:
            checked.location = f"{self.origin}/m/{uuid.uuid4().hex}"
            answer = Answer(201, {"Location": checked.location})
        if 200 <= answer.status < 300:
            checked.location = answer.headers.get("Location", checked.location)
            self.pushed.append(checked)
        return await self._answer(answer, request)

    async def _answer(self, answer: Answer, request: web.Request) -> web.Response:
        text = answer.body
        if answer.echo_authorization:
            text += f" (you sent: {request.headers.get('Authorization', '')})"
        if answer.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), answer.delay_s)
        return web.Response(status=answer.status, headers=answer.headers, text=text)

    def _refuse(self, answer: Answer, why: str) -> Answer:
        self.refusals.append(why)
        return answer

    def _check(self, request: web.Request, token: str, body: bytes) -> Pushed | Answer:
        """The push message when the request is valid, else the error answer a push
        service gives."""
        if token in self.unsubscribed:
            return error(410, 106, "Gone", "No such subscription")
        sub = self.subscribers.get(token)
        if sub is None:
            return error(404, 102, "Not Found", "Invalid subscription")

        match = _AUTH.match(request.headers.get("Authorization", ""))
        if match is None:
            return self._refuse(
                error(401, 109, "Unauthorized", "Missing or malformed VAPID authorization"),
                "authorization header",
            )
        jwt, vapid_key = match.groups()
        claims = self._verify_jwt(jwt, vapid_key)
        if isinstance(claims, str):
            return self._refuse(error(401, 109, "Unauthorized", claims), claims)
        if sub.application_server_key is not None and vapid_key != sub.application_server_key:
            return self._refuse(
                error(403, 109, "Forbidden", "VAPID key does not match the subscription"),
                "vapid key mismatch",
            )

        ttl = request.headers.get("TTL", "")
        if not ttl.isdigit():
            return self._refuse(error(400, 111, "Bad Request", "Missing TTL header"), "ttl")
        if request.headers.get("Urgency", "normal") not in ("very-low", "low", "normal", "high"):
            return self._refuse(error(400, 112, "Bad Request", "Invalid Urgency"), "urgency")
        topic = request.headers.get("Topic")
        if topic is not None and not _TOPIC.match(topic):
            return self._refuse(error(400, 113, "Bad Request", "Invalid Topic"), "topic")
        if request.headers.get("Content-Encoding") != "aes128gcm":
            return self._refuse(
                error(400, 110, "Bad Request", "Unknown Content-Encoding"), "content-encoding"
            )
        if len(body) > 4096:
            return self._refuse(
                error(413, 104, "Payload Too Large", "Body is too large"), "body too large"
            )

        # The browser's part: decrypt with the subscription's private key and auth secret.
        try:
            plaintext = http_ece.decrypt(
                body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm"
            )
            payload = json.loads(plaintext)
        except (http_ece.ECEException, ValueError) as e:
            why = f"undecryptable: {getattr(e, 'message', e)}"
            return self._refuse(error(400, 110, "Bad Request", why), why)
        id_len = body[20]
        return Pushed(
            token=token,
            headers=dict(request.headers),
            claims=claims,
            vapid_key=vapid_key,
            sender_key=body[21 : 21 + id_len],
            body_bytes=len(body),
            payload=payload,
            location=None,
        )

    def _verify_jwt(self, jwt: str, vapid_key: str) -> dict[str, Any] | str:
        """The JWT's claims, or why it is not acceptable."""
        try:
            header_b64, claims_b64, sig_b64 = jwt.split(".")
            header = json.loads(b64url_decode(header_b64))
            claims = json.loads(b64url_decode(claims_b64))
            signature = b64url_decode(sig_b64)
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b64url_decode(vapid_key)
            )
        except ValueError as e:
            return f"malformed JWT or key: {e}"
        if header.get("alg") != "ES256" or len(signature) != 64:
            return "JWT is not ES256"
        der = utils.encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            public.verify(der, f"{header_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return "JWT signature does not verify with k"
        if claims.get("aud") != self.origin:
            return f"JWT aud {claims.get('aud')!r} is not {self.origin!r}"
        exp = claims.get("exp")
        now = time.time()
        if not isinstance(exp, int) or exp <= now:
            return "JWT expired"
        if exp > now + 24 * 3600:
            return "JWT exp is more than 24 hours away"
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith(("mailto:", "https:")):
            return "JWT sub is not a mailto: or https: contact"
        return claims
