"""The checkpoint generator: hub layout, determinism, loadable by transformers, healthy numerics."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from expertmesh.actors.loader import CheckpointReader, expert_of, needed_names
from expertmesh.actors.model.config import ModelConfig
from expertmesh.cluster.devtools.checkpoints import PRESETS, hub_config, load_hf_reference_model, make_checkpoint

torch.set_num_threads(1)

ASSISTANT_THINK = "<｜Assistant｜><think>\n"


def _index(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def _dtypes(path: Path) -> dict[str, torch.dtype]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_slice(name).get_dtype()
    return out


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def test_config_is_hub_style(tiny_ckpt: Path) -> None:
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    assert raw["architectures"] == ["DeepseekV3ForCausalLM"] and raw["model_type"] == "deepseek_v3"
    assert raw["topk_method"] == "noaux_tc" and raw["scoring_func"] == "sigmoid"
    assert raw["vocab_size"] == 129280 and raw["bos_token_id"] == 0 and raw["eos_token_id"] == 1
    assert raw["torch_dtype"] == "bfloat16" and "quantization_config" not in raw
    rs = raw["rope_scaling"]
    assert rs["type"] == "yarn"
    assert {"factor", "mscale", "mscale_all_dim", "original_max_position_embeddings", "beta_fast", "beta_slow"} <= set(rs)
    cfg = ModelConfig.from_dir(tiny_ckpt)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.first_k_dense_replace) == (64, 3, 1)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (16, 4, 4, 2)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 4.0 and cfg.rope.original_max_position_embeddings == 512
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1


def test_layout_names_dtypes_and_shards(tiny_ckpt: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_ckpt)
    wmap = _index(tiny_ckpt)
    files = set(wmap.values())
    assert len(files) >= 4 and all((tiny_ckpt / f).is_file() for f in files)
    dtypes = _dtypes(tiny_ckpt)
    assert set(dtypes) == set(wmap)
    assert set(needed_names(cfg)) <= set(wmap)
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in wmap
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in wmap
    mtp = cfg.num_hidden_layers
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "self_attn.kv_b_proj.weight",
                   "mlp.experts.0.up_proj.weight"):
        assert f"model.layers.{mtp}.{suffix}" in wmap
    for name, dt in dtypes.items():
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            assert dt == "F32", name
        else:
            assert dt == "BF16", name
    # the two halves of a layer's experts (MTP layer included) never share a file
    halves: dict[tuple[int, str], set[int]] = {}
    for name, file in wmap.items():
        ex = expert_of(name)
        if ex is not None:
            halves.setdefault((ex[0], file), set()).add(ex[1] * 2 // cfg.n_routed_experts)
    assert halves and all(len(h) == 1 for h in halves.values())
    # ... and the upper half's files hold nothing else
    upper = {f for (_, f), h in halves.items() if h == {1}}
    assert all(expert_of(n) is not None and expert_of(n)[1] >= 8 for n, f in wmap.items() if f in upper)


def test_same_seed_is_bit_identical(tiny_ckpt: Path, tmp_path: Path) -> None:
    def digests(path: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.glob("*.safetensors"))}

    again = make_checkpoint(tmp_path / "again", preset="tiny", seed=0)
    assert digests(again) == digests(tiny_ckpt)
    assert (again / "model.safetensors.index.json").read_text() == (tiny_ckpt / "model.safetensors.index.json").read_text()
    other = make_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    with safe_open(other / _index(other)["model.layers.1.mlp.experts.3.up_proj.weight"], "pt") as f1, safe_open(
        tiny_ckpt / _index(tiny_ckpt)["model.layers.1.mlp.experts.3.up_proj.weight"], "pt"
    ) as f0:
        name = "model.layers.1.mlp.experts.3.up_proj.weight"
        assert not torch.equal(f0.get_tensor(name), f1.get_tensor(name))


def test_transformers_loads_bf16_and_logits_are_healthy(tiny_ckpt: Path) -> None:
    _quiet_transformers()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ref = load_hf_reference_model(tiny_ckpt)
    a, b = hf.state_dict(), ref.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(3, 128000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ref(ids).logits
    assert torch.isfinite(logits).all()
    assert logits.std(-1).min() > 0.3  # not flat
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).median() > 0.05  # greedy choices have real margins
    assert logits.argmax(-1).unique().numel() >= 24  # not one token everywhere


def test_routed_experts_matter(tiny_ckpt: Path) -> None:
    """A model whose experts barely touch the residual would hide MoE bugs behind equal tokens."""
    model = load_hf_reference_model(tiny_ckpt)
    ids = torch.randint(3, 128000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits.argmax(-1)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.down_proj.zero_()
        ablated = model(ids).logits.argmax(-1)
    assert (base != ablated).float().mean() > 0.3


def test_tokenizer_and_r1_chat_template(tiny_ckpt: Path) -> None:
    _quiet_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    text = "Hello, world! 你好，世界。 def f(x): return x**2"
    ids = tok(text)["input_ids"]
    assert ids[0] != tok.bos_token_id and tok.decode(ids) == text
    assert max(ids) < 129280
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
        {"role": "user", "content": "2+2?"},
    ]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>\n\nHello!<｜end▁of▁sentence｜>"
        "<｜User｜>2+2?<｜Assistant｜><think>\n"
    )
    no_gen = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=False)
    assert no_gen == "<｜begin▁of▁sentence｜><｜User｜>Hi"
    ids = tok.apply_chat_template(msgs[1:2], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids[0] == 0 and tok.decode(ids).endswith(ASSISTANT_THINK)


def test_fp8_layout_and_partial_blocks(tiny_fp8_ckpt: Path) -> None:
    raw = json.loads((tiny_fp8_ckpt / "config.json").read_text())
    assert raw["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]
    }
    dtypes = _dtypes(tiny_fp8_ckpt)
    fp8 = {n for n, d in dtypes.items() if d == "F8_E4M3"}
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in fp8
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.input_layernorm.weight"):
        assert n not in fp8
    partial = 0
    for file in sorted(tiny_fp8_ckpt.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            keys = set(f.keys())
            for n in keys & fp8:
                rows, cols = f.get_slice(n).get_shape()
                scale = f.get_slice(n + "_scale_inv")
                assert scale.get_dtype() == "F32"
                assert tuple(scale.get_shape()) == (math.ceil(rows / 128), math.ceil(cols / 128))
                partial += (rows > 128 and rows % 128 != 0) or (cols > 128 and cols % 128 != 0)
    assert partial > 10  # full and partial blocks side by side


def test_fp8_is_bf16_up_to_rounding(tiny_ckpt: Path, tiny_fp8_aligned_ckpt: Path) -> None:
    bf16 = dict(CheckpointReader(tiny_ckpt, progress=False).iter_weights(torch.float32))
    fp8 = dict(CheckpointReader(tiny_fp8_aligned_ckpt, progress=False).iter_weights(torch.float32))
    assert set(bf16) == set(fp8)
    for name, w in bf16.items():
        err = ((fp8[name] - w).norm() / w.norm()).item()
        assert err < 0.05, (name, err)


def test_transformers_fp8_load_matches_our_dequantization(tiny_fp8_aligned_ckpt: Path) -> None:
    _quiet_transformers()
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_fp8_aligned_ckpt, dtype=torch.float32)
    ref = load_hf_reference_model(tiny_fp8_aligned_ckpt)
    a, b = hf.state_dict(), ref.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k].float(), b[k]) for k in a)


@pytest.mark.parametrize("fixture", ["tiny_fp8_ckpt", "tiny_noqlora_ckpt"])
def test_reference_model_holds_loader_weights(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    model = load_hf_reference_model(path)
    params = model.state_dict()
    ours = dict(CheckpointReader(path, progress=False).iter_weights(torch.float32))
    w = ours["model.layers.1.mlp.experts.5.up_proj.weight"]
    inter = w.shape[0]
    assert torch.equal(params["model.layers.1.mlp.experts.gate_up_proj"][5, inter:], w)  # transformers' fused layout
    assert torch.equal(params["model.layers.2.self_attn.o_proj.weight"], ours["model.layers.2.self_attn.o_proj.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[0, 100, 2000, 30000]])).logits
    assert torch.isfinite(logits).all()


def test_unbalanced_gate_routes_to_first_experts(tiny_skewed_ckpt: Path) -> None:
    model = load_hf_reference_model(tiny_skewed_ckpt)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, idx = gate(x)
    counts = torch.bincount(idx.flatten(), minlength=16)
    assert counts[:3].sum() / counts.sum() > 0.6
    assert counts[8:].sum() < counts[:8].sum() / 3  # EP rank 0 (of 2) gets most of the work


def test_presets_and_overrides() -> None:
    small = ModelConfig.from_dict(hub_config("small"))
    assert (small.hidden_size, small.n_routed_experts, small.num_experts_per_tok, small.moe_intermediate_size) == (
        512, 64, 6, 256)
    size = sum(math.prod(s) * 2 for s in needed_names(small).values())
    assert size < 1e9
    assert set(PRESETS) == {"tiny", "small"}
    assert hub_config("tiny", overrides={"q_lora_rank": None})["q_lora_rank"] is None
    with pytest.raises(ValueError, match="preset"):
        hub_config("huge")
    with pytest.raises(ValueError, match="n_group"):
        hub_config("tiny", overrides={"n_routed_experts": 10})
    with pytest.raises(ValueError, match="top-k"):
        hub_config("tiny", overrides={"num_experts_per_tok": 9})


def test_no_mtp_and_quarter_expert_shards(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "q", overrides={"num_nextn_predict_layers": 0}, expert_shards_per_layer=4)
    wmap = _index(path)
    assert not [n for n in wmap if n.startswith("model.layers.3.")]
    quarter_of_file: dict[str, set[int]] = {}
    for name, file in wmap.items():
        if (ex := expert_of(name)) is not None:
            quarter_of_file.setdefault(file, set()).add(ex[1] // 4)
    assert len(quarter_of_file) == 8 and all(len(q) == 1 for q in quarter_of_file.values())
    assert all((path / f).stat().st_mode & 0o044 == 0o044 for f in set(wmap.values()))
