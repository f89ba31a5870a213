"""Every channel end to end: one user-registered event fans out through the router to seven
channels, and each local peer sees its delivery with the provider's protocol checked
(signature verified, payload decrypted, auth checked)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connectors.webhook import new_secret
from connectors.webpush import generate_vapid_key
from devtools.smtp_catcher import SmtpCatcher
from pipeline import headers as h
from pipeline.kafka.admin import ensure_topics
from pipeline.publisher import Publisher
from pipeline.records import DELIVERY_STATUS, DeliveryState
from pipeline.settings import HeraldSettings
from pipeline.topics import Topics
from tests.connectors import test_apns as apns
from tests.connectors import test_fcm as fcm
from tests.connectors import test_slack as slack
from tests.connectors import test_sms as sms
from tests.connectors import test_webhook as webhook
from tests.connectors.peers import serve_aiohttp, serve_h2
from tests.connectors.pushservice import PushService
from tests.integration.kafkautil import read_all
from tests.integration.procs import HeraldProcess, herald_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHANNELS = ["email", "sms", "webhook", "slack", "webpush", "fcm", "apns"]


def rules(webhook_base: str, slack_url: str, subscription: str) -> str:
    def rule(channel: str, target: str) -> str:
        return (
            f'[[rules]]\nname = "welcome-{channel}"\nevent = "user-registered"\n'
            f'channel = "{channel}"\n{target}\ntemplate = "welcome"\n'
            'data = { user = "{{ user_id }}" }\n'
        )

    return "\n".join(
        [
            rule("email", 'recipient = "email"'),
            # phone is optional: without the condition, herald rules check (and the router's
            # start) refuses the rule, since events without it would be dead-lettered.
            rule("sms", 'recipient = "phone"\nwhen = "phone is not none"'),
            rule("webhook", f"to = {json.dumps(webhook_base + '/hooks/{{ user_id }}')}"),
            rule("slack", f"to = {json.dumps(slack_url)}"),
            # Push addresses would come from a device registry; here they are constants.
            rule("webpush", f"to = {json.dumps(subscription)}"),
            rule("fcm", f"to = {json.dumps(fcm.DEVICE)}"),
            rule("apns", f"to = {json.dumps(apns.DEVICE)}"),
        ]
    )


async def _until(what: str, check: object, proc: HeraldProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline or not proc.alive():
            raise AssertionError(f"no delivery on {what}; herald run all said:\n{proc.tail(80)}")
        await asyncio.sleep(0.25)


async def test_one_event_reaches_every_channel(settings: HeraldSettings, tmp_path: Path) -> None:
    import trustme

    secret = new_secret()
    receiver = webhook.Receiver(knows=[secret])
    twilio = sms.FakeTwilio()
    google_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    google = fcm.FakeGoogle(google_key.public_key())
    apns_key = ec.generate_private_key(ec.SECP256R1())
    apple = apns.FakeApns(apns_key.public_key())
    fake_slack = slack.FakeSlack()
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    vapid_private, vapid_public = generate_vapid_key()

    async with (
        webhook.receiving(receiver) as webhook_base,
        serve_aiohttp(twilio.app()) as twilio_url,
        serve_aiohttp(google.app()) as google_url,
        serve_h2(apple, ca, tmp_path) as apple_url,
        slack.fake_slack(fake_slack) as slack_base,
        PushService() as push,
    ):
        google.token_uri = f"{google_url}/token"
        subscriber = push.subscribe(application_server_key=vapid_public)
        slack_url = f"{slack_base}{slack.TEAM}/{slack.BOT}/{slack.OK}"
        rules_file = tmp_path / "rules.toml"
        rules_file.write_text(rules(webhook_base, slack_url, subscriber.recipient()))
        with SmtpCatcher() as smtp:
            s = HeraldSettings.model_validate(
                {
                    **settings.model_dump(),
                    "rules_file": rules_file,
                    "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}",
                }
            )
            ensure_topics(s)
            env = herald_env(
                s,
                HERALD_SMTP_PORT=str(smtp.port),
                HERALD_WEBHOOK_SECRETS=json.dumps({"default": [secret]}),
                HERALD_WEBHOOK_ALLOW_HOSTS='["127.0.0.0/8"]',
                HERALD_SLACK_BASE_URL=slack_base,
                HERALD_SLACK_ALLOW_HOSTS='["127.0.0.0/8"]',
                HERALD_SMS_BASE_URL=twilio_url,
                HERALD_SMS_ALLOW_HOSTS="127.0.0.1",
                HERALD_SMS_ACCOUNT_SID=sms.ACCOUNT_SID,
                HERALD_SMS_AUTH_TOKEN=sms.AUTH_TOKEN,
                HERALD_SMS_FROM_NUMBER=sms.FROM,
                HERALD_SMS_DEFAULT_REGION="GB",
                HERALD_FCM_BASE_URL=google_url,
                HERALD_FCM_SERVICE_ACCOUNT_JSON=fcm.service_account(google_key),
                HERALD_FCM_TOKEN_URI=f"{google_url}/token",
                HERALD_APNS_BASE_URL=apple_url,
                HERALD_APNS_TEAM_ID=apns.TEAM_ID,
                HERALD_APNS_KEY_ID=apns.KEY_ID,
                HERALD_APNS_PRIVATE_KEY=apns.pem(apns_key),
                HERALD_APNS_TOPIC=apns.TOPIC,
                HERALD_APNS_CA_FILE=str(ca_file),
                HERALD_WEBPUSH_VAPID_PRIVATE_KEY=vapid_private,
                HERALD_WEBPUSH_VAPID_SUBJECT="mailto:ops@example.com",
                HERALD_WEBPUSH_ALLOW_HOSTS="127.0.0.1",
            )
            proc = HeraldProcess("run-all", ["run", "all", *CHANNELS], env, tmp_path).start()
            try:
                uid = f"u-{uuid.uuid4().hex[:8]}"
                event = Publisher(s, producer_name="tests").publish_sync(
                    "user-registered",
                    {
                        "user_id": uid,
                        "email": f"{uid}@example.com",
                        "display_name": "Fan Out",
                        "phone": "07911 123456",  # a UK national number: E.164 +447911123456
                    },
                )
                await _until("email", lambda: smtp.to(f"{uid}@example.com"), proc)
                await _until("sms", lambda: twilio.created, proc)
                await _until("webhook", lambda: receiver.requests, proc)
                await _until("slack", lambda: fake_slack.posts, proc)
                await _until("webpush", lambda: push.pushed, proc)
                await _until("fcm", lambda: google.sends, proc)
                await _until("apns", lambda: apple.requests, proc)
                statuses = await asyncio.to_thread(_sent_channels, s, event.event_id)
            finally:
                proc.stop()
                log = proc.tail(60)

    # Each peer checked its protocol; here: what it received.
    [message] = smtp.to(f"{uid}@example.com")
    assert message.message["Subject"] == "Welcome to Herald, Fan Out!"
    [created] = twilio.created.values()
    assert created["to"] == "+447911123456" and created["from"] == sms.FROM
    assert "your account is ready" in created["body"]
    [hook] = receiver.requests
    assert hook.path == f"/hooks/{uid}" and hook.verified_by == [secret]  # Standard Webhooks
    body = json.loads(hook.body)
    assert body["type"] == "user-registered" and body["data"]["data"] == {"user": uid}
    [(token, post)] = fake_slack.posts
    assert token == slack.OK and post["text"].startswith("Welcome to Herald, Fan Out!")
    [pushed] = push.pushed  # decrypted with the subscription's private key, VAPID verified
    assert pushed.payload["title"] == "Welcome to Herald, Fan Out!"
    assert pushed.claims["sub"] == "mailto:ops@example.com"
    [sent] = google.sends
    assert sent["bearer"] in google.issued  # an OAuth2 token from the service-account grant
    assert sent["body"]["message"]["token"] == fcm.DEVICE
    assert sent["body"]["message"]["notification"]["title"] == "Welcome to Herald, Fan Out!"
    [req] = apple.requests  # HTTP/2, ES256 provider token verified
    assert req.http_version == "2" and req.path == f"/3/device/{apns.DEVICE}"
    assert json.loads(req.body)["aps"]["alert"]["title"] == "Welcome to Herald, Fan Out!"
    assert statuses == set(CHANNELS), log


def _sent_channels(s: HeraldSettings, event_id: str) -> set[str]:
    serde = Publisher(s).serde
    deadline = time.monotonic() + 60
    while True:
        channels = set()
        for msg in read_all(s.kafka_bootstrap_servers, Topics(s.topic_prefix).status):
            if h.as_dict(msg.headers()).get(h.EVENT_ID) == event_id:
                rec = serde.decode(msg.value(), expect=DELIVERY_STATUS).record
                if rec["state"] == DeliveryState.SENT.value:
                    channels.add(rec["channel"])
        if channels == set(CHANNELS) or time.monotonic() > deadline:
            return channels
        time.sleep(0.5)
