"""The Kafka security settings: what is refused at start, and what each kind of client gets
(librdkafka keys, Faust credentials, a Java client.properties)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.environment import describe_validation_error
from pipeline.kafka.security import (
    ClientCredentialsTokenProvider,
    client_properties,
    faust_credentials,
    java_options,
    ssl_context,
)
from pipeline.settings import HeraldSettings

SECRET = 's3cr3t "quoted" back\\slash'  # noqa: S105 - a test credential


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    import trustme

    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def scram(**extra: Any) -> HeraldSettings:
    values: dict[str, Any] = {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "herald",
        "kafka_sasl_password": SECRET,
        **extra,
    }
    return HeraldSettings(**values)


REFUSED = [
    ({"kafka_security_protocol": "SASL_SSL"}, "HERALD_KAFKA_SASL_MECHANISM is required"),
    (
        {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "PLAIN"},
        "HERALD_KAFKA_SASL_USERNAME is required",
    ),
    (
        {
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": "SCRAM-SHA-256",
            "kafka_sasl_username": "u",
        },
        "HERALD_KAFKA_SASL_PASSWORD is required",
    ),
    (
        {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "OAUTHBEARER"},
        "HERALD_KAFKA_OAUTH_TOKEN_URL is required",
    ),
    ({"kafka_sasl_username": "u"}, "HERALD_KAFKA_SASL_USERNAME is set but"),
    (
        {
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": "PLAIN",
            "kafka_sasl_username": "u",
            "kafka_sasl_password": "p",
            "kafka_ssl_ca_file": "/etc/hostname",
        },
        "HERALD_KAFKA_SSL_CA_FILE is set but",
    ),
    (
        {"kafka_security_protocol": "SSL", "kafka_ssl_ca_file": "/nonexistent/ca.pem"},
        "HERALD_KAFKA_SSL_CA_FILE: no such file",
    ),
    (
        {"kafka_security_protocol": "SSL", "kafka_ssl_cert_file": "/etc/hostname"},
        "HERALD_KAFKA_SSL_CERT_FILE and HERALD_KAFKA_SSL_KEY_FILE go together",
    ),
    ({"kafka_security_protocol": "TLS"}, "HERALD_KAFKA_SECURITY_PROTOCOL: Input should be"),
    ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI"}, "MECHANISM"),
]


@pytest.mark.parametrize(("values", "message"), REFUSED)
def test_a_security_group_that_cannot_work_is_refused_naming_the_variable(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        HeraldSettings(**values)
    line = describe_validation_error(info.value, [HeraldSettings])
    assert message in line
    assert "\n" not in line


def test_a_refused_setting_never_shows_a_secret() -> None:
    with pytest.raises(ValidationError) as info:
        HeraldSettings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_password=SECRET,
            kafka_oauth_client_secret=SECRET,
        )
    assert SECRET not in describe_validation_error(info.value, [HeraldSettings])


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    assert HeraldSettings().kafka_security_config() == {"security.protocol": "PLAINTEXT"}
    assert faust_credentials(HeraldSettings()) is None
    assert ssl_context(HeraldSettings()) is None


def test_every_librdkafka_client_config_carries_the_security_group(ca: Path) -> None:
    settings = scram(kafka_ssl_ca_file=ca)
    expected = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "herald",
        "sasl.password": SECRET,
        "ssl.ca.location": str(ca),
    }
    for conf in (
        settings.producer_config(),
        settings.consumer_config("g"),
        settings.admin_config(),
        settings.client_config(**{"group.id": "x"}),
    ):
        assert expected.items() <= conf.items()
    # The password is a SecretStr everywhere else.
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())


def test_oauthbearer_uses_librdkafkas_oidc_method(ca: Path) -> None:
    settings = HeraldSettings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="OAUTHBEARER",
        kafka_oauth_token_url="https://idp.example.com/token",  # noqa: S106 - a URL
        kafka_oauth_client_id="herald",
        kafka_oauth_client_secret=SECRET,
        kafka_oauth_scope="kafka",
        kafka_ssl_ca_file=ca,
    )
    conf = settings.kafka_security_config()
    assert conf["sasl.oauthbearer.method"] == "oidc"
    assert conf["sasl.oauthbearer.token.endpoint.url"] == "https://idp.example.com/token"
    assert conf["sasl.oauthbearer.client.id"] == "herald"
    assert conf["sasl.oauthbearer.client.secret"] == SECRET
    assert conf["sasl.oauthbearer.scope"] == "kafka"

    creds = faust_credentials(settings)
    assert type(creds).__name__ == "OAuthCredentials"
    assert isinstance(creds.oauth_cb, ClientCredentialsTokenProvider)
    assert SECRET not in repr(creds) + repr(creds.oauth_cb)

    props = client_properties(settings)
    assert "sasl.mechanism=OAUTHBEARER\n" in props
    assert "OAuthBearerLoginCallbackHandler" in props
    assert 'clientId="herald"' in props
    assert java_options(settings) == [
        "-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls=https://idp.example.com/token"
    ]


def test_faust_gets_sasl_credentials_over_a_verifying_tls_context(ca: Path) -> None:
    creds = faust_credentials(scram(kafka_ssl_ca_file=ca))
    assert type(creds).__name__ == "SASLCredentials"
    assert creds.protocol.value == "SASL_SSL"
    assert creds.mechanism.value == "SCRAM-SHA-512"
    assert (creds.username, creds.password) == ("herald", SECRET)
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert creds.ssl_context.check_hostname
    assert SECRET not in repr(creds)

    tls_only = faust_credentials(
        HeraldSettings(kafka_security_protocol="SSL", kafka_ssl_ca_file=ca)
    )
    assert type(tls_only).__name__ == "SSLCredentials"


def _properties(text: str) -> dict[str, str]:
    """Parse the file the way java.util.Properties does, for the escapes used here."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        chars, i, decoded = value, 0, []
        while i < len(chars):
            if chars[i] == "\\":
                nxt = chars[i + 1]
                decoded.append({"n": "\n", "r": "\r"}.get(nxt, nxt))
                i += 2
            else:
                decoded.append(chars[i])
                i += 1
        out[key] = "".join(decoded)
    return out


