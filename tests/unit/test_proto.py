"""The gRPC API's generated code in pipeline/proto is what proto/ generates today: the
committed files are regenerated into a temporary directory and compared (run `make proto`
after changing a .proto file)."""

from __future__ import annotations

from pathlib import Path

from devtools.gen_proto import DEFAULT_OUT, generate


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path): p.read_text() for p in generate(tmp_path)}
    committed = {
        p.relative_to(DEFAULT_OUT): p.read_text()
        for p in DEFAULT_OUT.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(committed) == sorted(fresh), "run `make proto`"
    stale = [str(name) for name, text in fresh.items() if committed[name] != text]
    assert stale == [], f"{', '.join(stale)} differ from proto/: run `make proto`"


def test_the_service_module_imports_the_messages_relatively() -> None:
    services = (DEFAULT_OUT / "herald" / "v1" / "notifications_pb2_grpc.py").read_text()
    assert "from . import notifications_pb2 as" in services
    assert "from herald" not in services
