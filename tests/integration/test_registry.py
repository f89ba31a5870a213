"""Herald against real schema registries: Apicurio Registry (its Confluent-compatible API,
over https, with basic auth and bearer tokens) on the session broker, and devtools.registry
for the same credential and TLS settings.

An event written by a plain confluent-kafka producer with its own AvroSerializer is read by
Herald exactly like one Herald published, and the pipeline delivers it. A refused credential
or an unverifiable certificate is RegistryUnavailableError (the reader holds the record),
and no secret appears in an error message or a log."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient, record_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from devtools.apicurio import Apicurio
from devtools.smtp_catcher import SmtpCatcher
from pipeline.kafka.admin import ensure_topics
from pipeline.publisher import Publisher
from pipeline.records import notification_id
from pipeline.serialization import RegistryUnavailableError, serde_from_settings
from pipeline.settings import HeraldSettings, project_root
from pipeline.topics import Topics
from tests.conftest import free_port
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = pytest.mark.integration

WAIT = 90.0
USER_REGISTERED = "herald.events.UserRegistered"
PASSWORD = f"pw-{uuid.uuid4().hex}"  # unique, so finding it anywhere is a leak
TOKEN = f"tok-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Tls:
    ca: Path  # PEM of the CA, for HERALD_SCHEMA_REGISTRY_CA_FILE
    cert: Path  # the server's chain
    key: Path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    server.private_key_pem.write_to_path(str(tmp / "key.pem"))
    (tmp / "chain.pem").write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return Tls(tmp / "ca.pem", tmp / "chain.pem", tmp / "key.pem")


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    """The key of the identity provider Apicurio trusts for bearer tokens."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwt(key: rsa.RSAPrivateKey, expires_in: int = 600) -> str:
    """An RS256 JSON Web Token for the user herald, as an identity provider issues them."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"iss": "herald-tests", "sub": "herald", "preferred_username": "herald"}
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({**claims, "iat": now, "exp": now + expires_in}).encode())
    signature = key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{b64(signature)}"


@pytest.fixture(scope="module")
def apicurio(
    tmp_path_factory: pytest.TempPathFactory, tls: Tls, signing_key: rsa.RSAPrivateKey
) -> Iterator[Apicurio]:
    """Apicurio Registry over https: basic auth for the user herald, or a bearer token
    signed by ``signing_key``."""
    public_key = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    registry = Apicurio(
        tmp_path_factory.mktemp("apicurio"),
        users={"herald": PASSWORD},
        bearer_public_key=public_key.decode(),
        tls_cert=tls.cert,
        tls_key=tls.key,
        tls_ca=tls.ca,
    )
    took = registry.start()
    print(f"Apicurio Registry {registry.version()} ready in {took:.1f}s at {registry.url}")
    try:
        yield registry
    finally:
        registry.stop()


def _apicurio_settings(settings: HeraldSettings, apicurio: Apicurio, tls: Tls) -> HeraldSettings:
    return HeraldSettings.model_validate(
        {
            **settings.model_dump(),
            "schema_registry_url": apicurio.url,
            "schema_registry_basic_auth_user_info": f"herald:{PASSWORD}",
            "schema_registry_ca_file": tls.ca,
        }
    )


def _user_registered_schema() -> str:
    """UserRegistered v3 as a producer outside Herald would write it: the .avsc file with
    the envelope's definition inlined where the file names it."""
    root = project_root() / "schemas"
    schema = json.loads((root / "events" / "UserRegistered.v3.avsc").read_text())
    envelope = json.loads((root / "common" / "Envelope.avsc").read_text())
    for f in schema["fields"]:
        if f["type"] == "herald.Envelope":
            f["type"] = envelope
    return json.dumps(schema)


def _event(name: str) -> dict[str, Any]:
    uid = f"u-{uuid.uuid4().hex[:8]}"
    return {
        "envelope": {
            "event_id": str(uuid.uuid4()),
            "occurred_at": datetime.now(UTC).replace(microsecond=0),
            "producer": "signup-service",
            "traceparent": None,
        },
        "user_id": uid,
        "email": f"{name}-{uid}@example.com",
        "display_name": name.title(),
        "locale": "en-GB",
        "phone": None,
    }


class PlainProducer:
    """A service that knows nothing of Herald: confluent-kafka's Producer and AvroSerializer
    with RecordNameStrategy, against the same registry."""

    def __init__(self, s: HeraldSettings) -> None:
        self.registry = SchemaRegistryClient(s.schema_registry_config())
        self.serializer = AvroSerializer(
            self.registry,
            _user_registered_schema(),
            conf={"subject.name.strategy": record_subject_name_strategy},
        )
        self.producer = Producer({"bootstrap.servers": s.kafka_bootstrap_servers})
        self.topic = Topics(s.topic_prefix).events("user")

    def send(self, event: dict[str, Any]) -> tuple[int, int]:
        value = self.serializer(event, SerializationContext(self.topic, MessageField.VALUE))
        acked: list[tuple[Any, int, int]] = []
        self.producer.produce(
            self.topic,
            value,
            event["user_id"].encode(),
            on_delivery=lambda err, msg: acked.append((err, msg.partition(), msg.offset())),
        )
        self.producer.flush(30)
        [(err, partition, offset)] = acked
        assert err is None, err
        return partition, offset

    def close(self) -> None:
        self.producer.flush(30)
        self.registry.close()


