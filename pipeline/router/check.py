"""``herald rules check``: everything about the routing configuration that can be known before
an event arrives, checked at once. The router runs the same check at start
(``create_handler``), so a configuration that would dead-letter every event of a kind never
starts.

- every rule's event is declared by a schema, and its channel served by an installed
  connector;
- every template under the templates directory compiles, and every template a rule names
  exists;
- every rule renders (recipient, data, subject and bodies) for an example of its event built
  from the event's newest schema (pipeline.examples): once with optional fields null, where
  its ``when`` condition holds for that example, and once with every field filled in,
  whatever the condition says; the intent it makes must fit the NotificationIntent schema.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime

import fastavro.validation

from pipeline.examples import example_record
from pipeline.records import NOTIFICATION_INTENT, NotificationIntent
from pipeline.router.mapping import MissingRecipientError, RoutingError, route
from pipeline.router.rules import Rule, RuleError, RuleSet
from pipeline.router.templates import TemplateRenderError, Templates
from pipeline.schemas import SchemaSet

__all__ = ["RulesCheck", "RulesCheckError", "check_rules"]

_NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class RulesCheckError(RuleError):
    """The rules, templates or schemas do not fit together; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{len(problems)} {noun} in the routing rules: " + "; ".join(problems))


@dataclass
class RulesCheck:
    """What the check saw: problems (empty when all is well) and, per rule, the intent it
    rendered for the full example event."""

    rules: int = 0
    templates: int = 0
    problems: list[str] = field(default_factory=list)
    # Rules that will dead-letter some events alone (a recipient an event may lack): a
    # failing rule fails alone, so these do not stop the router, but they are shown.
    warnings: list[str] = field(default_factory=list)
    rendered: list[NotificationIntent] = field(default_factory=list)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise RulesCheckError(self.problems)


def check_rules(
    rules: RuleSet, templates: Templates, schemas: SchemaSet, channels: list[str]
) -> RulesCheck:
    """Check the rules against the schemas, the installed channels and the templates."""
    report = RulesCheck(rules=len(rules))
    event_types = {et.name: et for et in schemas.event_types()}
    intent_schema = schemas.latest(NOTIFICATION_INTENT).parsed

    names = templates.names()
    report.templates = len(names)
    broken = set()
    for name in names:
        try:
            templates.check({name})
        except TemplateRenderError as e:
            report.problems.append(str(e))
            broken.add(name)

    for rule in rules.rules:
        problems = []
        if rule.channel not in channels:
            problems.append(
                f"rule {rule.name!r}: unknown channel {rule.channel!r}; "
                f"installed connectors serve: {', '.join(channels)}"
            )
        if rule.event not in event_types:
            problems.append(
                f"rule {rule.name!r}: unknown event {rule.event!r}; "
                f"the schemas declare: {', '.join(sorted(event_types))}"
            )
        if rule.template not in names:
            problems.append(
                f"rule {rule.name!r}: no template {rule.template!r} "
                f"({templates.directory / rule.template / 'body.txt'} not found)"
            )
        report.problems.extend(problems)
        if problems or rule.template in broken:
            continue
        definition = schemas.latest(event_types[rule.event].full_name).definition
        for full in (False, True):
            example = example_record(definition, full=full)
            problem, intent = _render(rule, templates, example, full)
            if problem and problem.startswith(_OPTIONAL_RECIPIENT):
                report.warnings.append(problem.removeprefix(_OPTIONAL_RECIPIENT))
                continue
            if problem:
                report.problems.append(problem)
                break
            if intent is not None:
                try:
                    fastavro.validation.validate(intent.to_avro(), intent_schema)
                except Exception as e:
                    report.problems.append(
                        f"rule {rule.name!r}: its intent does not fit {NOTIFICATION_INTENT}: {e}"
                    )
                    break
                if full:
                    report.rendered.append(intent)
    return report


_OPTIONAL_RECIPIENT = "optional recipient: "


def _render(
    rule: Rule, templates: Templates, example: dict[str, object], full: bool
) -> tuple[str | None, NotificationIntent | None]:
    """(problem, intent) for one rule and one example event."""
    which = (
        f"a {rule.event} example with every field set"
        if full
        else f"a {rule.event} example with its optional fields null"
    )
    context = {**example, "event_type": rule.event, "event": example}
    if rule.when is not None:
        try:
            holds = templates.condition(rule.when, context)
        except TemplateRenderError as e:
            return f"rule {rule.name!r}: {e} (for {which})", None
        if not holds and not full:
            return None, None  # the condition keeps such events away from this rule
    unconditional = RuleSet([dataclasses.replace(rule, when=None)])
    try:
        routed = route(rule.event, example, unconditional, templates, _NOW)
    except RoutingError as e:
        return f"{e} (for {which})", None
    if routed.failures:
        failure = routed.failures[0]
        problem = f"{failure} (for {which})"
        from_subscriber = "subscriber." in (rule.recipient or "")
        if isinstance(failure, MissingRecipientError) and (not full or from_subscriber):
            # A recipient an event may lack (an optional field, or the subscriber's record,
            # which the check cannot know: it has no people state): those events get this
            # rule's dead letter, the other rules still send. Worth a condition, not a
            # refusal.
            field_name = (rule.recipient or "").split("|")[-1] or "the recipient"
            return (
                f"{_OPTIONAL_RECIPIENT}{problem}; events without it get a dead letter for this "
                f'rule: add when = "{field_name} is not none" if that is expected',
                None,
            )
        return problem, None
    return None, routed.intents[0] if routed.intents else None
