"""Dead-letter records: the original key, value and headers, plus headers saying where the
record came from and why it could not be processed. Any stage can write them; replay reads
them back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline import headers as h

__all__ = ["DeadLetter", "dead_letter", "safe_header_text"]

_MAX_MESSAGE = 1000


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
) -> DeadLetter:
    """``error_class`` overrides the exception's class name (e.g. the provider's own error
    name when a connector refused the record)."""
    ours = {
        h.ORIGINAL_TOPIC,
        h.ORIGINAL_PARTITION,
        h.ORIGINAL_OFFSET,
        h.ERROR_CLASS,
        h.ERROR_MESSAGE,
        h.FAILED_AT,
        h.ATTEMPTS,
    }
    kept = [(k, v) for k, v in (headers or []) if k not in ours]
    kept += [
        (h.ORIGINAL_TOPIC, topic.encode()),
        (h.ORIGINAL_PARTITION, str(partition).encode()),
        (h.ORIGINAL_OFFSET, str(offset).encode()),
        (h.ERROR_CLASS, (error_class or type(error).__name__).encode()),
        (h.ERROR_MESSAGE, safe_header_text(str(error)).encode()),
        (h.FAILED_AT, datetime.now(UTC).isoformat(timespec="milliseconds").encode()),
        (h.ATTEMPTS, str(attempts).encode()),
    ]
    return DeadLetter(dlq_topic, key, value, kept)
