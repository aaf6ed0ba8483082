"""The generated gRPC code in src/tidings/v1 is what ``make proto`` makes from proto/ now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("tidings_pb2.py", "tidings_pb2.pyi", "tidings_pb2_grpc.py")


def test_generated_code_is_current(tmp_path: Path) -> None:
    outputs = [f"--{kind}_out={tmp_path}" for kind in ("python", "pyi", "grpc_python")]
    source = str(ROOT / "proto/tidings/v1/tidings.proto")
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", *outputs, source]
    subprocess.run(command, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "tidings/v1" / name).read_text()
        committed = (ROOT / "src/tidings/v1" / name).read_text()
        assert committed == fresh, f"src/tidings/v1/{name} is out of date: run `make proto`"
