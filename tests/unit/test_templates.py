"""Templates: sandboxed, strict about undefined fields, HTML autoescaped, one-line subjects."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.router.templates import Rendered, TemplateRenderError, Templates
from tests.unit.unit_helpers import write_template

UNSAFE = [
    "{{ ().__class__.__bases__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ user_id.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ event.__class__.__init__.__globals__['os'] }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
]


@pytest.mark.parametrize("source", UNSAFE)
def test_sandbox_blocks_unsafe_attribute_access(tmp_path: Path, source: str) -> None:
    write_template(tmp_path, "evil", body_txt=source)
    with pytest.raises(TemplateRenderError) as info:
        Templates(tmp_path).render("evil", {"user_id": "u-1", "event": {}})
    assert "evil/body.txt" in str(info.value)
    assert type(info.value.__cause__).__name__ in ("SecurityError", "UndefinedError")


def test_sandbox_error_is_a_security_error(tmp_path: Path) -> None:
    from jinja2.exceptions import SecurityError

    write_template(tmp_path, "evil", body_txt="{{ ().__class__.__bases__ }}")
    with pytest.raises(TemplateRenderError) as info:
        Templates(tmp_path).render("evil", {})
    assert isinstance(info.value.__cause__, SecurityError)


@pytest.mark.parametrize("expression", ["().__class__.__bases__", "user_id.__class__.__mro__"])
def test_sandbox_applies_to_conditions(tmp_path: Path, expression: str) -> None:
    with pytest.raises(TemplateRenderError, match="condition"):
        Templates(tmp_path).condition(expression, {"user_id": "u-1"})


def test_undefined_field_is_an_error_not_an_empty_string(tmp_path: Path) -> None:
    write_template(tmp_path, "t", subject="Hi {{ display_name }}", body_txt="Hi")
    with pytest.raises(TemplateRenderError, match="display_name"):
        Templates(tmp_path).render("t", {"email": "a@example.com"})


def test_undefined_in_a_condition_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateRenderError, match="locale"):
        Templates(tmp_path).condition("locale.startswith('en')", {})


def test_condition_evaluates(tmp_path: Path) -> None:
    templates = Templates(tmp_path)
    assert templates.condition("locale == 'de'", {"locale": "de"}) is True
    assert templates.condition("locale == 'de'", {"locale": "en"}) is False
    assert templates.condition("locale is none", {"locale": None}) is True


def test_html_is_autoescaped_and_text_is_not(tmp_path: Path) -> None:
    write_template(
        tmp_path,
        "t",
        subject="Hi {{ name }}",
        body_txt="Hi {{ name }}",
        body_html="<p>Hi {{ name }}</p>",
    )
    name = "<script>alert('x')</script> & co"
    rendered = Templates(tmp_path).render("t", {"name": name})
    assert (
        rendered.body_html == "<p>Hi &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co</p>"
    )
    assert rendered.body_text == f"Hi {name}"
    assert rendered.subject == f"Hi {name}"


@pytest.mark.parametrize(
    ("subject", "context", "expected"),
    [
        ("Hello\n{{ name }}\n", {"name": "Ada"}, "Hello Ada"),
        (
            "Hello {{ name }}",
            {"name": "Ada\r\nBcc: victim@example.com"},
            "Hello Ada Bcc: victim@example.com",
        ),
        ("  Hello \t {{ name }}  ", {"name": "Ada\n\n"}, "Hello Ada"),
        ("{{ name }}", {"name": "a\u2028b\x0bc\x85d"}, "a b c d"),
    ],
    ids=["template-newline", "value-crlf", "whitespace", "unicode-line-breaks"],
)
def test_subject_is_collapsed_to_one_line(
    tmp_path: Path, subject: str, context: dict[str, str], expected: str
) -> None:
    write_template(tmp_path, "t", subject=subject, body_txt="body")
    rendered = Templates(tmp_path).render("t", context)
    assert rendered.subject == expected
    assert len(rendered.subject.splitlines()) == 1


def test_optional_parts(tmp_path: Path) -> None:
    write_template(tmp_path, "t", body_txt="just text\n")
    assert Templates(tmp_path).render("t", {}) == Rendered(None, "just text", None)


def test_missing_body_is_an_error(tmp_path: Path) -> None:
    write_template(tmp_path, "t", subject="s")
    with pytest.raises(TemplateRenderError, match=r"t/body.txt is missing"):
        Templates(tmp_path).render("t", {})


def test_check_finds_missing_templates_and_syntax_errors(tmp_path: Path) -> None:
    write_template(tmp_path, "ok", body_txt="fine")
    write_template(tmp_path, "broken", body_txt="fine", body_html="<p>{{ oops </p>")
    templates = Templates(tmp_path)
    templates.check({"ok"})
    with pytest.raises(TemplateRenderError, match="'nope'"):
        templates.check({"ok", "nope"})
    with pytest.raises(TemplateRenderError, match=r"broken/body.html:1"):
        templates.check({"broken"})


def test_config_templates_all_compile(templates: Templates) -> None:
    names = {p.name for p in templates.directory.iterdir() if p.is_dir()}
    assert {"welcome", "password-reset", "order-shipped"} <= names
    templates.check(names)