def test_console_tools_get_a_client_properties_with_jaas_and_a_pem_truststore(
    ca: Path, tmp_path: Path
) -> None:
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n")
    props = _properties(
        client_properties(
            scram(kafka_ssl_ca_file=ca, kafka_ssl_cert_file=cert, kafka_ssl_key_file=key)
        )
    )
    assert props["security.protocol"] == "SASL_SSL"
    assert props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="herald" password="s3cr3t \\"quoted\\" back\\\\slash";'
    )
    assert props["ssl.truststore.type"] == "PEM"
    assert props["ssl.truststore.location"] == str(ca.resolve())
    assert props["ssl.keystore.type"] == "PEM"
    assert props["ssl.keystore.certificate.chain"] == cert.read_text()
    assert props["ssl.keystore.key"] == key.read_text()

    plain = _properties(
        client_properties(
            HeraldSettings(
                kafka_security_protocol="SASL_PLAINTEXT",
                kafka_sasl_mechanism="PLAIN",
                kafka_sasl_username="u",
                kafka_sasl_password="p",  # noqa: S106 - a test credential
            )
        )
    )
    assert plain["sasl.jaas.config"].startswith(
        "org.apache.kafka.common.security.plain.PlainLoginModule required"
    )
    assert "ssl.truststore.location" not in plain


async def test_the_routers_token_provider_uses_the_client_credentials_grant() -> None:
    """Against a real token endpoint on loopback: one request for several tokens, the
    client's id and secret in HTTP Basic auth, and a refusal that names the settings without
    the secret."""
    import base64
    from urllib.parse import unquote_plus

    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        scheme, _, encoded = request.headers["Authorization"].partition(" ")
        login, _, password = base64.b64decode(encoded).decode().partition(":")
        seen.append({"grant_type": str(form["grant_type"]), "scope": str(form.get("scope"))})
        if (scheme, unquote_plus(login), unquote_plus(password)) != ("Basic", "herald", SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        return web.json_response({"access_token": "tok-1", "expires_in": 3600})

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        url = f"http://127.0.0.1:{port}/token"
        provider = ClientCredentialsTokenProvider(url, "herald", SECRET, scope="kafka")
        assert await provider.token() == "tok-1"
        assert await provider.token() == "tok-1"
        assert seen == [{"grant_type": "client_credentials", "scope": "kafka"}]

        from pipeline.kafka.security import TokenError

        wrong = ClientCredentialsTokenProvider(url, "herald", "not-it")
        with pytest.raises(TokenError) as info:
            await wrong.token()
        assert "HERALD_KAFKA_OAUTH_CLIENT_SECRET" in str(info.value)
        assert "HTTP 401" in str(info.value)
        assert "not-it" not in str(info.value)
    finally:
        await runner.cleanup()
