"""Reads a DeepSeek-V3-architecture checkpoint (Hugging Face hub layout) inside a rank actor.

A rank needs the dense/attention weights plus only its own slice of the routed experts, so
tensors are read one at a time through `safe_open` and an unneeded expert is never touched: a
shard that holds only other ranks' experts is not even opened (it may be absent). FP8 weights
(e4m3 + 128x128 `weight_scale_inv` blocks) are dequantized here, or, with `keep_fp8`, handed on
as they are (`Fp8Tensor`) for the model to keep resident (model/fp8.py). Imports only torch, safetensors and tqdm (no transformers) to keep
rank actors light.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from expertmesh.actors.model.config import ModelConfig, UnsupportedModelError
from expertmesh.actors.model.fp8 import Fp8Tensor, dequantize_fp8

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "UnsupportedModelError",
    "dequantize_fp8",
    "expected_shape",
    "expert_of",
    "fp8_by_convention",
    "resident_weight_bytes",
    "layer_of",
    "needed_names",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
FP32_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
_FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


class CheckpointError(Exception):
    """The checkpoint folder is incomplete or does not match its config."""


ExpertFilter = Callable[[int, int], bool]


def layer_of(name: str) -> int | None:
    """Decoder layer index of a hub tensor name, None for embeddings/final norm/lm_head."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed-expert tensor name, None for anything else."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _layer_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Suffix (after `model.layers.N.`) -> shape, for every tensor inference needs in one layer."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        "self_attn.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        "self_attn.kv_b_proj.weight": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "self_attn.o_proj.weight": (h, heads * cfg.v_head_dim),
    }
    if cfg.q_lora_rank is None:
        shapes["self_attn.q_proj.weight"] = (heads * cfg.qk_head_dim, h)
    else:
        shapes["self_attn.q_a_proj.weight"] = (cfg.q_lora_rank, h)
        shapes["self_attn.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        shapes["self_attn.q_b_proj.weight"] = (heads * cfg.qk_head_dim, cfg.q_lora_rank)
    if not cfg.is_moe_layer(layer):
        i = cfg.intermediate_size
        shapes.update({"mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)})
        return shapes
    e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
    shapes["mlp.gate.weight"] = (e, h)
    shapes["mlp.gate.e_score_correction_bias"] = (e,)
    if cfg.n_shared_experts:
        s = i * cfg.n_shared_experts
        shapes.update(
            {
                "mlp.shared_experts.gate_proj.weight": (s, h),
                "mlp.shared_experts.up_proj.weight": (s, h),
                "mlp.shared_experts.down_proj.weight": (h, s),
            }
        )
    for x in range(e):
        shapes[f"mlp.experts.{x}.gate_proj.weight"] = (i, h)
        shapes[f"mlp.experts.{x}.up_proj.weight"] = (i, h)
        shapes[f"mlp.experts.{x}.down_proj.weight"] = (h, i)
    return shapes


def needed_names(cfg: ModelConfig, expert_filter: ExpertFilter | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor name inference needs (hub spelling) -> its shape, in model order."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_hidden_layers):
        for suffix, shape in _layer_shapes(cfg, layer).items():
            name = f"model.layers.{layer}.{suffix}"
            ex = expert_of(name)
            if ex is not None and expert_filter is not None and not expert_filter(*ex):
                continue
            out[name] = shape
    out["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return out


def fp8_by_convention(name: str, shape: tuple[int, ...]) -> bool:
    """What DeepSeek-V3/R1 store in FP8: 2-D linear weights except embeddings, lm_head and the gate."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    return not name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "shared_head.head.weight"))


def resident_weight_bytes(cfg: ModelConfig, dtype: torch.dtype, expert_filter: ExpertFilter | None = None,
                          fp8_names: set[str] = frozenset(), head_screen: bool = False) -> dict[str, int]:
    """The weight memory a rank holds once loaded, from the config alone: tensors in `fp8_names`
    at 1 byte per weight plus an fp32 scale per block ("fp8", "scales"), the gate's fp32 tensors,
    the rest in `dtype` ("dense"); with `head_screen` (CPU bf16, model/greedy_head.py) the lm_head's
    int8 screen, its rows padded to 32 (and, on VNNI CPUs, its width to 4), with four fp32 stats and
    an int32 sum per row. The arithmetic behind
    configs/deepseek-r1-a100.yaml's plan; tests compare it with what the model really holds
    (`DeepseekV3Model.weight_bytes`)."""
    size = torch.empty((), dtype=dtype).element_size()
    out = {"fp8": 0, "scales": 0, "dense": 0}
    for name, shape in needed_names(cfg, expert_filter).items():
        n = math.prod(shape)
        if name in fp8_names:
            out["fp8"] += n
            out["scales"] += 4 * math.prod(scale_inv_shape(shape, cfg.fp8_block))
        else:
            out["dense"] += n * (4 if name.endswith(FP32_SUFFIXES) else size)
    if head_screen:
        out["head_screen"] = -(-cfg.vocab_size // 32) * 32 * (-(-cfg.hidden_size // 4) * 4 + 20)
    return out


def expected_shape(name: str, config: ModelConfig) -> tuple[int, ...] | None:
    """Shape the config implies for a hub tensor name; None if inference does not use the name
    (MTP layer, `*_scale_inv`, unknown tensors)."""
    if name.endswith(SCALE_SUFFIX):
        return None
    if name == "model.embed_tokens.weight" or name == "lm_head.weight":
        return (config.vocab_size, config.hidden_size)
    if name == "model.norm.weight":
        return (config.hidden_size,)
    layer = layer_of(name)
    if layer is None or layer >= config.num_hidden_layers:
        return None
    return _layer_shapes(config, layer).get(name[len(f"model.layers.{layer}.") :])


def scale_inv_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the per-block scale grid: partial edge blocks count as whole blocks."""
    rows, cols = weight_shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


class CheckpointReader:
    """One checkpoint folder: its config and where each tensor lives; reads tensors on demand."""

    def __init__(self, path: str | Path, config: ModelConfig | None = None, progress: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint folder {self.path} does not exist")
        # UnsupportedModelError (a ValueError) propagates unchanged: it already names the architecture.
        self.config: ModelConfig = config if config is not None else ModelConfig.from_dir(self.path)
        self.progress = progress
        self.read_names: set[str] = set()
        self.weight_map: dict[str, str] = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                data: dict[str, Any] = json.loads(index.read_text())
                return dict(data["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"no {INDEX_FILE} and no *.safetensors file in {self.path}: not a safetensors checkpoint"
            )
        # No index (e.g. a single model.safetensors): build the map from the files' headers.
        weight_map: dict[str, str] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    weight_map[name] = file.name
        return weight_map

    def needed(self, expert_filter: ExpertFilter | None = None) -> dict[str, tuple[int, ...]]:
        """Names (and shapes) `iter_weights` will yield for this filter."""
        return needed_names(self.config, expert_filter)

    def fp8_names(self, expert_filter: ExpertFilter | None = None) -> set[str]:
        """Needed tensors the checkpoint stores in FP8 (those with a `_scale_inv` beside them)."""
        return {n for n in self.needed(expert_filter) if n + SCALE_SUFFIX in self.weight_map}

    def needed_files(self, expert_filter: ExpertFilter | None = None) -> set[str]:
        """Shard files `iter_weights` will open for this filter."""
        files = set()
        for name in self.needed(expert_filter):
            for n in (name, name + SCALE_SUFFIX):
                if n in self.weight_map:
                    files.add(self.weight_map[n])
        return files

    def _check_present(self, names: dict[str, tuple[int, ...]]) -> None:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"checkpoint {self.path} is missing tensor {missing[0]!r}{more}")
        seen: set[str] = set()
        for name in names:
            for n in (name, name + SCALE_SUFFIX):
                file = self.weight_map.get(n)
                if file is None or file in seen:
                    continue
                if not (self.path / file).is_file():
                    raise CheckpointError(
                        f"shard {file} is missing from {self.path} (it should hold tensor {n!r})"
                    )
                seen.add(file)

    def iter_weights(
        self, dtype: torch.dtype, expert_filter: ExpertFilter | None = None, keep_fp8: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | Fp8Tensor]]:
        """Yield (hub tensor name, tensor) for every tensor inference needs: FP8 weights dequantized
        (weight.float() * scale_inv expanded over 128x128 blocks, cropped at edges) and cast to dtype;
        the gate weight and e_score_correction_bias always fp32; MTP layer (index num_hidden_layers) and
        *_scale_inv names skipped; routed expert (layer, expert) tensors skipped unless
        expert_filter(layer, expert) is True (None = all). Every yielded tensor's shape is checked
        against the shape the config implies. keep_fp8: FP8 weights come as `Fp8Tensor` (e4m3 +
        scale_inv, as stored) instead."""
        names = self.needed(expert_filter)
        self._check_present(names)
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        total = len(names) + sum(1 for n in names if n + SCALE_SUFFIX in self.weight_map)
        block = self.config.fp8_block
        with ExitStack() as stack, tqdm(
            total=total, desc=f"loading {self.path.name}", unit="tensor", disable=None if self.progress else True
        ) as bar:
            handles: dict[str, Any] = {}

            def handle(file: str) -> Any:
                if file not in handles:
                    try:
                        handles[file] = stack.enter_context(safe_open(self.path / file, framework="pt"))
                    except Exception as exc:  # truncated or not a safetensors file
                        raise CheckpointError(f"cannot open shard {self.path / file}: {exc}") from exc
                return handles[file]

            for file in sorted(by_file):
                f = handle(file)
                for name in by_file[file]:
                    tensor = self._read_one(f, handle, name, names[name], block, bar)
                    if isinstance(tensor, Fp8Tensor):
                        yield name, tensor if keep_fp8 else tensor.dequantize(dtype)
                        continue
                    if name.endswith(FP32_SUFFIXES):
                        tensor = tensor.float()
                    else:
                        tensor = tensor.to(dtype)
                    yield name, tensor

    def _read_one(
        self,
        f: Any,
        handle: Callable[[str], Any],
        name: str,
        shape: tuple[int, ...],
        block: tuple[int, int],
        bar: tqdm,
    ) -> torch.Tensor | Fp8Tensor:
        try:
            sl = f.get_slice(name)
        except Exception as exc:  # the index points at a file that does not hold the tensor
            raise CheckpointError(
                f"tensor {name!r} is listed in the index under {self.weight_map[name]} but that file lacks it"
            ) from exc
        got = tuple(sl.get_shape())
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(got)}, expected {list(shape)} from config.json")
        tensor = f.get_tensor(name)
        self.read_names.add(name)
        bar.update(1)
        if sl.get_dtype() not in _FP8_DTYPES:
            return tensor
        scale_name = name + SCALE_SUFFIX
        scale_file = self.weight_map.get(scale_name)
        if scale_file is None:
            raise CheckpointError(f"fp8 weight {name!r} has no {scale_name!r} in the checkpoint")
        try:
            scale = handle(scale_file).get_tensor(scale_name)
        except Exception as exc:
            raise CheckpointError(f"cannot read {scale_name!r} from {scale_file}: {exc}") from exc
        self.read_names.add(scale_name)
        bar.update(1)
        want = scale_inv_shape(got, block)
        if tuple(scale.shape) != want:
            raise CheckpointError(
                f"tensor {scale_name!r} has shape {list(scale.shape)}, expected {list(want)} "
                f"for a {list(got)} weight in {block[0]}x{block[1]} blocks"
            )
        return Fp8Tensor(tensor, scale.float(), tuple(block))
