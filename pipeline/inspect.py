"""Reading topics back as JSON: what ``herald tail`` prints."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Any

from confluent_kafka import Message

from pipeline import headers as h
from pipeline.serialization import AvroSerde, DecodeError

__all__ = ["message_to_json", "to_jsonable"]


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def message_to_json(msg: Message, serde: AvroSerde) -> str:
    """One JSON line: coordinates, key, headers and the decoded value (or why it could not
    be decoded, with the raw bytes in base64)."""
    key = msg.key()
    out: dict[str, Any] = {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "timestamp": msg.timestamp()[1],
        "key": key.decode("utf-8", errors="replace") if key is not None else None,
        "headers": h.as_dict(msg.headers()),
    }
    try:
        decoded = serde.decode(
            msg.value(), topic=msg.topic(), partition=msg.partition(), offset=msg.offset()
        )
    except DecodeError as e:
        out["error"] = f"{type(e).__name__}: {e.reason}"
        value = msg.value()
        out["value_base64"] = base64.b64encode(value).decode() if value is not None else None
    else:
        out["schema"] = decoded.writer
        out["value"] = to_jsonable(decoded.record)
    return json.dumps(out, ensure_ascii=False)