# -- Apicurio Registry ---------------------------------------------------------------------------


def test_a_plain_producers_event_reads_like_one_herald_published(
    settings: HeraldSettings, apicurio: Apicurio, tls: Tls
) -> None:
    s = _apicurio_settings(settings, apicurio, tls)
    ensure_topics(s)
    event = _event("plain")
    plain = PlainProducer(s)
    try:
        partition, offset = plain.send(event)
    finally:
        plain.close()
    with Publisher(s, producer_name="tests") as publisher:
        ours = publisher.publish_sync("user-registered", event)

    records = {
        (m.partition(), m.offset()): m.value()
        for m in read_all(s.kafka_bootstrap_servers, Topics(s.topic_prefix).events("user"))
    }
    theirs_bytes, ours_bytes = records[(partition, offset)], records[(ours.partition, ours.offset)]
    assert theirs_bytes[:1] == ours_bytes[:1] == b"\x00"  # both Confluent wire format

    reader = serde_from_settings(s)  # a fresh client: both ids are fetched from Apicurio
    try:
        theirs = reader.decode(theirs_bytes, expect=USER_REGISTERED)
        mine = reader.decode(ours_bytes, expect=USER_REGISTERED)
    finally:
        reader.close()
    assert theirs.record == mine.record
    assert theirs.schema == mine.schema  # read into the same local version (v3)
    assert "@registry:" in theirs.writer and "@registry:" in mine.writer
    assert str(mine.record["envelope"]["event_id"]) == event["envelope"]["event_id"]
    assert mine.record["email"] == event["email"]
    # Apicurio keeps the subject by the record's full name (RecordNameStrategy).
    subjects = SchemaRegistryClient(s.schema_registry_config())
    try:
        assert USER_REGISTERED in subjects.get_subjects()
    finally:
        subjects.close()


def test_the_pipeline_routes_a_plain_producers_event_through_apicurio(
    settings: HeraldSettings, tmp_path: Path, apicurio: Apicurio, tls: Tls
) -> None:
    s = _apicurio_settings(settings, apicurio, tls)
    s = HeraldSettings.model_validate(
        {**s.model_dump(), "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}"}
    )
    ensure_topics(s)
    with SmtpCatcher() as smtp:
        env = herald_env(s, SCHEMA_REGISTRY_URL=apicurio.url, HERALD_SMTP_PORT=str(smtp.port))
        proc = HeraldProcess("all", ["run", "all", "email"], env, tmp_path).start()
        try:
            theirs, ours = _event("plain"), _event("herald")
            plain = PlainProducer(s)
            try:
                plain.send(theirs)
            finally:
                plain.close()
            with Publisher(s, producer_name="tests") as publisher:
                publisher.publish_sync("user-registered", ours)
            for event in (theirs, ours):
                assert smtp.wait_for(1, event["email"], timeout=WAIT), proc.tail()
                [mail] = smtp.to(event["email"])
                nid = notification_id(
                    event["envelope"]["event_id"], "welcome-email", "email", event["email"]
                )
                assert mail.message_id == f"<{nid}@herald.localhost>"
            topics = Topics(s.topic_prefix)
            assert read_all(s.kafka_bootstrap_servers, topics.events_dlq) == []
            intents = read_all(s.kafka_bootstrap_servers, topics.notifications("email"))
            assert [m.value()[:1] for m in intents] == [b"\x00", b"\x00"]
        finally:
            proc.stop()
        assert PASSWORD not in proc.log.read_text(errors="replace")


def test_a_bearer_token_signed_by_the_registrys_key_is_accepted(
    settings: HeraldSettings, apicurio: Apicurio, tls: Tls, signing_key: rsa.RSAPrivateKey
) -> None:
    s = HeraldSettings.model_validate(
        {
            **_apicurio_settings(settings, apicurio, tls).model_dump(),
            "schema_registry_basic_auth_user_info": None,
            "schema_registry_bearer_token": _jwt(signing_key),
        }
    )
    writer, reader = serde_from_settings(s), serde_from_settings(s)
    try:
        data, ref = writer.encode(USER_REGISTERED, _event("bearer"))
        assert "@registry:" in ref
        assert reader.decode(data, expect=USER_REGISTERED).record["display_name"] == "Bearer"
    finally:
        writer.close()
        reader.close()


