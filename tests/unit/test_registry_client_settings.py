"""The schema registry client's settings: credentials, CA file, and what the client gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
from confluent_kafka.schema_registry import SchemaRegistryClient

from pipeline.settings import HeraldSettings

URL = "https://registry.example:8081"
BASE = {"url": URL, "timeout": 5, "max.retries": 0}

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("url only", {}, BASE),
    (
        "basic auth",
        {"schema_registry_basic_auth_user_info": "herald:pa:ss"},
        {**BASE, "basic.auth.user.info": "herald:pa:ss"},
    ),
    (
        "bearer token",
        {"schema_registry_bearer_token": "tok"},
        {
            **BASE,
            "bearer.auth.credentials.source": "STATIC_TOKEN",
            "bearer.auth.token": "tok",
            "bearer.auth.logical.cluster": "",
        },
    ),
    (
        "bearer token, Confluent Cloud",
        {
            "schema_registry_bearer_token": "tok",
            "schema_registry_bearer_logical_cluster": "lsrc-123",
            "schema_registry_bearer_identity_pool": "pool-1",
        },
        {
            **BASE,
            "bearer.auth.credentials.source": "STATIC_TOKEN",
            "bearer.auth.token": "tok",
            "bearer.auth.logical.cluster": "lsrc-123",
            "bearer.auth.identity.pool.id": "pool-1",
        },
    ),
    (
        "CA file",
        {"schema_registry_ca_file": Path("/etc/herald/ca.pem")},
        {**BASE, "ssl.ca.location": "/etc/herald/ca.pem"},
    ),
    (
        "credentials in the URL move out of it",
        {"schema_registry_url": "https://us%40r:p%3Ass@registry.example:8081/apis/ccompat/v7"},
        {
            **BASE,
            "url": "https://registry.example:8081/apis/ccompat/v7",
            "basic.auth.user.info": "us@r:p:ss",
        },
    ),
    (
        "several URLs, the same credentials",
        {"schema_registry_url": "http://u:p@a:8081, http://u:p@b:8081"},
        {**BASE, "url": "http://a:8081,http://b:8081", "basic.auth.user.info": "u:p"},
    ),
]


@pytest.mark.parametrize(("values", "expected"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_schema_registry_config(
    values: dict[str, Any], expected: dict[str, Any], tmp_path: Path
) -> None:
    settings = HeraldSettings(**{"schema_registry_url": URL, **values})
    conf = settings.schema_registry_config()
    assert conf == expected
    if "ssl.ca.location" in conf:  # the client reads the file at once
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        conf["ssl.ca.location"] = str(tmp_path / "ca.pem")
    SchemaRegistryClient(conf).close()  # the client takes every key


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"schema_registry_basic_auth_user_info": "a:b", "schema_registry_bearer_token": "t"},
            "not both",
        ),
        ({"schema_registry_basic_auth_user_info": "no-colon"}, "USER:PASSWORD"),
        (
            {"schema_registry_url": "http://u:p@a", "schema_registry_bearer_token": "t"},
            "keep one",
        ),
        ({"schema_registry_url": "http://u:p@a,http://v:q@b"}, "different credentials"),
    ],
)
def test_conflicting_registry_credentials_are_refused(values: dict[str, Any], message: str) -> None:
    settings = HeraldSettings(**{"schema_registry_url": URL, **values})
    with pytest.raises(ValueError, match=message) as caught:
        settings.schema_registry_config()
    assert "p@" not in str(caught.value) and ":b" not in str(caught.value)


def test_registry_secrets_are_masked_when_settings_are_printed() -> None:
    settings = HeraldSettings(
        schema_registry_url=URL,
        schema_registry_basic_auth_user_info="herald:hunter2",
        schema_registry_bearer_token="tok-hunter3",  # noqa: S106 - a test value
    )
    shown = f"{settings!r} {settings!s} {settings.model_dump()}"
    assert "hunter2" not in shown and "hunter3" not in shown
