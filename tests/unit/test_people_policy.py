"""Preferences against the workspace policy, and one-click unsubscribe tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.people.policy import PolicyError, PreferencePolicy
from pipeline.people.records import Preferences, suppression_key
from pipeline.people.unsubscribe import (
    ExpiredToken,
    ForgedToken,
    UnsubscribeLinks,
    sign,
    verify,
)
from pipeline.records import DATA_LIST_UNSUBSCRIBE_MAILTO, DATA_LIST_UNSUBSCRIBE_URL
from pipeline.settings import project_root

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
POLICY = PreferencePolicy(
    defaults={"marketing": {"sms": False}, "digest": {"*": False}},
    critical=frozenset({"security"}),
)


def prefs(**choices: dict[str, bool]) -> Preferences:
    return Preferences("u-1", dict(choices))


CASES = [
    # (choices, category, channel, send, reason)
    ({}, "marketing", "email", True, None),
    ({}, "marketing", "sms", False, "marketing on sms is off by default"),
    ({}, "digest", "push", False, "digest on push is off by default"),
    (
        {"marketing": {"email": False}},
        "marketing",
        "email",
        False,
        "opted out of marketing on email",
    ),
    ({"marketing": {"email": False}}, "marketing", "push", True, None),
    (
        {"marketing": {"*": False}},
        "marketing",
        "push",
        False,
        "opted out of marketing on every channel",
    ),
    ({"*": {"email": False}}, "orders", "email", False, "opted out of everything on email"),
    ({"*": {"*": False}, "orders": {"*": True}}, "orders", "sms", True, None),
    ({"marketing": {"sms": True}}, "marketing", "sms", True, None),  # the person's choice wins
    ({"*": {"*": False}}, "security", "email", True, None),  # critical: whatever was chosen
]


@pytest.mark.parametrize(("choices", "category", "channel", "send", "reason"), CASES)
def test_decide(
    choices: dict[str, dict[str, bool]], category: str, channel: str, send: bool, reason: str | None
) -> None:
    decision = POLICY.decide(Preferences("u-1", choices), category, channel)
    assert (decision.send, decision.reason) == (send, reason)


def test_no_preferences_record_takes_the_defaults() -> None:
    assert POLICY.decide(None, "marketing", "email").send
    assert not POLICY.decide(None, "marketing", "sms").send


def test_the_config_file_loads() -> None:
    policy = PreferencePolicy.load(project_root() / "config" / "preferences.toml")
    assert policy.is_critical("security") and policy.is_critical("password-reset")
    assert not policy.is_critical("marketing")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("critical = 'security'", "array"),
        ("[defaults]\nmarketing = 3", "defaults.marketing"),
        ("[defaults.marketing]\nsms = 'no'", "defaults.marketing"),
        ("unknown = 1", "unknown keys"),
    ],
)
def test_invalid_policy_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "preferences.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        PreferencePolicy.load(path)


def test_with_choice_keeps_the_other_choices() -> None:
    p = prefs(marketing={"email": False}).with_choice("digest", "email", False, by="t", at=NOW)
    assert p.choices == {"marketing": {"email": False}, "digest": {"email": False}}
    assert p.updated_by == "t"


def test_suppression_keys() -> None:
    assert suppression_key("email", " Ada@Example.COM ") == "email:ada@example.com"
    assert suppression_key("fcm", "Tok3n") == "fcm:Tok3n"
    hidden = suppression_key("webpush", '{"endpoint": "x", "keys": "s"}', "x")
    assert hidden.startswith("webpush:sha256:") and "keys" not in hidden


# -- tokens -------------------------------------------------------------------------------------

SECRET = b"s3cret"


def test_a_token_round_trips() -> None:
    token = sign(SECRET, "u-1", "marketing", "email", NOW + timedelta(days=1))
    assert all(c.isalnum() or c in "-_." for c in token), "URL and subject safe"
    found = verify(SECRET, token, NOW)
    assert (found.user_id, found.category, found.channel) == ("u-1", "marketing", "email")


def test_an_expired_token_is_refused() -> None:
    token = sign(SECRET, "u-1", "marketing", "email", NOW)
    with pytest.raises(ExpiredToken):
        verify(SECRET, token, NOW)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t.replace("eyJ", "eyK", 1),  # the payload changed
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # the signature changed
        lambda t: t.split(".")[0],  # no signature
        lambda t: "not a token",
        lambda t: t + ".extra",
    ],
    ids=["payload", "signature", "unsigned", "garbage", "extra-part"],
)
def test_a_tampered_token_is_refused(tamper: object) -> None:
    token = sign(SECRET, "u-1", "marketing", "email", NOW + timedelta(days=1))
    with pytest.raises(ForgedToken):
        verify(SECRET, tamper(token), NOW)  # type: ignore[operator]


def test_another_secret_refuses_the_token() -> None:
    token = sign(SECRET, "u-1", "marketing", "email", NOW + timedelta(days=1))
    with pytest.raises(ForgedToken):
        verify(b"other", token, NOW)


def test_links_fill_the_reserved_data_keys() -> None:
    links = UnsubscribeLinks(SECRET, "https://notify.example.com", "unsubscribe@example.com")
    data = links.data("u-1", "marketing", "email", NOW)
    url = data[DATA_LIST_UNSUBSCRIBE_URL]
    assert url.startswith("https://notify.example.com/u/")
    token = url.rsplit("/", 1)[1]
    assert data[DATA_LIST_UNSUBSCRIBE_MAILTO] == f"mailto:unsubscribe@example.com?subject={token}"
    assert verify(SECRET, token, NOW).expires_at == NOW + timedelta(days=60)
