"""A core install (`pip install herald`, no channel extras) must still list every connector,
check rules and start the email sink: the registry imports every connector module, so a
module may import its extra's packages only when the connector is built, and then fail
with the pip command that installs them."""

from __future__ import annotations

import subprocess
import sys

# The packages the channel extras add (pyproject.toml: sms, fcm, apns, webpush).
EXTRAS = ["phonenumbers", "jwt", "httpx", "h2", "http_ece", "cryptography", "sniffio"]

SCRIPT = f"""
import sys
from importlib.abc import MetaPathFinder

class NoExtras(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS!r}:
            raise ImportError(f"{{name}} is not installed")
        return None

sys.meta_path.insert(0, NoExtras())
from connectors.registry import connector_class, installed_channels
from pipeline.environment import valid_names
print(",".join(installed_channels()))
assert "HERALD_APNS_TEAM_ID" in valid_names()
connector_class("email").from_env()
try:
    connector_class("apns").from_env()
except RuntimeError as e:
    print(e)
"""


def test_every_connector_loads_without_its_extra() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    channels, refusal = out.stdout.splitlines()
    assert channels == "apns,email,fcm,slack,sms,webhook,webpush"
    assert "pip install 'herald[apns]'" in refusal
