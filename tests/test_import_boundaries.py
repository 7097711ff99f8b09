"""The router is a light process: its modules load neither the engine (expertmesh.cluster.engine),
nor torch, nor SGLang, nor transformers' model machinery, even once it has loaded the tokenizer.
Each check runs in a fresh interpreter, so nothing imported by other tests hides a leak."""
from __future__ import annotations

import json
import subprocess
import sys

ROUTER_MODULES = ["expertmesh.cluster.router.server", "expertmesh.cluster.router.main",
                  "expertmesh.cluster.router.openai_http", "expertmesh.cluster.router.client_cli",
                  "expertmesh.cluster.wire"]


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in ("torch", "sglang")
                  or m == "expertmesh.cluster.engine" or m.startswith("expertmesh.cluster.engine."))


def test_router_modules_import_no_engine_torch_or_sglang():
    mods = loaded_after("\n".join(f"import {m}" for m in ROUTER_MODULES))
    assert not heavy(mods), heavy(mods)


def test_router_tokenizer_loads_without_torch(tiny_ckpt):
    mods = loaded_after(f"from expertmesh.cluster.tokenizer import load_tokenizer\n"
                        f"t = load_tokenizer({str(tiny_ckpt)!r})\n"
                        f"t.apply_chat_template([{{'role': 'user', 'content': 'hi'}}], tokenize=False)")
    assert not heavy(mods), heavy(mods)
