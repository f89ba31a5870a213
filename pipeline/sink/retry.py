"""Retry policy: which tier, how long to wait, and the headers a retry record carries.

A retryable failure is not retried in place: the intent is written to a retry topic with a
not-before time, the original record's offset moves on, and the sink picks the retry up when
it is due. Waiting holds back only that retry partition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline import headers as h

__all__ = [
    "RetryPolicy",
    "epoch_ms",
    "failure_headers",
    "original_coordinates",
    "parse_attempts",
    "parse_not_before",
]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    tiers: int
    backoff_ms: int
    backoff_max_ms: int

    def delay_ms(
        self, failed_attempts: int, retry_after_s: float | None, rng: random.Random
    ) -> int:
        """Capped exponential backoff with full jitter, never below the provider's
        Retry-After. ``failed_attempts`` counts the failure just seen (>= 1)."""
        cap = min(self.backoff_max_ms, self.backoff_ms * 2 ** (failed_attempts - 1))
        delay = rng.uniform(cap / 2, cap)  # "equal jitter": spreads retries, keeps a floor
        return int(max(delay, (retry_after_s or 0.0) * 1000))

    def tier(self, failed_attempts: int) -> int:
        """Tier 1 for the first failure, then up to the last tier, which takes the rest."""
        return min(max(failed_attempts, 1), self.tiers)

    def exhausted(self, failed_attempts: int) -> bool:
        return failed_attempts >= self.max_attempts


def _now_iso(now: datetime) -> bytes:
    return now.isoformat(timespec="milliseconds").encode()


def failure_headers(
    existing: h.Headers,
    *,
    failed_attempts: int,
    now: datetime,
    not_before_ms: int | None,
    original: tuple[str, int, int],
) -> h.Headers:
    """Headers for a retry (or dead) record. ``original`` is where the notification first
    appeared (see ``original_coordinates``); the failure history continues the one in
    ``existing`` when it has one for these coordinates."""
    current = h.as_dict(existing)
    topic, partition, offset = original
    same = (
        current.get(h.ORIGINAL_TOPIC) == topic
        and current.get(h.ORIGINAL_PARTITION) == str(partition)
        and current.get(h.ORIGINAL_OFFSET) == str(offset)
    )
    replaced = {
        h.ATTEMPTS,
        h.NOT_BEFORE,
        h.LAST_FAILED_AT,
        h.FIRST_FAILED_AT,
        h.ORIGINAL_TOPIC,
        h.ORIGINAL_PARTITION,
        h.ORIGINAL_OFFSET,
    }
    out: h.Headers = [(k, v) for k, v in existing if k not in replaced]
    first_failed = current.get(h.FIRST_FAILED_AT, "").encode() if same else b""
    out += [
        (h.ORIGINAL_TOPIC, topic.encode()),
        (h.ORIGINAL_PARTITION, str(partition).encode()),
        (h.ORIGINAL_OFFSET, str(offset).encode()),
        (h.ATTEMPTS, str(failed_attempts).encode()),
        (h.FIRST_FAILED_AT, first_failed or _now_iso(now)),
        (h.LAST_FAILED_AT, _now_iso(now)),
    ]
    if not_before_ms is not None:
        out.append((h.NOT_BEFORE, str(not_before_ms).encode()))
    return out


def original_coordinates(
    headers: dict[str, str], here: tuple[str, int, int], from_retry_topic: bool
) -> tuple[str, int, int]:
    """Where a notification first appeared: for a record read from a retry topic, the
    coordinates its headers carry; for any other record (including a dead letter replayed
    into the channel topic), its own."""
    if from_retry_topic:
        try:
            return (
                headers[h.ORIGINAL_TOPIC],
                int(headers[h.ORIGINAL_PARTITION]),
                int(headers[h.ORIGINAL_OFFSET]),
            )
        except (KeyError, ValueError):
            pass
    return here


def parse_attempts(headers: dict[str, str]) -> int:
    try:
        return max(0, int(headers.get(h.ATTEMPTS, "0")))
    except ValueError:
        return 0


def parse_not_before(headers: dict[str, str]) -> float:
    """Not-before as epoch seconds (0 when absent or unreadable: due now)."""
    try:
        return int(headers.get(h.NOT_BEFORE, "0")) / 1000
    except ValueError:
        return 0.0


def epoch_ms(now: datetime | None = None) -> int:
    return int((now or datetime.now(UTC)).timestamp() * 1000)
