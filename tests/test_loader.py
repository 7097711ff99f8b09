"""The rank-side checkpoint loader: names, shapes, dtypes, FP8 dequantization, subset loads, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertmesh.actors.loader import (
    CheckpointError,
    CheckpointReader,
    UnsupportedModelError,
    expected_shape,
    expert_of,
    needed_names,
)
from expertmesh.actors.model.config import ModelConfig

torch.set_num_threads(1)


def clone(src: Path, dst: Path) -> Path:
    """A damageable copy: shards hard-linked (unlink before rewriting one), json copied."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def edit_index(path: Path, drop: str) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][drop]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def rewrite_shard(path: Path, name: str, tensor: torch.Tensor) -> str:
    file = weight_map(path)[name]
    tensors = load_file(path / file)
    tensors[name] = tensor
    (path / file).unlink()
    save_file(tensors, str(path / file), metadata={"format": "pt"})
    return file


def reference_dequant(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Block by block, the obvious way."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs, cs = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rs, cs] = q[rs, cs].float() * scale[i, j]
    return out


def test_yields_exactly_the_needed_tensors(tiny_ckpt: Path) -> None:
    reader = CheckpointReader(tiny_ckpt, progress=False)
    cfg = reader.config
    got = dict(reader.iter_weights(torch.bfloat16))
    assert list(got) != [] and set(got) == set(needed_names(cfg))
    assert not [n for n in got if n.startswith(f"model.layers.{cfg.num_hidden_layers}.")]  # no MTP
    assert not [n for n in got if n.endswith("_scale_inv")]
    assert reader.read_names == set(got)  # the MTP layer was never read
    for name, t in got.items():
        assert tuple(t.shape) == expected_shape(name, cfg), name
        fp32 = name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
        assert t.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert got["model.layers.1.mlp.gate.weight"].shape == (16, 64)
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)  # layer 0 is dense
    assert "model.layers.0.mlp.gate.weight" not in got
    with safe_open(tiny_ckpt / weight_map(tiny_ckpt)["model.layers.2.mlp.experts.7.down_proj.weight"], "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.2.mlp.experts.7.down_proj.weight"),
                           got["model.layers.2.mlp.experts.7.down_proj.weight"])
    as_fp32 = dict(CheckpointReader(tiny_ckpt, progress=False).iter_weights(torch.float32))
    assert as_fp32["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float32


def test_expected_shape(tiny_ckpt: Path, tiny_noqlora_ckpt: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_ckpt)
    assert expected_shape("model.embed_tokens.weight", cfg) == (129280, 64)
    assert expected_shape("model.layers.1.self_attn.q_b_proj.weight", cfg) == (4 * 24, 32)
    assert expected_shape("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", cfg) == (32 + 8, 64)
    assert expected_shape("model.layers.1.self_attn.kv_b_proj.weight", cfg) == (4 * 32, 32)
    assert expected_shape("model.layers.1.mlp.experts.3.down_proj.weight", cfg) == (64, 32)
    assert expected_shape("model.layers.3.eh_proj.weight", cfg) is None  # MTP
    assert expected_shape("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv", cfg) is None
    assert expected_shape("model.layers.1.self_attn.q_proj.weight", cfg) is None
    noq = ModelConfig.from_dir(tiny_noqlora_ckpt)
    assert expected_shape("model.layers.1.self_attn.q_proj.weight", noq) == (4 * 24, 64)
    names = set(dict(CheckpointReader(tiny_noqlora_ckpt, progress=False).iter_weights(torch.float32)))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not [n for n in names if "q_a_" in n or "q_b_" in n]


def test_fp8_dequantization_matches_reference(tiny_fp8_ckpt: Path) -> None:
    reader = CheckpointReader(tiny_fp8_ckpt, progress=False)
    got = dict(reader.iter_weights(torch.float32))
    wmap = weight_map(tiny_fp8_ckpt)
    fp8_names = [n for n in got if n + "_scale_inv" in wmap]
    assert len(fp8_names) > 50
    assert {n + "_scale_inv" for n in fp8_names} <= reader.read_names
    checked_partial = False
    for name in fp8_names:
        with safe_open(tiny_fp8_ckpt / wmap[name], "pt") as f:
            q, s = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
        assert q.dtype == torch.float8_e4m3fn
        assert torch.equal(got[name], reference_dequant(q, s)), name
        checked_partial |= q.shape[0] > 128 and q.shape[0] % 128 != 0
    assert checked_partial
    assert got["model.embed_tokens.weight"].dtype == torch.float32
    as_bf16 = dict(CheckpointReader(tiny_fp8_ckpt, progress=False).iter_weights(torch.bfloat16))
    name = "model.layers.1.mlp.experts.9.down_proj.weight"
    assert as_bf16[name].dtype == torch.bfloat16 and torch.equal(as_bf16[name], got[name].to(torch.bfloat16))
    assert as_bf16["model.layers.1.mlp.gate.weight"].dtype == torch.float32


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "tiny_fp8_ckpt"])
def test_subset_load_never_touches_the_other_half(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path = clone(request.getfixturevalue(fixture), tmp_path / "ckpt")
    cfg = ModelConfig.from_dir(path)
    half = cfg.n_routed_experts // 2
    upper = {f for n, f in weight_map(path).items() if (ex := expert_of(n)) is not None and ex[1] >= half}
    assert len(upper) >= 2
    for i, f in enumerate(sorted(upper)):
        (path / f).unlink()
        if i:  # the first is gone, the others are garbage: neither may be opened
            (path / f).write_bytes(b"\x00garbage" * 100)
    reader = CheckpointReader(path, progress=False)
    got = dict(reader.iter_weights(torch.float32, expert_filter=lambda layer, e: e < half))
    experts = {expert_of(n) for n in got} - {None}
    moe_layers = [layer for layer in range(cfg.num_hidden_layers) if cfg.is_moe_layer(layer)]
    assert experts == {(layer, e) for layer in moe_layers for e in range(half)}
    assert not [n for n in reader.read_names if (ex := expert_of(n)) is not None and ex[1] >= half]
    assert "model.embed_tokens.weight" in got and "lm_head.weight" in got
    # the full load needs the deleted files, and says which one
    with pytest.raises(CheckpointError, match=r"shard model-\d+-of-\d+\.safetensors is missing .*experts\.\d+"):
        list(CheckpointReader(path, progress=False).iter_weights(torch.float32))


def test_missing_shard_names_file_and_tensor(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = clone(tiny_ckpt, tmp_path / "ckpt")
    file = weight_map(path)["model.layers.0.self_attn.o_proj.weight"]
    (path / file).unlink()
    with pytest.raises(CheckpointError) as err:
        list(CheckpointReader(path, progress=False).iter_weights(torch.float32, expert_filter=lambda layer, e: e < 8))
    assert file in str(err.value) and "model." in str(err.value)


def test_corrupt_shard(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = clone(tiny_ckpt, tmp_path / "ckpt")
    file = weight_map(path)["model.layers.2.self_attn.o_proj.weight"]
    (path / file).unlink()
    (path / file).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=f"cannot open shard .*{file}"):
        list(CheckpointReader(path, progress=False).iter_weights(torch.float32))


def test_wrong_shape(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = clone(tiny_ckpt, tmp_path / "ckpt")
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    rewrite_shard(path, name, torch.zeros(100, 32, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight.*\[100, 32\].*\[128, 32\]"):
        list(CheckpointReader(path, progress=False).iter_weights(torch.float32))


def test_missing_tensor(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = clone(tiny_ckpt, tmp_path / "ckpt")
    edit_index(path, "model.layers.2.mlp.shared_experts.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.shared_experts\.up_proj\.weight'"):
        list(CheckpointReader(path, progress=False).iter_weights(torch.float32))


def test_unsupported_architecture(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = clone(tiny_ckpt, tmp_path / "ckpt")
    raw = json.loads((path / "config.json").read_text())
    raw.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        CheckpointReader(path, progress=False)


def test_missing_or_misshapen_scale_inv(tiny_fp8_ckpt: Path, tmp_path: Path) -> None:
    path = clone(tiny_fp8_ckpt, tmp_path / "a")
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    edit_index(path, name + "_scale_inv")
    with pytest.raises(CheckpointError, match=r"fp8 weight 'model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight' has no .*_scale_inv"):
        list(CheckpointReader(path, progress=False).iter_weights(torch.float32))
    path = clone(tiny_fp8_ckpt, tmp_path / "b")
    rewrite_shard(path, name + "_scale_inv", torch.ones(1, 1))
    with pytest.raises(CheckpointError, match=r"_scale_inv' has shape \[1, 1\], expected \[2, 2\]"):
        list(CheckpointReader(path, progress=False).iter_weights(torch.float32))


def test_single_file_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "single"
    path.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(tiny_ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_bytes((tiny_ckpt / "config.json").read_bytes())
    single = dict(CheckpointReader(path, progress=False).iter_weights(torch.float32))
    sharded = dict(CheckpointReader(tiny_ckpt, progress=False).iter_weights(torch.float32))
    assert set(single) == set(sharded) and all(torch.equal(single[k], sharded[k]) for k in single)


def test_not_a_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "config.json").write_bytes((tiny_ckpt / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        CheckpointReader(tmp_path)


def test_progress_bar_on_a_tty(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import expertmesh.actors.loader as loader

    seen = []
    real = loader.tqdm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("disable"))
        return real(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(loader, "tqdm", spy)
    list(CheckpointReader(tiny_ckpt, progress=True).iter_weights(torch.float32, lambda layer, e: e == 0))
    list(CheckpointReader(tiny_ckpt, progress=False).iter_weights(torch.float32, lambda layer, e: e == 0))
    assert seen == [None, True]  # None: tqdm shows itself on a terminal only


def test_loader_imports_no_transformers_or_sglang() -> None:
    code = (
        "import sys, expertmesh.actors.loader; "
        "bad = [m for m in ('transformers', 'sglang', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
