"""Notification templates: Jinja2 in a sandbox, one directory per template.

    templates/welcome/subject.txt     one line; required for email
    templates/welcome/body.txt        plain-text body; required
    templates/welcome/body.html       HTML body; optional, autoescaped

Templates are rendered in Jinja's SandboxedEnvironment with StrictUndefined: an event field
that a template names but the event lacks is an error (the event goes to the DLQ), not an
empty string in a customer's inbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

__all__ = ["Rendered", "TemplateRenderError", "Templates"]


class TemplateRenderError(ValueError):
    """A template (or a rule's condition) failed for an event."""


@dataclass(frozen=True)
class Rendered:
    subject: str | None
    body_text: str
    body_html: str | None


class Templates:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(directory)),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            auto_reload=False,
        )
        self._conditions: dict[str, Any] = {}
        self._strings: dict[str, Any] = {}

    def render(self, name: str, context: dict[str, Any]) -> Rendered:
        subject = self._render_optional(f"{name}/subject.txt", context)
        body_text = self._render_optional(f"{name}/body.txt", context)
        if body_text is None:
            raise TemplateRenderError(f"template {name!r}: {name}/body.txt is missing")
        body_html = self._render_optional(f"{name}/body.html", context)
        if subject is not None:
            # A subject is one header line; CR/LF would let an event inject headers.
            subject = " ".join(subject.split())
        return Rendered(subject=subject, body_text=body_text, body_html=body_html)

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
            for part in ("subject.txt", "body.txt", "body.html"):
                if (self.directory / name / part).is_file():
                    try:
                        self._env.get_template(f"{name}/{part}")
                    except jinja2.TemplateSyntaxError as e:
                        raise TemplateRenderError(f"{name}/{part}:{e.lineno}: {e.message}") from e

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

    def _render_optional(self, path: str, context: dict[str, Any]) -> str | None:
        try:
            template = self._env.get_template(path)
        except jinja2.TemplateNotFound:
            return None
        try:
            return template.render(context).strip()
        except Exception as e:  # Jinja errors and Python errors on the event's values
            raise TemplateRenderError(f"template {path}: {type(e).__name__}: {e}") from e
