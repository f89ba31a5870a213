"""Per-partition offset windows: which offsets are in flight, and how far the partition's
committed offset may move. Pure bookkeeping, no I/O.

A record is *started* when the sink begins processing it (in offset order, as Kafka hands
them out), *completed* when its outcome is in a batch about to be recorded, and *released*
once that batch is recorded. Completions arrive in any order; the next offset only advances
over the contiguous run of completed offsets from the oldest started one, so it never moves
past a record whose outcome is not recorded. A record that is abandoned (the partition is
being given up while it waits) is released without being completed: the offset stops below
it and the next owner reads it again.
"""

from __future__ import annotations

from collections import deque

__all__ = ["TP", "OffsetWindow"]

TP = tuple[str, int]  # (topic, partition)


class OffsetWindow:
    """One partition's window, for one assignment of it (a regained partition gets a new
    window, so a late completion from the previous assignment cannot move the new one)."""

    def __init__(self, tp: TP, next_offset: int | None = None) -> None:
        self.tp = tp
        self.next_offset = next_offset  # what the ledger has, or will have once recorded
        self.in_flight = 0  # started and not yet released
        self.closed = False  # given up (revoked, lost or stopping): its offsets are not ours
        self._started: deque[int] = deque()  # started offsets, oldest first, not yet passed
        self._completed: set[int] = set()  # completed offsets not yet contiguous

    def has_room(self, limit: int) -> bool:
        return self.in_flight < max(1, limit)

    def start(self, offset: int) -> None:
        """Kafka hands a partition's records out in offset order, so ``offset`` is larger
        than every one started before it in this window."""
        self._started.append(offset)
        self.in_flight += 1

    def complete(self, offset: int) -> None:
        """The outcome of ``offset`` is in the batch being recorded."""
        self._completed.add(offset)

    def advance(self) -> int | None:
        """Move the next offset over the contiguous completed run; return it (None while
        nothing was ever passed and the ledger had no offset)."""
        started, completed = self._started, self._completed
        while started and started[0] in completed:
            first = started.popleft()
            completed.discard(first)
            self.next_offset = first + 1
        return self.next_offset

    def release(self) -> None:
        """The record's outcome is recorded (or it was abandoned): its slot is free."""
        self.in_flight -= 1

    @property
    def pending(self) -> list[int]:
        """Started offsets the next offset has not passed yet, oldest first."""
        return list(self._started)
