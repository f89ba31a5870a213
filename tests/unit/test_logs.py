"""HERALD_LOG_FORMAT=json: one JSON object per line with the record's context, never a
secret or a message body."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from pipeline import logs


def line(record: logging.LogRecord) -> dict[str, object]:
    out = json.loads(logs.JsonFormatter().format(record))
    assert isinstance(out, dict)
    return out


def make(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "pipeline.sink.runtime",
        logging.WARNING,
        __file__,
        1,
        msg,
        args,
        sys.exc_info() if exc else None,
    )
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_a_line_has_time_level_logger_message_and_the_records_context() -> None:
    with logs.context(channel="email", topic="notifications.email", partition=2, offset=41):
        logs.update_context(notification_id="n-1", event_id="e-1")
        out = line(make("%s rejected %s", "email", "n-1"))
    assert out["level"] == "WARNING"
    assert out["logger"] == "pipeline.sink.runtime"
    assert out["message"] == "email rejected n-1"
    assert str(out["ts"]).endswith("+00:00")
    assert out["channel"] == "email"
    assert (out["topic"], out["partition"], out["offset"]) == ("notifications.email", 2, 41)
    assert (out["notification_id"], out["event_id"]) == ("n-1", "e-1")
    # Outside the block, no context.
    assert "notification_id" not in line(make("idle"))


def test_extra_fields_are_taken_only_from_the_known_keys() -> None:
    out = line(
        make(
            "sent",
            outcome="SENT",
            attempts=2,
            body_text="Dear Ada, your password reset code is 123456",
            recipient="ada@example.com",
            subject="Reset",
        )
    )
    assert out["outcome"] == "SENT" and out["attempts"] == 2
    text = json.dumps(out)
    assert "123456" not in text and "ada@example.com" not in text and "Reset" not in text


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        ("cannot open ledger postgresql://herald:hunter2@db:5432/ledger", "hunter2"),
        ("request failed: Authorization: Bearer s3cret-api-token", "s3cret-api-token"),
        ("login failed password=correct-horse", "correct-horse"),
        ("registry answered 401 for token=abc.def.ghi", "abc.def.ghi"),
        (
            "bad signing key whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
    ],
)
def test_credentials_in_a_message_are_masked(message: str, secret: str) -> None:
    out = line(make(message))
    assert secret not in json.dumps(out)
    assert "***" in str(out["message"])


def test_a_traceback_is_masked_too() -> None:
    try:
        raise ConnectionError("postgresql://herald:hunter2@db/ledger refused")
    except ConnectionError:
        out = line(make("ledger down", exc=True))
    assert "ConnectionError" in str(out["exception"])
    assert "hunter2" not in json.dumps(out)


def test_configure_picks_the_format_and_refuses_an_unknown_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        logging.getLogger("herald.test").info("hello %s", "there")
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(err)["message"] == "hello there"
        logs.configure("INFO", "text")
        logging.getLogger("herald.test").info("token=abc")
        assert "herald.test: token=***" in capsys.readouterr().err
        with pytest.raises(ValueError, match="HERALD_LOG_FORMAT"):
            logs.configure("INFO", "xml")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
