"""The Kafka security settings (``HERALD_KAFKA_SECURITY_PROTOCOL`` and friends) for the clients
that do not take librdkafka's configuration: the Faust router (aiokafka) and Kafka's own
console tools (Java). librdkafka's keys come from ``HeraldSettings.kafka_security_config``.

Secrets stay out of logs and errors: Faust's credentials print only the user name, the
client.properties for the console tools is a file only its owner can read, removed when the
tool exits, and the token provider's errors name the endpoint and the status, never the
client secret.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from aiokafka.abc import AbstractTokenProvider

from pipeline.settings import HeraldSettings

__all__ = [
    "ClientCredentialsTokenProvider",
    "TokenError",
    "client_properties",
    "faust_credentials",
    "java_options",
    "ssl_context",
]

# What the Java clients need for OAUTHBEARER with an OAuth token endpoint.
_OAUTH_LOGIN_HANDLER = (
    "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginCallbackHandler"
)


class TokenError(RuntimeError):
    """The OAuth token endpoint did not give a token."""


def ssl_context(settings: HeraldSettings) -> ssl.SSLContext | None:
    """The TLS context for aiokafka (SSL and SASL_SSL), else None. Verifies the broker's
    certificate and host name against HERALD_KAFKA_SSL_CA_FILE or the system's CAs."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    ca = settings.kafka_ssl_ca_file
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_key_file is not None:
        password = settings.kafka_ssl_key_password
        context.load_cert_chain(
            str(settings.kafka_ssl_cert_file),
            str(settings.kafka_ssl_key_file),
            password=password.get_secret_value() if password else None,
        )
    return context


def faust_credentials(settings: HeraldSettings) -> Any:
    """``broker_credentials`` for faust.App: SASL, OAuth or TLS credentials, or None for
    PLAINTEXT."""
    import faust
    from faust.auth import Credentials, OAuthCredentials

    protocol = settings.kafka_security_protocol
    context = ssl_context(settings)
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    creds: Credentials
    if settings.kafka_sasl_mechanism == "OAUTHBEARER":
        creds = OAuthCredentials(
            oauth_cb=ClientCredentialsTokenProvider.from_settings(settings), ssl_context=context
        )
    else:
        password = settings.kafka_sasl_password
        creds = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    return creds


class ClientCredentialsTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """OAuth 2 client credentials grant (RFC 6749 section 4.4) for aiokafka's OAUTHBEARER:
    the token is fetched on first use and again when less than a minute of it is left, the
    way librdkafka's ``oidc`` method does for the other clients."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self.scope = scope
        self.ca_file = ca_file
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: HeraldSettings) -> ClientCredentialsTokenProvider:
        secret = settings.kafka_oauth_client_secret
        return cls(
            token_url=str(settings.kafka_oauth_token_url),
            client_id=str(settings.kafka_oauth_client_id),
            client_secret=secret.get_secret_value() if secret else "",
            scope=settings.kafka_oauth_scope,
            ca_file=settings.kafka_ssl_ca_file,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.token_url} client_id={self.client_id}>"

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() > self._expires - 60:
                self._token, lifetime = await self._fetch()
                self._expires = time.monotonic() + lifetime
            return self._token

    async def _fetch(self) -> tuple[str, float]:
        import aiohttp

        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        # RFC 6749 2.3.1: id and secret form-encoded, then HTTP Basic.
        pair = f"{quote_plus(self.client_id)}:{quote_plus(self._client_secret)}"
        headers = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.token_url, data=form, headers=headers, ssl=context) as response,
            ):
                body = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TokenError(
                f"OAuth token endpoint {self.token_url} (HERALD_KAFKA_OAUTH_TOKEN_URL) did "
                f"not answer: {type(e).__name__}"
            ) from None
        if status != 200:
            raise TokenError(
                f"OAuth token endpoint {self.token_url} refused client "
                f"{self.client_id!r} (HERALD_KAFKA_OAUTH_CLIENT_ID, "
                f"HERALD_KAFKA_OAUTH_CLIENT_SECRET): HTTP {status}"
            )
        try:
            doc = json.loads(body)
            token = doc["access_token"]
            lifetime = float(doc.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise TokenError(
                f"OAuth token endpoint {self.token_url} answered without an access_token"
            ) from None
        return str(token), lifetime


# -- Kafka's console tools ----------------------------------------------------------------


def _escape(value: str) -> str:
    """A java.util.Properties value: backslashes, line breaks and leading blanks escaped."""
    out = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return "\\" + out if out.startswith((" ", "\t")) else out


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def client_properties(settings: HeraldSettings) -> str:
    """The security group as a Java client.properties (for --command-config and the
    like). Holds secrets: write it only to a file its owner alone can read."""
    protocol = settings.kafka_security_protocol
    props: dict[str, str] = {"security.protocol": protocol}
    mechanism = settings.kafka_sasl_mechanism
    if protocol.startswith("SASL_") and mechanism is not None:
        props["sasl.mechanism"] = mechanism
        if mechanism == "OAUTHBEARER":
            secret = settings.kafka_oauth_client_secret
            props["sasl.oauthbearer.token.endpoint.url"] = str(settings.kafka_oauth_token_url)
            props["sasl.login.callback.handler.class"] = _OAUTH_LOGIN_HANDLER
            options = {
                "clientId": str(settings.kafka_oauth_client_id),
                "clientSecret": secret.get_secret_value() if secret else "",
            }
            if settings.kafka_oauth_scope:
                options["scope"] = settings.kafka_oauth_scope
            module = "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule"
        else:
            password = settings.kafka_sasl_password
            options = {
                "username": str(settings.kafka_sasl_username),
                "password": password.get_secret_value() if password else "",
            }
            module = (
                "org.apache.kafka.common.security.plain.PlainLoginModule"
                if mechanism == "PLAIN"
                else "org.apache.kafka.common.security.scram.ScramLoginModule"
            )
        pairs = " ".join(f"{k}={_jaas_quote(v)}" for k, v in options.items())
        props["sasl.jaas.config"] = f"{module} required {pairs};"
    if protocol.endswith("SSL"):
        if settings.kafka_ssl_ca_file is not None:
            props["ssl.truststore.type"] = "PEM"
            props["ssl.truststore.location"] = str(Path(settings.kafka_ssl_ca_file).resolve())
        if settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_key_file is not None:
            # Kafka's PEM keystore takes the chain and the key inline; the key must be
            # PKCS#8 ("BEGIN PRIVATE KEY" or "BEGIN ENCRYPTED PRIVATE KEY").
            props["ssl.keystore.type"] = "PEM"
            props["ssl.keystore.certificate.chain"] = Path(settings.kafka_ssl_cert_file).read_text()
            props["ssl.keystore.key"] = Path(settings.kafka_ssl_key_file).read_text()
            if settings.kafka_ssl_key_password is not None:
                props["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
    return "".join(f"{k}={_escape(v)}\n" for k, v in props.items())


def java_options(settings: HeraldSettings) -> list[str]:
    """JVM system properties the console tools need for these settings: Kafka 4 lets the
    OAuth login handler reach only the URLs it was told to allow."""
    if (
        settings.kafka_security_protocol.startswith("SASL_")
        and settings.kafka_sasl_mechanism == "OAUTHBEARER"
    ):
        url = settings.kafka_oauth_token_url
        return [f"-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls={url}"]
    return []
