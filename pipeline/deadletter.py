"""Dead-letter records: the original key, value and headers, plus headers saying where the
record came from and why it could not be processed. Any stage can write them; replay reads
them back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline import headers as h

__all__ = ["DeadLetter", "dead_letter", "record_size", "safe_header_text"]

_MAX_MESSAGE = 1000
# What Kafka adds to a record beyond its key, value and headers (length varints, attributes,
# timestamp and offset deltas; one record per batch in the worst case, hence the batch
# header too). Generous on purpose: under-counting would let a record past our check and
# into the broker's refusal.
RECORD_OVERHEAD = 128


def record_size(key: bytes | None, value: bytes | None, headers: h.Headers | None) -> int:
    """The bytes a record takes on the wire, as Kafka's size limits count them (an upper
    bound)."""
    size = RECORD_OVERHEAD + len(key or b"") + len(value or b"")
    for name, raw in headers or ():
        size += 10 + len(name.encode()) + (len(raw) if raw is not None else 0)
    return size


def safe_header_text(text: str, limit: int = _MAX_MESSAGE) -> str:
    """One line of at most ``limit`` characters: CR/LF from an error message (which may
    quote input) must not reach a header or a log line verbatim."""
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 1] + "…"


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: h.Headers


def dead_letter(
    dlq_topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: h.Headers | None,
    topic: str,
    partition: int,
    offset: int,
    error: BaseException,
    attempts: int = 0,
    error_class: str | None = None,
    max_bytes: int | None = None,
    extra: h.Headers | None = None,
) -> DeadLetter:
    """``error_class`` overrides the exception's class name (e.g. the provider's own error
    name when a connector refused the record).

    With ``max_bytes``, a dead letter that would be larger (the record was near the limit
    already, or over it: that may be why it is dead) is still written, never dropped: its
    value is cut to fit and ``herald-truncated`` / ``herald-original-size`` say so; the
    original stays at its coordinates (``herald-original-*``) for as long as that topic's
    retention keeps it."""
    ours = {
        h.ORIGINAL_TOPIC,
        h.ORIGINAL_PARTITION,
        h.ORIGINAL_OFFSET,
        h.ERROR_CLASS,
        h.ERROR_MESSAGE,
        h.FAILED_AT,
        h.ATTEMPTS,
        h.TRUNCATED,
        h.ORIGINAL_SIZE,
        h.ERROR_RULE,
    }
    extra = extra or []
    ours |= {k for k, _ in extra}
    kept = [(k, v) for k, v in (headers or []) if k not in ours]
    added: h.Headers = [
        (h.ORIGINAL_TOPIC, topic.encode()),
        (h.ORIGINAL_PARTITION, str(partition).encode()),
        (h.ORIGINAL_OFFSET, str(offset).encode()),
        (h.ERROR_CLASS, (error_class or type(error).__name__).encode()),
        (h.ERROR_MESSAGE, safe_header_text(str(error)).encode()),
        (h.FAILED_AT, datetime.now(UTC).isoformat(timespec="milliseconds").encode()),
        (h.ATTEMPTS, str(attempts).encode()),
        *extra,
    ]
    if max_bytes is None or record_size(key, value, [*kept, *added]) <= max_bytes:
        return DeadLetter(dlq_topic, key, value, [*kept, *added])
    return _truncated(dlq_topic, key, value, kept, added, max_bytes)


def _truncated(
    dlq_topic: str,
    key: bytes | None,
    value: bytes | None,
    kept: h.Headers,
    added: h.Headers,
    max_bytes: int,
) -> DeadLetter:
    cut = ["value"]
    marks: h.Headers = [
        (h.TRUNCATED, b""),
        (h.ORIGINAL_SIZE, str(record_size(key, value, [*kept, *added])).encode()),
    ]
    # The record's own headers and key can be large too; ours (coordinates, error) are
    # small and are what makes the dead letter useful, so they are kept.
    if record_size(key, b"", [*kept, *added, *marks]) > max_bytes:
        kept = []
        cut.append("headers")
    if record_size(key, b"", [*kept, *added, *marks]) > max_bytes:
        key = (key or b"")[:256]
        cut.append("key")
    marks[0] = (h.TRUNCATED, ",".join(cut).encode())
    headers = [*kept, *added, *marks]
    room = max(0, max_bytes - record_size(key, b"", headers))
    return DeadLetter(dlq_topic, key, (value or b"")[:room], headers)
