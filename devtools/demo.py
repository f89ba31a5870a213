"""``herald demo``: the whole flow on this machine, then everything it started is stopped.

A fresh local broker (its own directory and ports, wiped afterwards), a local SMTP catcher,
``herald run all`` as a child process; three domain events and one malformed record are
published, and what the SMTP server received is printed.
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from devtools.procs import HeraldProcess, herald_env
from devtools.smtp_catcher import SmtpCatcher
from pipeline.kafka.admin import ensure_topics
from pipeline.kafka.local import KafkaNotProvisionedError, LocalKafka
from pipeline.publisher import Publisher
from pipeline.settings import HeraldSettings, project_root
from pipeline.topics import Topics

__all__ = ["run_demo"]

# A user whose address bounced before: the demo suppresses it before publishing.
BOUNCED = {"user_id": "u-1004", "email": "gone@example.com", "display_name": "Gone"}

SAMPLE_EVENTS: list[tuple[str, dict[str, Any]]] = [
    (
        "user-registered",
        {"user_id": "u-1001", "email": "ada@example.com", "display_name": "Ada", "locale": "en-GB"},
    ),
    (
        "password-reset-requested",
        {
            "user_id": "u-1002",
            "email": "grace@example.com",
            "reset_url": "https://app.example.com/reset/7f3a",
            "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        },
    ),
    (
        "order-shipped",
        {
            "order_id": "o-5521",
            "user_id": "u-1003",
            "email": "linus@example.com",
            "carrier": "DHL",
            "tracking_number": "JD0146000033",
            "items": [{"sku": "KB-1", "name": "Keyboard", "quantity": 1}],
        },
    ),
]


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def run_demo(base: HeraldSettings) -> int:
    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own story
    home = project_root() / ".herald" / "demo"
    shutil.rmtree(home / "kafka" / "data", ignore_errors=True)
    shutil.rmtree(home / "router", ignore_errors=True)
    for leftover in home.glob("ledger.db*"):
        leftover.unlink()
    kafka = LocalKafka(home / "kafka", port=19092, controller_port=19093)
    kafka.lib.mkdir(parents=True, exist_ok=True)
    # Share the provisioned jars instead of copying them.
    for jar in base.kafka_home.joinpath("lib").glob("*.jar"):
        link = kafka.lib / jar.name
        if not link.exists():
            link.symlink_to(jar.resolve())
    router = None
    try:
        _say("starting Apache Kafka from Maven jars (KRaft, 127.0.0.1:19092)")
        seconds = kafka.start()
        _say(f"Kafka {kafka.version()} ready in {seconds:.1f}s")
        with SmtpCatcher() as smtp:
            _say(f"SMTP server listening on 127.0.0.1:{smtp.port}")
            settings = base.model_copy(
                update={
                    "kafka_bootstrap_servers": kafka.bootstrap_servers,
                    "router_data_dir": home / "router",
                    "ledger_url": f"sqlite:///{home / 'ledger.db'}",
                }
            )
            ensure_topics(settings)
            env = herald_env(
                settings,
                HERALD_SMTP_HOST="127.0.0.1",
                HERALD_SMTP_PORT=str(smtp.port),
                HERALD_SMTP_SECURITY="none",
            )
            router = HeraldProcess("herald-run-all", ["run", "all", "email"], env, home)
            log_path = router.log
            log_path.unlink(missing_ok=True)
            _say(f"starting the router and the email sink: herald run all (log: {log_path})")
            router.start()
            # An address that bounced before: the router suppresses what would go to it.
            people = _people(settings)
            people.add_suppression("email", BOUNCED["email"], "bounced (550 5.1.1)", "demo")
            people.store.close()
            _say(f"suppressed email:{BOUNCED['email']} (as if it had bounced before)")
            publisher = Publisher(settings, producer_name="demo-shop")
            for event_type, data in SAMPLE_EVENTS:
                ev = publisher.publish_sync(event_type, data)
                _say(
                    f"published {ev.event_type:<25} {ev.event_id} "
                    f"-> {ev.topic}[{ev.partition}]@{ev.offset}"
                )
            topics = Topics(settings.topic_prefix)
            gone = publisher.publish_sync("user-registered", BOUNCED)
            _say(f"published user-registered           {gone.event_id} (to the bounced address)")
            bad = publisher._producer  # a raw record, as a buggy producer might write it
            bad.produce(topics.events("user"), b"\x07not avro at all", b"u-9999")
            bad.flush(10)
            del publisher, bad  # close the client before the broker goes away
            _say(
                f"published one malformed record to {topics.events('user')} "
                f"(expect it in {topics.events_dlq})"
            )

            received = smtp.wait_for(len(SAMPLE_EVENTS), timeout=90)
            if not router.alive():
                assert router.proc is not None  # noqa: S101 - started above
                _say(f"herald run all exited with {router.proc.returncode}; see {log_path}")
                return 1
            _say(f"delivered {len(received)} of {len(SAMPLE_EVENTS)} emails:")
            for m in received:
                first = next((ln for ln in m.text_body().splitlines() if ln.strip()), "")
                print(f"    To: {m.message['To']}")
                print(f"    Subject: {m.message['Subject']}")
                print(f"    Message-ID: {m.message_id}")
                print(f"    | {first}")
                print()
            suppressed = _report_suppressed(settings, topics.status, gone.event_id)
            _report_dlq(settings, topics.events_dlq)
            return 0 if len(received) == len(SAMPLE_EVENTS) and suppressed else 1
    except KafkaNotProvisionedError as e:
        _say(str(e))
        return 1
    finally:
        if router is not None:
            router.stop(timeout=30)
        kafka.stop()
        shutil.rmtree(home / "kafka" / "data", ignore_errors=True)
        _say("stopped the pipeline and the broker")


def _people(settings: HeraldSettings) -> Any:
    from pipeline.people.service import PeopleService

    return PeopleService.from_settings(settings)


def _report_suppressed(settings: HeraldSettings, topic: str, event_id: str) -> bool:
    """Print the SUPPRESSED status the router wrote for the bounced address's event."""
    from confluent_kafka import Consumer

    from pipeline import headers as h
    from pipeline.records import DELIVERY_STATUS
    from pipeline.serialization import serde_from_settings

    serde = serde_from_settings(settings)
    consumer = Consumer(
        settings.client_config(
            **{"group.id": "herald-demo-status", "auto.offset.reset": "earliest"}
        )
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            if h.as_dict(msg.headers()).get(h.EVENT_ID) != event_id:
                continue
            status = serde.decode(msg.value(), expect=DELIVERY_STATUS).record
            if status["state"] == "SUPPRESSED":
                _say(
                    f"suppressed, not sent: {status['channel']} to {status['recipient']}: "
                    f"{status['provider_response']} (a SUPPRESSED status on {topic})"
                )
                return True
        _say(f"no SUPPRESSED status for the bounced address on {topic}")
        return False
    finally:
        consumer.close()


def _report_dlq(settings: HeraldSettings, topic: str) -> None:
    from confluent_kafka import Consumer

    from pipeline import headers as h

    consumer = Consumer(
        settings.client_config(**{"group.id": "herald-demo-dlq", "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            hd = h.as_dict(msg.headers())
            _say(
                f"dead-lettered to {topic}: "
                f"{hd.get(h.ORIGINAL_TOPIC)}[{hd.get(h.ORIGINAL_PARTITION)}]"
                f"@{hd.get(h.ORIGINAL_OFFSET)}, {hd.get(h.ERROR_CLASS)}"
            )
            return
    finally:
        consumer.close()
