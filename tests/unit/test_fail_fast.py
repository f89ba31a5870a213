"""Configuration that cannot work stops `herald run ...` at start: exit status 78, one line on
stderr naming the variable, no traceback, no secret. A HERALD_* variable that nothing reads is
a warning with the nearest valid name. No broker: each of these fails before connecting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.environment import unknown_variables, valid_names
from pipeline.settings import HeraldSettings

SECRET = "pw-must-not-show"  # noqa: S105 - a test credential


def herald(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("HERALD_", "KAFKA_", "SCHEMA_"))
    }
    # Nothing listens there: a command that got as far as Kafka would fail differently.
    base["KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


CASES = [
    (
        ["run", "router"],
        {"HERALD_KAFKA_SECURITY_PROTOCOL": "SASL_TLS"},
        "HERALD_KAFKA_SECURITY_PROTOCOL",
    ),
    (["run", "router"], {"HERALD_API_PORT": "eighty"}, "HERALD_API_PORT"),
    (["run", "sink", "email"], {"HERALD_EMAIL_FROM": "Herald notifications"}, "HERALD_EMAIL_FROM"),
    (["run", "sink", "email"], {"HERALD_SMTP_PORT": "25x"}, "HERALD_SMTP_PORT"),
    (["run", "all", "email"], {"HERALD_SMTP_SECURITY": "ssl"}, "HERALD_SMTP_SECURITY"),
    (
        ["run", "router"],
        {"HERALD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "HERALD_KAFKA_SASL_PASSWORD": SECRET},
        "HERALD_KAFKA_SASL_MECHANISM",
    ),
    (
        ["run", "api"],
        {
            "HERALD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "HERALD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "HERALD_KAFKA_SASL_PASSWORD": SECRET,
        },
        "HERALD_KAFKA_SASL_USERNAME",
    ),
    (["run", "sink", "pigeon-post"], {}, "no connector for channel 'pigeon-post'"),
    # Compose's ${NAME:-} placeholders: an empty credential is a missing one.
    (["run", "sink", "sms"], {"HERALD_SMS_AUTH_TOKEN": ""}, "HERALD_SMS_ACCOUNT_SID is not set"),
]


@pytest.mark.parametrize(("command", "env", "named"), CASES, ids=lambda v: str(v)[:40])
def test_invalid_configuration_stops_at_start_with_one_line(
    command: list[str], env: dict[str, str], named: str
) -> None:
    out = herald(*command, env=env)
    assert out.returncode == 78, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("herald: ")
    assert named in lines[0]
    assert "Traceback" not in out.stderr
    assert SECRET not in out.stderr + out.stdout


def test_rules_that_do_not_fit_stop_the_router_before_it_connects(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rules]]\nname = "r"\nevent = "user-registered"\nchannel = "carrier-pigeon"\n'
        'recipient = "email"\ntemplate = "welcome"\n'
    )
    out = herald("run", "router", env={"HERALD_RULES_FILE": str(rules)})
    assert out.returncode == 78, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "unknown channel 'carrier-pigeon'" in lines[0]


def test_an_unknown_herald_variable_is_a_warning_with_the_nearest_name() -> None:
    out = herald("rules", "check", env={"HERALD_SMTP_PROT": "2525"})
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines() == [
        "herald: warning: HERALD_SMTP_PROT is not a Herald setting; did you mean HERALD_SMTP_PORT?"
    ]


def test_valid_names_cover_every_setting_and_every_connectors_settings() -> None:
    names = valid_names()
    assert "KAFKA_BOOTSTRAP_SERVERS" in names
    assert "HERALD_KAFKA_SASL_PASSWORD" in names
    assert {"HERALD_SMTP_PORT", "HERALD_EMAIL_FROM", "HERALD_WEBHOOK_SECRETS"} <= names
    for field in HeraldSettings.model_fields:
        if field not in ("kafka_bootstrap_servers", "schema_registry_url"):
            assert f"HERALD_{field.upper()}" in names
    assert unknown_variables({"HERALD_SMTP_PORT": "1", "HERALD_LOG_LEVEL": "INFO"}) == []
    assert unknown_variables({"HERALD_NOTHING_LIKE_IT": "1"}) == [("HERALD_NOTHING_LIKE_IT", None)]
    assert unknown_variables({"HERALD_KAFKA_SASL_PASWORD": "x"}) == [
        ("HERALD_KAFKA_SASL_PASWORD", "HERALD_KAFKA_SASL_PASSWORD")
    ]
