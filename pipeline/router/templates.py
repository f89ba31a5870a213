"""Notification templates: Jinja2 in a sandbox, one directory per template, with
translations in subdirectories named by locale.

    templates/welcome/subject.txt        one line; required for email
    templates/welcome/body.txt           plain-text body; required
    templates/welcome/body.html          HTML body; optional, autoescaped
    templates/welcome/pt/body.txt        the Portuguese translation (and its subject.txt,
    templates/welcome/pt-BR/body.txt     body.html), Brazilian Portuguese, ...

A render asks for a locale (the subscriber's, else the event's ``locale`` field): ``pt-BR``
uses ``pt-BR/`` if the template has it, else ``pt/``, else the files at the top, which are
the default (``HERALD_DEFAULT_LOCALE``, English). A part a translation lacks comes from the
default (``herald templates check`` reports it).

Templates are rendered in Jinja's SandboxedEnvironment with StrictUndefined: an event field
that a template names but the event lacks is an error (the rule's dead letter says so), not
an empty string in a customer's inbox. A field that is present but null (an optional field)
renders as empty text, never as "None".

Filters format for the render's locale (Babel) and the subscriber's time zone:
``format_date``, ``format_time``, ``format_datetime`` (a format name, short, medium, long or
full, or a CLDR pattern), ``format_number``, ``format_decimal``, ``format_percent`` and
``format_currency(amount, "EUR")``. Null renders as empty text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
from babel import Locale, UnknownLocaleError
from babel import dates as babel_dates
from babel import numbers as babel_numbers
from jinja2.sandbox import SandboxedEnvironment

__all__ = [
    "CONTEXT_NAMES",
    "PARTS",
    "Rendered",
    "TemplateRenderError",
    "Templates",
    "babel_locale",
    "locale_chain",
]

PARTS = ("subject.txt", "body.txt", "body.html")

# Names the router puts in every render's context, besides the event's fields (which they
# shadow): the event as a whole, its type, the subscriber (a dict: user_id, email, phone,
# locale, time_zone, custom; its values None when Herald has no record), the render's locale
# and time zone, the rule's category, channel and name, and the one-click unsubscribe URL
# (None when the notification has none).
CONTEXT_NAMES = (
    "event",
    "event_type",
    "subscriber",
    "locale",
    "time_zone",
    "category",
    "channel",
    "rule",
    "unsubscribe_url",
)

_TAG = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*$")


class TemplateRenderError(ValueError):
    """A template (or a rule's condition) failed for an event."""


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    body_text: str
    body_html: str | None
    locale: str | None = None  # the translation used (its directory), None: the default


def locale_chain(tag: str | None) -> list[str]:
    """``pt-BR`` -> ``["pt-br", "pt"]``: what to look for, most specific first, lower case
    with hyphens (``pt_BR`` is read as ``pt-BR``)."""
    if not tag or not _TAG.match(tag.strip()):
        return []
    parts = tag.strip().replace("_", "-").lower().split("-")
    return ["-".join(parts[:n]) for n in range(len(parts), 0, -1)]


@lru_cache(maxsize=256)
def babel_locale(tag: str | None, default: str = "en") -> Locale:
    """Babel's locale for a BCP 47 tag, or for ``default`` when the tag is absent or
    unknown to Babel."""
    for candidate in (tag, default, "en"):
        if not candidate:
            continue
        try:
            return Locale.parse(candidate.strip().replace("-", "_"))
        except (ValueError, UnknownLocaleError):
            continue
    return Locale("en")  # pragma: no cover - "en" always parses


@lru_cache(maxsize=256)
def _zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _finalize(value: Any) -> Any:
    return "" if value is None else value


class Templates:
    def __init__(self, directory: Path, default_locale: str = "en") -> None:
        self.directory = directory
        self.default_locale = default_locale
        self._env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(directory)),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            auto_reload=False,
            finalize=_finalize,
        )
        self._env.filters.update(self._filters())
        self._conditions: dict[str, Any] = {}
        self._strings: dict[str, Any] = {}
        self._translations: dict[str, dict[str, str]] = {}

    @property
    def env(self) -> SandboxedEnvironment:
        return self._env

    # -- translations -------------------------------------------------------------------------

    def translations(self, name: str) -> dict[str, str]:
        """The template's translations: lower-case tag -> directory name (``pt-br`` ->
        ``pt-BR``), those with a body.txt. Read once."""
        found = self._translations.get(name)
        if found is None:
            found = {}
            base = self.directory / name
            if base.is_dir():
                for sub in sorted(base.iterdir()):
                    if sub.is_dir() and _TAG.match(sub.name) and (sub / "body.txt").is_file():
                        found[sub.name.replace("_", "-").lower()] = sub.name
            self._translations[name] = found
        return found

    def translation_for(self, name: str, locale: str | None) -> str | None:
        """The directory of the translation a render in ``locale`` uses, or None for the
        default files."""
        available = self.translations(name)
        for tag in locale_chain(locale):
            if tag in available:
                return available[tag]
        return None

    # -- rendering ----------------------------------------------------------------------------

    def render(self, name: str, context: dict[str, Any], locale: str | None = None) -> Rendered:
        """Render template ``name`` in ``locale`` (its translation, or the default). The
        filters format for ``context["locale"]`` when given, else for ``locale``."""
        translation = self.translation_for(name, locale)
        if "locale" not in context:
            context = {**context, "locale": locale}
        subject = self._render_part(name, translation, "subject.txt", context)
        body_text = self._render_part(name, translation, "body.txt", context)
        if body_text is None:
            raise TemplateRenderError(f"template {name!r}: {name}/body.txt is missing")
        body_html = self._render_part(name, translation, "body.html", context)
        if subject is not None:
            # A subject is one header line; CR/LF would let an event inject headers.
            subject = " ".join(subject.split())
        return Rendered(subject, body_text, body_html, translation)

    def names(self) -> list[str]:
        """Every template in the directory: the subdirectories that hold a body.txt."""
        if not self.directory.is_dir():
            return []
        return sorted(p.parent.name for p in self.directory.glob("*/body.txt"))

    def check(self, names: set[str]) -> None:
        """Load every template named by the rules now, so a typo fails at start-up."""
        for name in sorted(names):
            if not (self.directory / name / "body.txt").is_file():
                raise TemplateRenderError(
                    f"template {name!r}: {self.directory / name / 'body.txt'} not found"
                )
            for path in self.files(name):
                try:
                    self._env.get_template(path)
                except jinja2.TemplateSyntaxError as e:
                    raise TemplateRenderError(f"{path}:{e.lineno}: {e.message}") from e

    def files(self, name: str) -> list[str]:
        """Every part of template ``name``, default and translations, as loader paths."""
        out = [f"{name}/{p}" for p in PARTS if (self.directory / name / p).is_file()]
        for sub in self.translations(name).values():
            out += [
                f"{name}/{sub}/{p}" for p in PARTS if (self.directory / name / sub / p).is_file()
            ]
        return out

    def render_string(self, source: str, context: dict[str, Any]) -> str:
        """Render a one-line template from a rule (``to``, ``data`` values)."""
        try:
            compiled = self._strings.get(source)
            if compiled is None:
                compiled = self._strings[source] = self._env.from_string(source)
            return " ".join(compiled.render(context).split())
        except Exception as e:  # Jinja errors and Python errors on the event's values
            raise TemplateRenderError(f"template {source!r}: {type(e).__name__}: {e}") from e

    def condition(self, expression: str, context: dict[str, Any]) -> bool:
        try:
            compiled = self._conditions.get(expression)
            if compiled is None:
                compiled = self._conditions[expression] = self._env.compile_expression(
                    expression, undefined_to_none=False
                )
            return bool(compiled(**context))
        except Exception as e:  # Jinja errors and Python errors on the event's values
            raise TemplateRenderError(f"condition {expression!r}: {type(e).__name__}: {e}") from e

    def _render_part(
        self, name: str, translation: str | None, part: str, context: dict[str, Any]
    ) -> str | None:
        path = f"{name}/{part}"
        if translation is not None and (self.directory / name / translation / part).is_file():
            path = f"{name}/{translation}/{part}"
        try:
            template = self._env.get_template(path)
        except jinja2.TemplateNotFound:
            return None
        try:
            return template.render(context).strip()
        except Exception as e:  # Jinja errors and Python errors on the event's values
            raise TemplateRenderError(f"template {path}: {type(e).__name__}: {e}") from e

    # -- filters ------------------------------------------------------------------------------

    def _filters(self) -> dict[str, Any]:
        default = self.default_locale

        def loc(ctx: Any) -> Locale:
            return babel_locale(ctx.get("locale"), default)

        def tz(ctx: Any) -> ZoneInfo | None:
            return _zone(ctx.get("time_zone"))

        def as_datetime(value: Any) -> datetime:
            if isinstance(value, datetime):
                return value if value.tzinfo else value.replace(tzinfo=UTC)
            if isinstance(value, int | float):  # epoch milliseconds
                return datetime.fromtimestamp(value / 1000, UTC)
            raise TypeError(f"expected a date and time, got {type(value).__name__}")

        @jinja2.pass_context
        def format_datetime(ctx: Any, value: Any, format: str = "medium") -> str:
            if value is None:
                return ""
            zone = tz(ctx) or UTC
            return str(
                babel_dates.format_datetime(
                    as_datetime(value), format, tzinfo=zone, locale=loc(ctx)
                )
            )

        @jinja2.pass_context
        def format_date(ctx: Any, value: Any, format: str = "medium") -> str:
            if value is None:
                return ""
            plain_date = isinstance(value, date) and not isinstance(value, datetime)
            if not plain_date:
                value = as_datetime(value).astimezone(tz(ctx) or UTC).date()
            return str(babel_dates.format_date(value, format, locale=loc(ctx)))

        @jinja2.pass_context
        def format_time(ctx: Any, value: Any, format: str = "medium") -> str:
            if value is None:
                return ""
            if not isinstance(value, time):
                value = as_datetime(value).astimezone(tz(ctx) or UTC).timetz()
            return str(babel_dates.format_time(value, format, locale=loc(ctx)))

        def number(value: Any) -> Decimal | int | float:
            if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
                raise TypeError(f"expected a number, got {type(value).__name__}")
            return Decimal(value) if isinstance(value, str) else value

        @jinja2.pass_context
        def format_decimal(ctx: Any, value: Any, format: str | None = None) -> str:
            if value is None:
                return ""
            return str(babel_numbers.format_decimal(number(value), format, locale=loc(ctx)))

        @jinja2.pass_context
        def format_percent(ctx: Any, value: Any, format: str | None = None) -> str:
            if value is None:
                return ""
            return str(babel_numbers.format_percent(number(value), format, locale=loc(ctx)))

        @jinja2.pass_context
        def format_currency(
            ctx: Any,
            value: Any,
            currency: str,
            format: str | None = None,
        ) -> str:
            if value is None:
                return ""
            return str(
                babel_numbers.format_currency(number(value), currency, format, locale=loc(ctx))
            )

        return {
            "format_datetime": format_datetime,
            "format_date": format_date,
            "format_time": format_time,
            "format_number": format_decimal,
            "format_decimal": format_decimal,
            "format_percent": format_percent,
            "format_currency": format_currency,
        }
