"""Checking the environment Herald is configured by, before anything starts.

- ``unknown_variables``: ``HERALD_*`` variables that no setting reads (Herald's own, or an
  installed connector's), each with the nearest valid name, so a typo such as
  ``HERALD_SMTP_PROT`` is reported instead of silently leaving the default in force.
- ``describe_validation_error``: pydantic's ValidationError for a settings class as one
  line naming the variable(s) at fault. A secret's value is never shown.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic_settings import BaseSettings

from pipeline.settings import ENV_PREFIX, HeraldSettings

__all__ = [
    "describe_validation_error",
    "settings_classes",
    "unknown_variables",
    "valid_names",
]

# HERALD_* variables read outside the settings classes.
OTHER_NAMES = frozenset({"HERALD_LOG_LEVEL", "HERALD_TEST_POSTGRES_URL"})


def settings_classes() -> list[type[BaseSettings]]:
    """HeraldSettings and the settings class of every installed connector."""
    from connectors.registry import load_connectors

    classes: list[type[BaseSettings]] = [HeraldSettings]
    for cls in load_connectors().values():
        if cls.settings_class not in classes:
            classes.append(cls.settings_class)
    return classes


def _field_names(cls: type[BaseSettings], field: str) -> list[str]:
    """The environment variables a field reads."""
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(c).upper() for c in alias.choices if isinstance(c, str)]
    if isinstance(alias, str):
        return [alias.upper()]
    prefix = str(cls.model_config.get("env_prefix", ""))
    return [f"{prefix}{field}".upper()]


def valid_names(classes: Iterable[type[BaseSettings]] | None = None) -> set[str]:
    names = set(OTHER_NAMES)
    for cls in classes if classes is not None else settings_classes():
        for field in cls.model_fields:
            names.update(_field_names(cls, field))
    return names


def unknown_variables(
    environ: Mapping[str, str], classes: Iterable[type[BaseSettings]] | None = None
) -> list[tuple[str, str | None]]:
    """(name, nearest valid name or None) for every HERALD_* variable no setting reads."""
    valid = valid_names(classes)
    herald = sorted(valid_name for valid_name in valid if valid_name.startswith(ENV_PREFIX))
    found = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in valid:
            close = difflib.get_close_matches(name, herald, n=1, cutoff=0.75)
            found.append((name, close[0] if close else None))
    return found


def _is_secret(cls: type[BaseSettings], field: str) -> bool:
    annotation = cls.model_fields[field].annotation
    return "SecretStr" in str(annotation) or annotation is SecretStr


def describe_validation_error(
    error: ValidationError, classes: Iterable[type[BaseSettings]] | None = None
) -> str:
    """One line: each failing variable, what is wrong, and the value when it is no secret."""
    by_name = {cls.__name__: cls for cls in (classes or settings_classes())}
    cls = by_name.get(error.title)
    parts = []
    for item in error.errors(include_url=False):
        loc = [str(p) for p in item.get("loc", ())]
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc or cls is None:
            # A check across settings (a model validator): its message names them.
            parts.append(message)
            continue
        field = loc[0]
        if field in cls.model_fields:
            name = _field_names(cls, field)[0]
            secret = _is_secret(cls, field)
        else:  # pydantic reports an alias (e.g. KAFKA_BOOTSTRAP_SERVERS) as it was given
            name, secret = field.upper(), False
        text = f"{name}: {message}"
        value = item.get("input")
        if not secret and isinstance(value, str | int | float) and len(str(value)) <= 200:
            text += f" (got {value!r})"
        parts.append(text)
    return "; ".join(" ".join(p.split()) for p in parts)
