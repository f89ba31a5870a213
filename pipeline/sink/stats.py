"""Counters of one sink worker, for logs, benchmarks and tests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SinkStats"]


@dataclass
class SinkStats:
    sent: int = 0
    rejected: int = 0  # by the provider or the runtime's limits (PayloadTooLarge)
    dead: int = 0
    retried: int = 0  # written to a retry topic
    throttled: int = 0  # a retry-after paused the channel; the same attempt goes again
    skipped: int = 0  # done already, or a stale retry
    abandoned: int = 0  # given up unsent while paused, when the partition went away
    undecodable: int = 0
    recorded: int = 0  # outcomes written to the ledger
    commits: int = 0  # group commits
