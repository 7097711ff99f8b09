"""The committed stubs are exactly what grpcio-tools generates from the committed .proto files,
and they import under the package path the .proto files declare (expertmesh.v1)."""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "protos" / "expertmesh" / "v1"


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.name for p in (tmp_path / "expertmesh" / "v1").iterdir())
    assert generated, "protoc generated nothing"
    for name in generated:
        assert (V1 / name).exists(), f"{name} is generated but not committed; run scripts/gen_protos.sh"
        assert filecmp.cmp(tmp_path / "expertmesh" / "v1" / name, V1 / name, shallow=False), (
            f"{name} differs from the .proto; run scripts/gen_protos.sh and commit the result")


def test_stubs_import_as_expertmesh_v1() -> None:
    from expertmesh.v1 import engine_pb2, engine_pb2_grpc, generate_pb2, generate_pb2_grpc

    assert generate_pb2.DESCRIPTOR.package == "expertmesh.v1"
    assert engine_pb2.DESCRIPTOR.package == "expertmesh.v1"
    assert "Generation" in generate_pb2.DESCRIPTOR.services_by_name
    assert "EngineService" in engine_pb2.DESCRIPTOR.services_by_name
    assert hasattr(generate_pb2_grpc, "GenerationStub") and hasattr(engine_pb2_grpc, "EngineServiceStub")
    req = generate_pb2.GenerateRequest(text="hi", sampling=generate_pb2.SamplingParams(max_tokens=4))
    assert generate_pb2.GenerateRequest.FromString(req.SerializeToString()) == req
