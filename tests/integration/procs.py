"""Herald processes started by tests: devtools.procs, shared with the harnesses."""

from __future__ import annotations

from devtools.procs import HeraldProcess, herald_env

__all__ = ["HeraldProcess", "herald_env"]
