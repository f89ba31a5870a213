"""Herald on a SASL_SSL listener (SCRAM-SHA-512 over TLS with a private CA): every client
(publisher, Faust router, email sink, Kafka's console tools) reaches the broker through it,
and wrong credentials stop a process at start with one line that names the setting.

The module starts a broker of its own: the session's has no SASL_SSL listener. Its PLAINTEXT
listener serves only the broker's readiness probe; the clients are given the SASL_SSL port
alone.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.procs import free_ports
from devtools.smtp_catcher import SmtpCatcher
from devtools.tls import LocalTls, local_tls
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.local import BrokerTls, LocalKafka
from pipeline.publisher import Publisher
from pipeline.settings import HeraldSettings, project_root
from pipeline.topics import Topics
from tests.conftest import unique_prefix
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = pytest.mark.integration

USER = "herald"
PASSWORD = f"pw-{uuid.uuid4().hex}"  # in no log, no error message, no stderr
WRONG = f"wrong-{uuid.uuid4().hex}"  # nor this one
WAIT = 120.0
HERALD = [sys.executable, "-m", "pipeline.cli"]


@dataclass(frozen=True)
class SecureKafka:
    kafka: LocalKafka
    tls: LocalTls

    def settings(self, tmp: Path, **overrides: object) -> HeraldSettings:
        prefix = unique_prefix()
        values: dict[str, object] = {
            "kafka_bootstrap_servers": self.kafka.sasl_ssl_bootstrap_servers,
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": USER,
            "kafka_sasl_password": PASSWORD,
            "kafka_ssl_ca_file": self.tls.ca,
            "kafka_home": self.kafka.home,
            "topic_prefix": prefix,
            "router_app_id": f"{prefix}router",
            "sink_group_prefix": f"{prefix}sink",
            "router_data_dir": tmp / "router",
            "ledger_url": f"sqlite:///{tmp / 'ledger.db'}",
            **overrides,
        }
        return HeraldSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    home = tmp_path_factory.mktemp("secure-kafka")
    (home / "lib").mkdir()
    for jar in (project_root() / ".herald" / "kafka" / "lib").glob("*.jar"):
        (home / "lib" / jar.name).symlink_to(jar.resolve())
    tls = local_tls(home / "tls")
    port, controller, sasl_ssl = free_ports(3)
    kafka = LocalKafka(
        home,
        port=port,
        controller_port=controller,
        sasl_ssl_port=sasl_ssl,
        tls=BrokerTls(tls.server_chain, tls.server_key),
        scram_users={USER: PASSWORD},
    )
    kafka.start()
    try:
        yield SecureKafka(kafka, tls)
    finally:
        kafka.stop()


def _no_secret_in(path: Path) -> None:
    assert PASSWORD not in path.read_text(errors="replace"), f"{path} shows the password"


def test_the_demo_flow_runs_over_sasl_ssl(secure_kafka: SecureKafka, tmp_path: Path) -> None:
    settings = secure_kafka.settings(tmp_path)
    ensure_topics(settings)
    with SmtpCatcher() as smtp:
        env = herald_env(
            settings,
            HERALD_SMTP_HOST="127.0.0.1",
            HERALD_SMTP_PORT=str(smtp.port),
            HERALD_SMTP_SECURITY="none",
        )
        router = HeraldProcess("router", ["run", "router"], env, tmp_path).start()
        sink = HeraldProcess("sink", ["run", "sink", "email"], env, tmp_path).start()
        try:
            uid = f"u-{uuid.uuid4().hex[:8]}"
            user = {"user_id": uid, "email": f"ada-{uid}@example.com", "display_name": "Ada"}
            with Publisher(settings, producer_name="tests") as publisher:
                publisher.publish_sync("user-registered", user)
            got = smtp.wait_for(1, user["email"], timeout=WAIT)
            assert got, f"no email\n--- router\n{router.tail()}\n--- sink\n{sink.tail()}"
            assert got[0].message["Subject"] == "Welcome to Herald, Ada!"
            assert router.alive() and sink.alive()

            # Kafka's console consumer reads the intent topic over the same listener, with
            # the settings as a client.properties that is gone when the tool exits.
            tool_tmp = tmp_path / "tool-tmp"
            tool_tmp.mkdir()
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline.cli",
                    "kafka",
                    "console-consumer",
                    "--topic",
                    Topics(settings.topic_prefix).notifications("email"),
                    "--from-beginning",
                    "--max-messages",
                    "1",
                    "--timeout-ms",
                    "60000",
                    "--formatter-property",
                    "print.key=true",
                ],
                env={**env, "TMPDIR": str(tool_tmp)},
                capture_output=True,
                text=True,
                errors="replace",
                timeout=WAIT,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(user["email"]), out.stdout
            assert "Processed a total of 1 messages" in out.stderr
            assert PASSWORD not in out.stdout + out.stderr
            assert list(tool_tmp.iterdir()) == [], "the client.properties was left behind"
        finally:
            router.stop()
            sink.stop()
    _no_secret_in(router.log)
    _no_secret_in(sink.log)


@pytest.mark.parametrize(
    ("command", "change", "names"),
    [
        (["run", "router"], {"HERALD_KAFKA_SASL_PASSWORD": WRONG}, "HERALD_KAFKA_SASL_PASSWORD"),
        (
            ["run", "sink", "email"],
            {"HERALD_KAFKA_SASL_PASSWORD": WRONG},
            "HERALD_KAFKA_SASL_PASSWORD",
        ),
        (["run", "router"], {"HERALD_KAFKA_SASL_USERNAME": "nobody"}, "HERALD_KAFKA_SASL_USERNAME"),
        # Without the private CA the broker's certificate cannot be verified.
        (["run", "sink", "email"], {"HERALD_KAFKA_SSL_CA_FILE": None}, "HERALD_KAFKA_SSL_CA_FILE"),
    ],
    ids=["router-password", "sink-password", "router-user", "sink-untrusted-ca"],
)
def test_refused_credentials_stop_a_process_at_start_with_one_line(
    secure_kafka: SecureKafka,
    tmp_path: Path,
    command: list[str],
    change: dict[str, str | None],
    names: str,
) -> None:
    env = herald_env(secure_kafka.settings(tmp_path), HERALD_LOG_LEVEL="INFO")
    for key, value in change.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.returncode == 78, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert names in lines[0]
    assert "Traceback" not in out.stderr
    assert PASSWORD not in out.stderr + out.stdout
    assert WRONG not in out.stderr + out.stdout


def test_the_api_tail_and_replay_work_over_sasl_ssl(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    import json
    import time
    import urllib.request

    from devtools.procs import free_port

    port = free_port()
    settings = secure_kafka.settings(tmp_path, api_port=port)
    ensure_topics(settings)
    env = herald_env(settings, HERALD_LOG_LEVEL="WARNING")
    api = HeraldProcess("api", ["run", "api"], env, tmp_path).start()
    try:
        uid = f"u-{uuid.uuid4().hex[:8]}"
        body = json.dumps({"user_id": uid, "email": f"{uid}@example.com", "display_name": "Al"})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/events/user-registered", data=body.encode()
        )
        deadline = time.monotonic() + WAIT
        while True:
            assert api.alive(), api.tail()
            try:
                with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                    assert response.status == 202
                    event_id = json.loads(response.read())["event_id"]
                break
            except OSError:
                assert time.monotonic() < deadline, api.tail()
                time.sleep(0.5)
    finally:
        api.stop()
    _no_secret_in(api.log)

    topic = Topics(settings.topic_prefix).events("user")
    tail = subprocess.run(
        [*HERALD, "tail", topic, "--from-beginning", "--max", "1", "--idle-timeout", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert tail.returncode == 0, tail.stderr
    assert json.loads(tail.stdout.splitlines()[0])["value"]["envelope"]["event_id"] == event_id

    replay = subprocess.run(
        [*HERALD, "replay", topic, "--dry-run", "--no-ledger"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.startswith("would write: read=1 written=1"), replay.stdout
