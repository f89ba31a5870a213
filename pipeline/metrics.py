"""Every Prometheus metric Herald exports, in one place (names ``herald_*``).

The router, the sinks and the API increment these; ``pipeline.observe`` serves them on
``/metrics`` (the API on its own port). One process may hold the router and several sinks
(``herald run all``): they share the process's default registry, told apart by labels.

Labels are bounded: ``stage`` (router, sink), ``channel``, ``outcome``, ``error_class``,
``topic`` and ``partition`` (Herald's own topics), and for the API the route's pattern and
the status code. No id (event, notification, recipient) is ever a label. A label value that
comes from outside Herald's code (a provider's error class, a connector of another
distribution) passes through :func:`bounded` first.

Latency is measured from the event's time to the provider's acceptance: the router puts the
event's ``occurred_at`` on each intent as the ``herald-event-time`` header (no schema
change); intents without it (direct notifications, redrives) are measured from their
``created_at``.
"""

from __future__ import annotations

import re
import threading

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

__all__ = [
    "API_IN_FLIGHT",
    "API_REQUESTS",
    "API_REQUEST_SECONDS",
    "BREAKER_OPENED",
    "BREAKER_STATE",
    "CONSUMED",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "DEFERRED",
    "DELIVERIES",
    "DELIVERY_LATENCY",
    "GRPC_REQUESTS",
    "IN_FLIGHT",
    "PUBLISHED",
    "RETRIES",
    "ROUTED",
    "ROUTER_EVENTS",
    "ROUTER_HELD",
    "SEND_SECONDS",
    "SUPPRESSED",
    "bounded",
    "router_held",
]

# No "<name>_created" series beside each counter and histogram: Prometheus does not need them
# and they double what a scrape returns.
disable_created_metrics()  # type: ignore[no-untyped-call]

# -- router (RouterHandler, called by every router loop) -----------------------------------

CONSUMED = Counter(
    "herald_consumed",
    "Records read, by stage (router: event topics; sink: a channel's topic and retry tiers).",
    ["stage", "topic"],
)
ROUTER_EVENTS = Counter(
    "herald_router_events",
    "Events the router handled, by outcome: routed (one or more intents), no_rule (no rule "
    "matched: nothing to send), dead_lettered.",
    ["outcome"],
)
ROUTED = Counter(
    "herald_routed",
    "Notification intents the router wrote, by channel.",
    ["channel"],
)
ROUTER_HELD = Gauge(
    "herald_router_held",
    "1 while the router holds an event because the schema registry cannot answer (the "
    "partitions behind it wait), else 0.",
)

# -- sinks ---------------------------------------------------------------------------------

DELIVERIES = Counter(
    "herald_deliveries",
    "Sink outcomes, by channel and outcome: sent, rejected, dead (attempts exhausted), "
    "retrying (written to a retry tier), throttled (the provider asked to wait), skipped "
    "(done already, or a stale retry), abandoned (given up unsent on a revocation).",
    ["channel", "outcome"],
)
RETRIES = Counter(
    "herald_retries",
    "Retry records written, by channel and retry topic (tier).",
    ["channel", "topic"],
)
DEAD_LETTERS = Counter(
    "herald_dead_letters",
    "Dead letters written, by stage, channel (empty for the router's events.dlq) and error class.",
    ["stage", "channel", "error_class"],
)
SUPPRESSED = Counter(
    "herald_suppressed",
    "Notifications the router did not make because the person opted out or the address is "
    "suppressed (each is a SUPPRESSED status), by channel.",
    ["channel"],
)
DEFERRED = Counter(
    "herald_deferred",
    "Notifications deferred (quiet hours, send-at, caps, digests), by channel. Herald does "
    "not defer yet: declared so dashboards and alerts can name it; stays 0.",
    ["channel"],
)
BREAKER_STATE = Gauge(
    "herald_breaker_state",
    "The sink's circuit breaker for the channel's provider: 0 closed, 1 half-open, 2 open.",
    ["channel"],
)
BREAKER_OPENED = Counter(
    "herald_breaker_opened",
    "Times the channel's circuit breaker opened.",
    ["channel"],
)
IN_FLIGHT = Gauge(
    "herald_in_flight",
    "Records in the sink's windows: started and not yet recorded in the ledger.",
    ["channel"],
)
CONSUMER_LAG = Gauge(
    "herald_consumer_lag",
    "Records not yet done per assigned partition: the partition's last stable offset minus "
    "the group's committed offset (librdkafka statistics, every HERALD_KAFKA_STATS_INTERVAL_MS).",
    ["stage", "topic", "partition"],
)
DELIVERY_LATENCY = Histogram(
    "herald_delivery_latency_seconds",
    "From the event's time (or a direct notification's creation) to the provider's "
    "acceptance, for sent notifications, by channel.",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
SEND_SECONDS = Histogram(
    "herald_send_seconds",
    "Duration of one provider call (connector.send), by channel and outcome (sent, "
    "retryable, rejected).",
    ["channel", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# -- API -----------------------------------------------------------------------------------

API_REQUESTS = Counter(
    "herald_api_requests",
    "HTTP API requests, by method, route pattern and status code.",
    ["method", "route", "status"],
)
API_REQUEST_SECONDS = Histogram(
    "herald_api_request_seconds",
    "HTTP API request duration, by route pattern.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_IN_FLIGHT = Gauge("herald_api_in_flight", "HTTP API requests being handled.")
GRPC_REQUESTS = Counter(
    "herald_grpc_requests",
    "gRPC API calls, by method and status code.",
    ["method", "status"],
)
PUBLISHED = Counter(
    "herald_published",
    "Records the API wrote and Kafka acknowledged (events and direct notifications), by topic.",
    ["topic"],
)


def router_held(held: bool) -> None:
    """Called by a router loop when it starts and stops holding an event."""
    ROUTER_HELD.set(1 if held else 0)


# A label value from outside Herald's own code: short, plain, and one of at most
# _MAX_VALUES distinct values per process; anything else is "other".
_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_MAX_VALUES = 200
_seen: set[str] = set()
_seen_lock = threading.Lock()


def bounded(value: str | None, default: str = "none") -> str:
    """``value`` as a label value that cannot blow up the number of series."""
    if not value:
        return default
    if value in _seen:
        return value
    if not _LABEL.fullmatch(value):
        return "other"
    with _seen_lock:
        if len(_seen) >= _MAX_VALUES:
            return "other"
        _seen.add(value)
    return value