def test_refused_credentials_or_an_unknown_ca_are_a_registry_outage_and_never_show_the_secret(
    settings: HeraldSettings,
    apicurio: Apicurio,
    tls: Tls,
    signing_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    good = _apicurio_settings(settings, apicurio, tls)
    with Publisher(good, producer_name="tests") as publisher:
        record = publisher.prepare("user-registered", _event("held"))[1].value
    wrong = f"wrong-{PASSWORD}"
    forged = _jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    expired = _jwt(signing_key, expires_in=-600)
    no_basic: dict[str, Any] = {"schema_registry_basic_auth_user_info": None}
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "wrong password": ({"schema_registry_basic_auth_user_info": f"herald:{wrong}"}, "401"),
        "no credentials": (no_basic, "401"),
        "token from another key": ({**no_basic, "schema_registry_bearer_token": forged}, "401"),
        "expired token": ({**no_basic, "schema_registry_bearer_token": expired}, "401"),
        "system CAs only": ({"schema_registry_ca_file": None}, "CERTIFICATE_VERIFY_FAILED"),
    }
    for case, (override, expected) in cases.items():
        s = HeraldSettings.model_validate({**good.model_dump(), **override})
        reader = serde_from_settings(s)
        try:
            with pytest.raises(RegistryUnavailableError) as caught:
                reader.decode(record)
        finally:
            reader.close()
        message = f"{caught.value!s} {caught.value!r}"
        assert expected in message, (case, message)
        for secret in (PASSWORD, forged, expired):
            assert secret not in message, case
    for secret in (PASSWORD, forged, expired):
        assert secret not in caplog.text


# -- devtools.registry: basic auth, bearer token, TLS -------------------------------------------


@contextmanager
def _devtools_registry(tmp: Path, *args: str) -> Iterator[str]:
    port = free_port()
    log = tmp / f"registry-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.registry", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "registry did not start"
            time.sleep(0.05)
        yield log.read_text().split("listening on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(10)


CLIENT_CASES: list[tuple[str, list[str], dict[str, Any], str | None]] = [
    # (case, registry options, client settings, the failure expected or None)
    ("basic", ["--basic-auth", f"herald:{PASSWORD}"], {"basic": f"herald:{PASSWORD}"}, None),
    ("basic, wrong", ["--basic-auth", f"herald:{PASSWORD}"], {"basic": "herald:nope"}, "401"),
    ("basic, none", ["--basic-auth", f"herald:{PASSWORD}"], {}, "401"),
    ("bearer", ["--bearer-token", TOKEN], {"token": TOKEN}, None),
    ("bearer, wrong", ["--bearer-token", TOKEN], {"token": "tok-nope"}, "401"),
    ("bearer, basic sent", ["--bearer-token", TOKEN], {"basic": f"x:{TOKEN}"}, "401"),
    ("tls", ["--tls"], {"ca": True}, None),
    ("tls, unknown CA", ["--tls"], {}, "CERTIFICATE_VERIFY_FAILED"),
    ("tls and bearer", ["--tls", "--bearer-token", TOKEN], {"ca": True, "token": TOKEN}, None),
]


@pytest.mark.parametrize(
    ("server", "client", "failure"),
    [pytest.param(*c[1:], id=c[0]) for c in CLIENT_CASES],
)
def test_registry_client_credentials_and_ca(
    tmp_path: Path,
    tls: Tls,
    caplog: pytest.LogCaptureFixture,
    server: list[str],
    client: dict[str, Any],
    failure: str | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    tls_args = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    args = [a for option in server for a in (tls_args if option == "--tls" else [option])]
    with _devtools_registry(tmp_path, *args) as url:
        s = HeraldSettings(
            schema_registry_url=url,
            schema_registry_basic_auth_user_info=client.get("basic"),
            schema_registry_bearer_token=client.get("token"),
            schema_registry_ca_file=tls.ca if client.get("ca") else None,
        )
        serde = serde_from_settings(s)
        try:
            if failure is None:
                data, ref = serde.encode(USER_REGISTERED, _herald_record())
                assert "@registry:" in ref
                reader = serde_from_settings(s)
                try:
                    assert reader.decode(data).record["user_id"] == "u-1"
                finally:
                    reader.close()
            else:
                with pytest.raises(RegistryUnavailableError) as caught:
                    serde.encode(USER_REGISTERED, _herald_record())
                message = f"{caught.value!s} {caught.value!r}"
                assert failure in message
                assert PASSWORD not in message and TOKEN not in message
        finally:
            serde.close()
    assert PASSWORD not in caplog.text and TOKEN not in caplog.text


def _herald_record() -> dict[str, Any]:
    return {
        "envelope": {
            "event_id": "6f1c6a3e-4a7e-4a57-9a6c-000000000001",
            "occurred_at": datetime(2026, 1, 2, tzinfo=UTC),
            "producer": "tests",
            "traceparent": None,
        },
        "user_id": "u-1",
        "email": "a@example.com",
        "display_name": "A",
        "locale": None,
        "phone": None,
    }
