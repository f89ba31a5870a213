"""librdkafka's statistics as Herald's metrics and health: consumer lag per assigned
partition, and whether a broker answers.

A consumer built with :meth:`KafkaStats.config` gets librdkafka's statistics JSON every
``HERALD_KAFKA_STATS_INTERVAL_MS`` (5 s; 0 turns it off) on its polling thread, which costs
one JSON parse per interval and no request to the broker: librdkafka already knows each
partition's last stable offset and the group's committed offset from its fetches and
commits. ``herald_consumer_lag{stage, topic, partition}`` is their difference (what
``kafka-consumer-groups --describe`` shows); a partition that goes away loses its series.

Broker reachability: a statistics snapshot with a broker in state UP means reachable; one
with none, or librdkafka's "all brokers down" error, means not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any

from confluent_kafka import KafkaError

from pipeline.metrics import CONSUMER_LAG

__all__ = ["KafkaStats"]

log = logging.getLogger(__name__)


class KafkaStats:
    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._lock = threading.Lock()
        self._series: set[tuple[str, str]] = set()  # (topic, partition) with a lag series
        self.broker_up: bool | None = None  # None: not known yet
        self.lag: dict[tuple[str, int], int] = {}

    def config(self, interval_ms: int) -> dict[str, Any]:
        """The librdkafka settings that feed this object (merge into a client's config)."""
        conf: dict[str, Any] = {"error_cb": self.on_error}
        if interval_ms > 0:
            conf["statistics.interval.ms"] = interval_ms
            conf["stats_cb"] = self.on_stats
        return conf

    def on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.broker_up = False
        # librdkafka logs the error itself.

    def on_stats(self, raw: str) -> None:
        try:
            stats = json.loads(raw)
            self.update(stats)
        except Exception:  # a malformed snapshot must not break the consumer's poll
            log.debug("unreadable librdkafka statistics", exc_info=True)

    def update(self, stats: dict[str, Any]) -> None:
        brokers = [b for b in (stats.get("brokers") or {}).values() if b.get("nodeid", -1) >= 0]
        if brokers:
            self.broker_up = any(b.get("state") == "UP" for b in brokers)
        lag: dict[tuple[str, int], int] = {}
        for topic, t in (stats.get("topics") or {}).items():
            for p in (t.get("partitions") or {}).values():
                partition = int(p.get("partition", -1))
                if partition < 0 or not p.get("desired"):
                    continue  # librdkafka's internal partition, or not assigned to us
                lag[(topic, partition)] = _lag(p)
        series = {(t, str(n)) for t, n in lag}
        with self._lock:
            for gone_topic, gone_partition in self._series - series:
                with contextlib.suppress(KeyError):
                    CONSUMER_LAG.remove(self.stage, gone_topic, gone_partition)
            for (name, number), value in lag.items():
                CONSUMER_LAG.labels(self.stage, name, str(number)).set(value)
            self._series = series
            self.lag = lag

    def close(self) -> None:
        """Drop this client's lag series (it no longer consumes)."""
        with self._lock:
            for topic, partition in self._series:
                with contextlib.suppress(KeyError):
                    CONSUMER_LAG.remove(self.stage, topic, partition)
            self._series = set()


def _lag(p: dict[str, Any]) -> int:
    """librdkafka's consumer_lag (last stable or high offset minus committed); before the
    group committed anything on the partition, the end minus the position (or the start)."""
    lag = int(p.get("consumer_lag", -1))
    if lag >= 0:
        return lag
    end = int(p.get("ls_offset", -1))
    if end < 0:
        end = int(p.get("hi_offset", -1))
    if end < 0:
        return 0
    position = int(p.get("app_offset", -1))
    if position < 0:
        position = int(p.get("lo_offset", -1))
    return max(0, end - position) if position >= 0 else 0
