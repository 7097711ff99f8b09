"""The model's architecture, read from a Hugging Face config.json.

Accepts both spellings found in the wild: the hub's (`rope_scaling`, `torch_dtype`) and the one
transformers 5 writes (`rope_parameters`, `dtype`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one expertmesh can serve."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    torch_dtype: str = "bfloat16"
    quantization: dict[str, Any] | None = None
    hidden_act: str = "silu"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_fp8(self) -> bool:
        return bool(self.quantization) and self.quantization.get("quant_method") == "fp8"

    @property
    def fp8_block(self) -> tuple[int, int]:
        block = (self.quantization or {}).get("weight_block_size") or [128, 128]
        return int(block[0]), int(block[1])

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
            raise UnsupportedModelError(
                f"unsupported architecture {archs or model_type!r} (model_type={model_type!r}); "
                f"expertmesh serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {cfg.get('hidden_act')!r}; only 'silu'")
        if cfg.get("topk_method", "noaux_tc") != "noaux_tc" or cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise UnsupportedModelError("only the noaux_tc gate with sigmoid scoring is supported")
        rope_src = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        theta = float(rope_src.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope_src.get("rope_type", rope_src.get("type", "default")) or "default"
        if rope_type not in ("default", "yarn"):
            raise UnsupportedModelError(f"unsupported rope type {rope_type!r}; expected 'default' or 'yarn'")
        rope = RopeConfig(
            theta=theta,
            rope_type=rope_type,
            factor=float(rope_src.get("factor", 1.0) or 1.0),
            original_max_position_embeddings=int(
                rope_src.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
            ),
            beta_fast=float(rope_src.get("beta_fast") or 32),
            beta_slow=float(rope_src.get("beta_slow") or 1),
            mscale=rope_src.get("mscale"),
            mscale_all_dim=rope_src.get("mscale_all_dim"),
            attention_factor=rope_src.get("attention_factor"),
            truncate=bool(rope_src.get("truncate", True)),
        )
        n_routed = int(cfg.get("n_routed_experts") or 0)
        n_group = int(cfg.get("n_group") or 1)
        if n_routed and n_routed % n_group:
            raise ValueError(f"n_routed_experts={n_routed} is not divisible by n_group={n_group}")
        eos = cfg.get("eos_token_id", 1)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            n_routed_experts=n_routed,
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            n_group=n_group,
            topk_group=int(cfg.get("topk_group") or 1),
            first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            q_lora_rank=None if cfg.get("q_lora_rank") is None else int(cfg["q_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope=rope,
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 0),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            quantization=cfg.get("quantization_config"),
            raw=cfg,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
        return cls.from_dict(json.loads(file.read_text()))
