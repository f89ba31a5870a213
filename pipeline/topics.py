"""Every topic name Herald uses. Nothing else in the code spells one.

Names carry an optional prefix (``HERALD_TOPIC_PREFIX``) so that several Herald installations,
or test runs, can share one cluster.

Which names exist is not fixed here: event topics are per domain, and the domains are what
the event schemas declare (``herald.domain`` in schemas/); notification topics are per
channel, and the channels are what the installed connectors serve (the ``herald.connectors``
entry points). Callers pass both in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Topics"]


@dataclass(frozen=True)
class Topics:
    prefix: str = ""

    def events(self, domain: str) -> str:
        return f"{self.prefix}events.{domain}"

    def all_events(self, domains: Iterable[str]) -> list[str]:
        """Event topics are per domain: events.user carries user-registered and
        password-reset-requested, keyed by user id, so one user's events stay in order."""
        return [self.events(d) for d in domains]

    @property
    def events_dlq(self) -> str:
        """Records the router could not decode or map."""
        return f"{self.prefix}events.dlq"

    def notifications(self, channel: str) -> str:
        return f"{self.prefix}notifications.{channel}"

    def notifications_dlq(self, channel: str) -> str:
        return f"{self.prefix}notifications.{channel}.dlq"

    def notifications_retry(self, channel: str, tier: int) -> str:
        """Retry tier ``tier`` (1-based): records wait there until their not-before time."""
        return f"{self.prefix}notifications.{channel}.retry.{tier}"

    @property
    def status(self) -> str:
        return f"{self.prefix}notifications.status"

    # State about people: compacted topics (docs/architecture.md, "People").

    @property
    def subscribers(self) -> str:
        """Subscriber records keyed by user id, co-partitioned with the event topics."""
        return f"{self.prefix}people.subscribers"

    @property
    def preferences(self) -> str:
        """Preferences records keyed by user id, co-partitioned with the event topics."""
        return f"{self.prefix}people.preferences"

    @property
    def suppressions(self) -> str:
        """Suppression records keyed by channel and address; every router reads all of it."""
        return f"{self.prefix}people.suppressions"

    def people(self) -> list[str]:
        """The compacted topics (cleanup.policy=compact)."""
        return [self.subscribers, self.preferences, self.suppressions]

    def all(
        self, domains: Iterable[str], channels: Iterable[str], retry_tiers: int = 3
    ) -> list[str]:
        names = [*self.all_events(domains), self.events_dlq, self.status, *self.people()]
        for channel in channels:
            names += [self.notifications(channel), self.notifications_dlq(channel)]
            names += [self.notifications_retry(channel, t) for t in range(1, retry_tiers + 1)]
        return names
