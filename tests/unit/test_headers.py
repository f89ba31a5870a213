"""The one helper that builds record headers, and trace context validation."""

from __future__ import annotations

import pytest

from pipeline import headers as h

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_for_record_writes_every_id_it_has_as_text() -> None:
    hdrs = h.for_record(
        schema_ref="herald.notifications.NotificationIntent@abc",
        event_type="user-registered",
        event_id="e-1",
        notification_id="n-1",
        traceparent=TP,
    )
    assert h.as_dict(hdrs) == {
        h.EVENT_TYPE: "user-registered",
        h.EVENT_ID: "e-1",
        h.NOTIFICATION_ID: "n-1",
        h.CONTENT_TYPE: "application/avro",
        h.SCHEMA: "herald.notifications.NotificationIntent@abc",
        h.TRACEPARENT: TP,
    }
    assert all(isinstance(v, bytes) for _, v in hdrs)


def test_for_record_leaves_out_what_it_does_not_have() -> None:
    hdrs = h.for_record(schema_ref="x@1", notification_id="n-1")
    assert [k for k, _ in hdrs] == [h.NOTIFICATION_ID, h.CONTENT_TYPE, h.SCHEMA]


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (TP, True),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),  # zero trace id
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),  # zero span id
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),  # upper case
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),  # version
        (TP + "\r\nX: y", False),
        (TP + "\n", False),
        ("", False),
        (None, False),
    ],
)
def test_valid_traceparent(value: str | None, valid: bool) -> None:
    assert h.valid_traceparent(value) == (value if valid else None)
