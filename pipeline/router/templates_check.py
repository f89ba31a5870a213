"""``herald templates check``: every problem of the templates that can be found before an
event meets them (``herald rules check``, pipeline/router/check.py, checks the rules).

- **Translations.** A locale that any template has is one every template must have, with
  the same parts (subject.txt, body.txt, body.html) as its default files: otherwise some
  people get one message in their language and the next one in another.
- **Syntax.** Every file of every template parses.
- **Variables.** For each rule, the names its template, ``to``, ``data`` and ``when`` use
  (``jinja2.meta.find_undeclared_variables``) must be fields of the rule's event schema
  (its newest version) or names the router puts in the context (``CONTEXT_NAMES``) or
  Jinja's globals.
- **Rendering.** For each rule and each locale, the template renders with an example event
  made from the schema twice: every field filled, and every optional field null (where a
  ``{{ expires_at.strftime(...) }}`` on a null field would fail in production).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import jinja2
from jinja2 import meta

from pipeline.router.rules import Rule, RuleSet
from pipeline.router.templates import CONTEXT_NAMES, PARTS, TemplateRenderError, Templates
from pipeline.schemas import SchemaError, SchemaSet

__all__ = ["Problem", "check_templates", "example_record"]

EXAMPLE_TIME = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)


@dataclass(frozen=True)
class Problem:
    where: str  # a file, a template or a rule
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def check_templates(templates: Templates, rules: RuleSet, schemas: SchemaSet) -> list[Problem]:
    problems: list[Problem] = []
    names = sorted(
        p.name for p in templates.directory.iterdir() if p.is_dir() and (p / "body.txt").is_file()
    )
    problems += _translations(templates, names)
    for name in names:
        for path in templates.files(name):
            try:
                templates.env.get_template(path)
            except jinja2.TemplateSyntaxError as e:
                problems.append(Problem(f"{path}:{e.lineno}", f"syntax error: {e.message}"))
    for rule in rules.rules:
        problems += _rule(templates, rule, schemas)
    return problems


def _translations(templates: Templates, names: list[str]) -> list[Problem]:
    problems = []
    having: dict[str, list[str]] = {}  # locale directory -> templates that have it
    for name in names:
        for sub in templates.translations(name).values():
            having.setdefault(sub, []).append(name)
    for locale, owners in sorted(having.items()):
        for name in names:
            found = templates.translation_for(name, locale)
            if found is None or found.lower() != locale.lower():
                problems.append(
                    Problem(
                        f"{templates.directory / name}",
                        f"missing translation {locale} ({', '.join(owners)} "
                        f"{'has' if len(owners) == 1 else 'have'} one): add {name}/{locale}/",
                    )
                )
                continue
            for part in PARTS:
                default = (templates.directory / name / part).is_file()
                translated = (templates.directory / name / found / part).is_file()
                if default and not translated:
                    problems.append(
                        Problem(
                            f"{templates.directory / name / found}",
                            f"missing {part} (the default has one)",
                        )
                    )
    return problems


def _rule(templates: Templates, rule: Rule, schemas: SchemaSet) -> list[Problem]:
    where = f"rule {rule.name!r}"
    try:
        event = schemas.event_type(rule.event)
        schema = schemas.latest(event.full_name)
    except SchemaError as e:
        return [Problem(where, str(e))]
    fields = {f["name"] for f in schema.definition.get("fields", [])}
    known = fields | set(CONTEXT_NAMES) | set(templates.env.globals)
    problems = []

    def undeclared(source: str, what: str) -> None:
        try:
            found = meta.find_undeclared_variables(templates.env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            problems.append(Problem(where, f"{what}: syntax error: {e.message}"))
            return
        for var in sorted(found - known):
            problems.append(
                Problem(
                    where,
                    f"{what}: undefined variable {var!r}: {rule.event} ({schema.full_name}) "
                    "has no such field and the router sets no such name",
                )
            )

    if rule.to is not None:
        undeclared(rule.to, "'to'")
    for key, value in rule.data.items():
        undeclared(value, f"data.{key}")
    if rule.when is not None:
        undeclared(f"{{{{ ({rule.when}) }}}}", "'when'")
    translations = [None, *templates.translations(rule.template).values()]
    for path in templates.files(rule.template):
        source, _, _ = templates.env.loader.get_source(templates.env, path)  # type: ignore[union-attr]
        undeclared(source, path)
    if problems:
        return problems
    for nulls in (False, True):
        record = example_record(schema.parsed, nulls=nulls)
        for locale in translations:
            context = _context(rule, record, locale)
            label = f"{rule.template} ({locale or 'default'}, {'nulls' if nulls else 'full'})"
            try:
                if rule.when is not None:
                    templates.condition(rule.when, context)
                templates.render(rule.template, context, locale)
            except TemplateRenderError as e:
                problems.append(Problem(where, f"does not render {label}: {e}"))
    return problems


def _context(rule: Rule, record: dict[str, Any], locale: str | None) -> dict[str, Any]:
    """What the router gives a render (pipeline/router/mapping.py), for an example event."""
    return {
        **record,
        "event_type": rule.event,
        "event": record,
        "subscriber": {
            "user_id": "u-example",
            "email": "ada@example.com",
            "phone": "+447911123456",
            "locale": locale,
            "time_zone": "Europe/London",
            "custom": {},
        },
        "locale": locale,
        "time_zone": "Europe/London",
        "category": rule.category,
        "channel": rule.channel,
        "rule": rule.name,
        "unsubscribe_url": "https://notify.example.com/u/example-token",
    }


def example_record(parsed: Any, *, nulls: bool = False) -> Any:
    """An example of a fastavro-parsed schema, as the router's decoder hands it over: every
    field filled with a typical value, or (``nulls``) every optional field null and every
    array and map empty."""
    named: dict[str, Any] = {}

    def collect(schema: Any) -> None:
        if isinstance(schema, list):
            for branch in schema:
                collect(branch)
        elif isinstance(schema, dict):
            if schema.get("type") in ("record", "error", "enum", "fixed") and "name" in schema:
                named[schema["name"]] = schema
            for f in schema.get("fields", ()):
                collect(f["type"])
            for key in ("items", "values"):
                if key in schema:
                    collect(schema[key])

    collect(parsed)

    def gen(schema: Any, name: str) -> Any:
        if isinstance(schema, str):
            if schema in named:
                return gen(named[schema], name)
            return _primitive(schema, name)
        if isinstance(schema, list):
            if nulls and "null" in schema:
                return None
            branches = [b for b in schema if b != "null"] or ["null"]
            return gen(branches[0], name)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical in ("timestamp-millis", "timestamp-micros"):
            return EXAMPLE_TIME
        if logical in ("local-timestamp-millis", "local-timestamp-micros"):
            return EXAMPLE_TIME.replace(tzinfo=None)
        if logical == "date":
            return EXAMPLE_TIME.date()
        if logical in ("time-millis", "time-micros"):
            return EXAMPLE_TIME.time()
        if logical == "uuid":
            return uuid.UUID("8a3e4f1c-2b6d-4c9e-8f7a-1b2c3d4e5f60")
        if logical == "decimal":
            return Decimal("12.34")
        if kind in ("record", "error"):
            return {f["name"]: gen(f["type"], f["name"]) for f in schema["fields"]}
        if kind == "enum":
            return schema["symbols"][0]
        if kind == "array":
            return [] if nulls else [gen(schema["items"], name)]
        if kind == "map":
            return {} if nulls else {"key": gen(schema["values"], name)}
        if kind == "fixed":
            return b"\x01" * schema["size"]
        return gen(kind, name)

    return gen(parsed, "")


def _primitive(kind: str, name: str) -> Any:
    values: dict[str, Any] = {
        "null": None,
        "boolean": True,
        "int": 2,
        "long": 1234,
        "float": 1.5,
        "double": 19.99,
        "bytes": b"bytes",
        "string": f"example {name}".strip(),
    }
    return values.get(kind)
