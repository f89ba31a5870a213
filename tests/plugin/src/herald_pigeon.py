"""A channel from outside Herald: writes each notification as one JSON line to an outbox
file (HERALD_PIGEON_OUTBOX). It knows only Herald's channel contract."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors.base import Connector, DeliveryResult
from pipeline.records import NotificationIntent


class PigeonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HERALD_PIGEON_", extra="ignore")

    outbox: Path = Path("pigeon-outbox.jsonl")


class PigeonConnector(Connector):
    channel = "pigeon"
    settings_class = PigeonSettings

    def __init__(self, settings: PigeonSettings) -> None:
        self.outbox = settings.outbox

    async def send(self, intent: NotificationIntent) -> DeliveryResult:
        line = json.dumps(
            {
                "idempotency_key": intent.idempotency_key,
                "notification_id": intent.notification_id,
                "recipient": intent.recipient,
                "subject": intent.subject,
                "body_text": intent.body_text,
            }
        )
        with open(self.outbox, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return DeliveryResult.sent("written to the outbox", intent.idempotency_key)
