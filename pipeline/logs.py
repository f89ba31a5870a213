"""Log output: text (the default) or JSON lines (``HERALD_LOG_FORMAT=json``).

A JSON line has ``ts``, ``level``, ``logger`` and ``message``, plus the record's context when
it has one: ``event_id``, ``notification_id``, ``channel``, ``topic``, ``partition``,
``offset``, ``trace_id`` (and ``error_class``, ``outcome``, ``attempts``). The router and the
sinks set the context of the record they are handling with :func:`context`, so every line
logged meanwhile carries it; a caller may also pass these keys with ``extra=``.

What never goes out: only the keys above are taken from ``extra=`` and the context (a
message body or a recipient's data passed as an extra is dropped), and the text of every
line has credentials masked (``user:password@`` in URLs, ``Authorization``/``Bearer``
values, ``password=``, ``token=``, ``secret=`` values, Standard Webhooks ``whsec_`` keys). Herald
logs no message body itself; the masking is the backstop for an error text that quotes a
URL or a header.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

__all__ = ["CONTEXT_KEYS", "JsonFormatter", "configure", "context", "mask_secrets"]

# The only keys a JSON line takes from extra= and the context.
CONTEXT_KEYS = (
    "event_id",
    "notification_id",
    "channel",
    "topic",
    "partition",
    "offset",
    "trace_id",
    "error_class",
    "outcome",
    "attempts",
)

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "herald_log_context", default=None
)


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (of CONTEXT_KEYS) to every line logged in this block, in this task."""
    current = _context.get()
    merged = {**current, **fields} if current else dict(fields)
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def update_context(**fields: Any) -> None:
    """Add ``fields`` to the innermost :func:`context` block (e.g. ids learnt after decoding)."""
    current = _context.get()
    if current is not None:
        current.update(fields)


_SECRETS = [
    # scheme://user:password@host -> scheme://user:***@host
    (re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+(?=@)"), r"\g<pre>***"),
    (re.compile(r"(?i)(?P<pre>\bbearer\s+)[^\s,;\"']+"), r"\g<pre>***"),
    (re.compile(r"(?i)(?P<pre>\bauthorization[\"']?\s*[:=]\s*[\"']?)[^\s,;\"']+"), r"\g<pre>***"),
    (
        re.compile(
            r"(?i)(?P<pre>\b(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)"
            r"[\"']?\s*[:=]\s*[\"']?)[^\s,;&\"']+"
        ),
        r"\g<pre>***",
    ),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), "whsec_***"),
]


def mask_secrets(text: str) -> str:
    """``text`` with credentials masked (see the module docstring)."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        ctx = _context.get()
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is None and ctx is not None:
                value = ctx.get(key)
            if value is not None:
                out[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            out["exception"] = mask_secrets(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exception"] = mask_secrets(record.exc_text)
        return json.dumps(out, ensure_ascii=False, default=str)


class _MaskingFormatter(logging.Formatter):
    """The text format, with the same masking."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


FORMATS = ("text", "json")


def configure(level: str, fmt: str | None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (text or json). Raises ValueError for another
    format."""
    fmt = (fmt or "text").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"HERALD_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
