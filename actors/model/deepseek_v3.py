"""DeepseekV3ForCausalLM's architecture over expertmesh's paged KV cache.

Parameter names follow the hub's, with the routed experts stacked per layer
(`mlp.experts.w13` / `w2`) for the grouped FFN; `load_weights` maps the hub's per-expert names.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..forward_batch import DecodeRows, ForwardBatch
from ..kv_cache import MLAKVCache
from .attention import MLAttention
from .config import ModelConfig
from .experts import LocalExperts
from .fp8 import (FP8_DTYPES, Fp8Linear, Fp8Tensor, PairPackedFp8Linear, PairPackedFp8SwiGLU, convert_linears,
                  pair_pack_fp8_linears, tensor_bytes)
from .gate import NoAuxTCGate
from .greedy_head import ScreenedHead
from .int8 import Int8Linear
from .layers import DenseMLP, RMSNorm
from .moe import MoE
from .packed import PackedLinear, PackedSwiGLU, PairPackedLinear, pack_swiglus, pair_pack_linears, prepack_linears
from .rope import RotaryEmbedding
from ..profiling import NULL_PROFILER, StepProfiler


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, expert_range: tuple[int, int],
                 slot_experts: list[int] | None = None):
        super().__init__()
        self.self_attn = MLAttention(config, layer)
        if config.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(config, expert_range[0], expert_range[1] - expert_range[0], slot_experts)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

        self.profiler = NULL_PROFILER

    def decode_static(self, x, rows, pad, kv, rope, cos, sin):
        """forward() for a fixed-shape decode step (DeepseekV3Model.decode_static)."""
        x = x + self.self_attn.decode_static(self.input_layernorm(x), rows.out_slots, rows.slots, pad, kv,
                                             rope, cos, sin)
        if isinstance(self.mlp, MoE):
            return self.mlp.decode_static(x, rows.valid, self.post_attention_layernorm)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, batch, kv, rope, cos, sin):
        """x + attention(norm(x)), then + mlp(norm(...)): the attention and MoE blocks take their
        norms, so on the CPU kernels each residual block is one call."""
        with self.profiler.span("attention"):
            x = self.self_attn(x, batch, kv, rope, cos, sin, self.input_layernorm)
        if isinstance(self.mlp, MoE):
            return self.mlp(x, self.post_attention_layernorm)
        with self.profiler.span("dense_mlp"):
            return x + self.mlp(self.post_attention_layernorm(x))


# Most sampled rows for which `logits` streams a dense head through the CPU kernel (fp32: 1.2x
# F.linear still at 32 rows; an unpacked bf16 head: faster up to 8-16 rows).
HEAD_KERNEL_MAX_ROWS = 16


class DeepseekV3Model(nn.Module):
    """`expert_range` = [first, end) of the routed experts this process holds (all by default);
    `slot_experts` (decoder layer → logical expert per local slot), where given, overrides it for
    expert-parallel placements with redundant experts (placement.py)."""

    def __init__(self, config: ModelConfig, expert_range: tuple[int, int] | None = None,
                 slot_experts: dict[int, list[int]] | None = None):
        super().__init__()
        self.config = config
        self.expert_range = expert_range or (0, config.n_routed_experts)
        self.slot_experts = slot_experts
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.expert_range, (slot_experts or {}).get(i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        self.head_kernel = None  # the CPU kernels' ops once use_cpu_kernels found them (see logits)
        self.head_screen: ScreenedHead | None = None  # greedy rows' int8 screen of a packed head

    def set_profiler(self, profiler: StepProfiler) -> None:
        for layer in self.layers:
            layer.profiler = profiler
            if isinstance(layer.mlp, MoE):
                layer.mlp.set_profiler(profiler)

    def prepack(self) -> int:
        """Packs the weights of CPU bf16 linears and routed experts for oneDNN, once, after loading
        (kv_b_proj stays dense: absorbed decode reads its weight directly). Returns how many
        weight matrices were packed; 0 where packing does not apply (fp32, CUDA)."""
        n = prepack_linears(self, keep_dense=("kv_b_proj",))
        for moe in self.moe_layers():
            if moe.experts.prepack():
                n += 2 * moe.experts.count
        return n

    def use_cpu_kernels(self, greedy_head_screen: bool = True) -> int:
        """Routed experts and decode attention through the CPU kernels (model/kernels), before
        `prepack` (the expert kernel reads the dense stacks). Returns how many modules use them
        (0 on CUDA or with no compiler; FP8-resident experts take the kernel's FP8 form).
        `greedy_head_screen`: beside a packed bf16 head, its int8 screen for greedy rows
        (model/greedy_head.py)."""
        n = sum(moe.experts.use_kernel() for moe in self.moe_layers())
        n += sum(layer.self_attn.use_kernel() for layer in self.layers)
        if self.norm.weight.device.type == "cpu":
            from .kernels import cpu_kernels

            self.head_kernel = cpu_kernels()
            n += self.head_kernel is not None
            head = self.lm_head
            if (self.head_kernel is not None and type(head) is nn.Linear and head.weight.dtype == torch.bfloat16
                    and self.head_kernel.has_packed_linear() and not self.config.tie_word_embeddings):
                self.lm_head = PairPackedLinear(head, self.head_kernel)
                if greedy_head_screen:
                    self.head_screen = ScreenedHead(head.weight, self.lm_head, self.head_kernel)
            if self.head_kernel is not None:
                self.rope.kernel = self.head_kernel
                n += 1
                for mod in self.modules():
                    if isinstance(mod, (RMSNorm, NoAuxTCGate)):
                        mod.kernel = self.head_kernel
                        n += 1
            if self.head_kernel is not None and self.head_kernel.has_packed_linear():
                # every other bf16 linear too: the kernel beats oneDNN's packed matmul at every size
                # measured (its ~20 us set-up per call at decode sizes; on AVX512-BF16 3x at 1 row,
                # 1.0-1.7x at 32-1032 rows), and oneDNN only emulates bf16 on AVX2 (kv_b_proj stays
                # dense: absorbed attention reads it; a tied embedding keeps its table)
                keep = ("kv_b_proj",) + (("lm_head",) if self.config.tie_word_embeddings else ())
                n += pack_swiglus(self, self.head_kernel)  # dense MLPs and shared experts: one call each
                n += sum(layer.self_attn.fuse_projections(self.head_kernel) for layer in self.layers)
                n += pair_pack_linears(self, self.head_kernel, keep_dense=keep)
                n += pair_pack_fp8_linears(self, self.head_kernel, keep=keep)  # FP8-resident ones in e4m3 pairs
        return n

    def int8_lm_head(self) -> None:
        """The optional speed mode `model.int8_lm_head` (model/int8.py): after loading, the lm_head
        becomes a dynamic int8 linear (half the bytes read per token); its bf16/fp32 copy is dropped
        unless the embedding shares it."""
        self.lm_head = Int8Linear(self.lm_head.weight)
        self.head_screen = None

    def keep_fp8(self, fp8_names: set[str], block: tuple[int, int]) -> int:
        """Before loading: every linear (and routed-expert stack) the checkpoint stores in FP8 is
        made to hold e4m3 weights and block scales instead of dense ones (model/fp8.py).
        `fp8_names` are hub tensor names; returns how many linears were converted."""
        dtype = self.embed_tokens.weight.dtype
        n = convert_linears(self, lambda name: f"model.{name}.weight" in fp8_names or f"{name}.weight" in fp8_names,
                            block, dtype)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoE) and any(
                    name.startswith(f"model.layers.{i}.mlp.experts.") for name in fp8_names):
                layer.mlp.experts.to_fp8(block)
        return n

    def weight_bytes(self) -> dict[str, int]:
        """Resident bytes of the weights this process holds, by storage: "fp8" (e4m3 weights),
        "scales" (their fp32 block scales), "dense" (everything else, prepacked copies included), "int8" (the int8 lm_head, when that
        speed mode is on) and "head_screen" (the greedy rows' int8 screen beside a packed head)."""
        out = {"fp8": 0, "scales": 0, "dense": 0}
        pair_packed = {f"{name}.packed" for name, mod in self.named_modules() if isinstance(mod, PairPackedLinear)}
        pair_packed |= {f"{name}.{p}" for name, mod in self.named_modules() if isinstance(mod, PackedSwiGLU)
                        for p in ("gate_up", "down")}
        pair_packed |= {f"{name}.{p}" for name, mod in self.named_modules()
                        if isinstance(mod, (PairPackedFp8Linear, PairPackedFp8SwiGLU)) for p in mod.PACKED}
        for name, p in self.named_parameters():
            if name in pair_packed:  # counted below at their dense size, as oneDNN's packed weights
                continue
            if p.dtype in FP8_DTYPES:
                out["fp8"] += tensor_bytes(p)
            elif name.endswith("scale_inv"):
                out["scales"] += tensor_bytes(p)
            else:
                out["dense"] += tensor_bytes(p)
        for mod in self.modules():  # oneDNN-packed (bf16) weights are not parameters: their dense size
            if isinstance(mod, (PackedLinear, PairPackedLinear)):  # (pair packing pads rows to 32)
                out["dense"] += mod.in_features * mod.out_features * 2
            elif isinstance(mod, PackedSwiGLU):
                out["dense"] += mod.dense_bytes
            elif isinstance(mod, (PairPackedFp8Linear, PairPackedFp8SwiGLU)):  # e4m3 pairs (rows padded to 32)
                out["fp8"] += mod.fp8_bytes
            elif isinstance(mod, Int8Linear):
                out["int8"] = out.get("int8", 0) + mod.weight_bytes
            elif isinstance(mod, ScreenedHead):  # not dense: its int8 copy is the extra the screen costs
                out["dense"] -= sum(tensor_bytes(p) for p in mod.parameters())
                out["head_screen"] = mod.weight_bytes
        for moe in self.moe_layers():
            if moe.experts.packed is not None:
                out["dense"] += moe.experts.param_count * 2
        return out

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def wants_expert(self, layer: int, expert: int) -> bool:
        if self.slot_experts is not None:
            return expert in self.slot_experts.get(layer, ())
        return self.expert_range[0] <= expert < self.expert_range[1]

    def _local_slots(self, layer: int, expert: int) -> list[int]:
        if self.slot_experts is not None:
            return [i for i, e in enumerate(self.slot_experts[layer]) if e == expert]
        return [expert - self.expert_range[0]]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: MLAKVCache) -> torch.Tensor:
        """Runs the layers over the batch's new tokens; returns final hidden states [T, H]."""
        if not batch.starts and batch.extend_lens:
            batch.prepare()
        x = self.embed_tokens(batch.input_ids)
        cos, sin = self.rope.cos_sin(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, kv, self.rope, cos, sin)
        return self.norm(x)

    def static_unsupported(self) -> str | None:
        """Why a decode step of this model cannot take fixed shapes (decode_static), None if it can:
        every routed expert here, dense (ExpertWeights.static_unsupported), and no FP8-resident
        linear (their dequantization reads the scales' range on the host, dequantize_fp8)."""
        for moe in self.moe_layers():
            if not isinstance(moe.routed, LocalExperts):
                return "expert parallelism (the all-to-all's split sizes are read on the host)"
            reason = moe.experts.static_unsupported()
            if reason:
                return reason
        if any(isinstance(m, (Fp8Linear, PairPackedFp8Linear, PairPackedFp8SwiGLU)) for m in self.modules()):
            return "FP8-resident linears"
        return None

    @torch.inference_mode()
    def decode_static(self, rows: DecodeRows, kv: MLAKVCache) -> torch.Tensor:
        """The final hidden states [B, H] of a decode step in fixed shapes with no host sync, so it
        can be captured and replayed as a graph (actors/decode_graphs.py); the same math as forward()
        on a pure-decode batch, without its shared-prefix split."""
        x = self.embed_tokens(rows.input_ids)
        cos, sin = self.rope.cos_sin(rows.positions, x.dtype)
        pad = rows.pad()
        for layer in self.layers:
            x = layer.decode_static(x, rows, pad, kv, self.rope, cos, sin)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head over the rows to sample. A dense CPU head (fp32, or bf16 where oneDNN does
        not pack) at up to HEAD_KERNEL_MAX_ROWS rows streams its weight through the CPU kernel:
        2.6-3.9x torch's fp32 F.linear at 1-16 rows here; a packed or int8 head keeps its own."""
        head = self.lm_head
        if (self.head_kernel is not None and type(head) is nn.Linear and hidden.dim() == 2
                and hidden.shape[0] <= HEAD_KERNEL_MAX_ROWS and hidden.dtype == head.weight.dtype):
            return self.head_kernel.linear_small(hidden, head.weight)
        return head(hidden)

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """argmax of logits(hidden) per row through the head's int8 screen (model/greedy_head.py),
        or None where there is none or it does not pay on this CPU (ScreenedHead.serves)."""
        if self.head_screen is None or not self.head_screen.serves(self.lm_head, hidden):
            return None
        return self.head_screen.greedy(hidden, self.lm_head)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies hub-named tensors into the model; returns the parameter names that were filled."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        with torch.no_grad():
            for name, tensor in weights:
                for target, index in self._map_name(name, params):
                    param = params[target]
                    dst = param[index] if index is not None else param
                    if dst.shape != tensor.shape:
                        raise ValueError(f"{name}: expected shape {tuple(dst.shape)}, got {tuple(tensor.shape)}")
                    if isinstance(tensor, Fp8Tensor):
                        if param.dtype in FP8_DTYPES:  # kept resident: the e4m3 bytes and their scales
                            if tensor.data.dtype != param.dtype:
                                raise ValueError(f"{name}: stored as {tensor.data.dtype}; weights kept resident "
                                                 f"must be {param.dtype} (set model.keep_fp8: false to "
                                                 "dequantize them at load)")
                            dst.copy_(tensor.data)
                            scale_name, scale_index = self._scale_of(target, index)
                            scale = params[scale_name]
                            (scale[scale_index] if scale_index is not None else scale).copy_(tensor.scale_inv)
                            filled.add(target if index is None else f"{target}[{index}]")
                            continue
                        tensor = tensor.dequantize(param.dtype)
                    dst.copy_(tensor.to(param.dtype))
                    filled.add(target if index is None else f"{target}[{index}]")
        if self.config.tie_word_embeddings and "lm_head.weight" not in filled:
            self.lm_head.weight = self.embed_tokens.weight
            filled.add("lm_head.weight")
        return filled

    @staticmethod
    def _scale_of(target: str, index) -> tuple[str, object]:
        """The block-scale parameter (and index) beside an FP8 weight parameter."""
        if target.endswith(".w13"):  # gate rows [0, inter) then up rows: each keeps its own grid
            local, rows = index
            return f"{target[:-4]}.w{1 if rows.start == 0 else 3}_scale_inv", local
        if target.endswith(".w2"):
            return f"{target[:-3]}.w2_scale_inv", index
        return f"{target}_scale_inv", None

    def _map_name(self, name: str, params: dict) -> list[tuple[str, object]]:
        """hub name → [(our parameter name, index or None)]: several for an expert held in several
        local slots, none for tensors not ours."""
        if name.startswith("model."):
            name = name[len("model."):]
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) >= self.config.num_hidden_layers:
            return []  # MTP layer
        if len(parts) >= 6 and parts[2] == "mlp" and parts[3] == "experts":
            layer, expert, proj = int(parts[1]), int(parts[4]), parts[5]
            if not self.wants_expert(layer, expert):
                return []
            inter = self.config.moe_intermediate_size
            base = f"layers.{layer}.mlp.experts"
            out: list[tuple[str, object]] = []
            for local in self._local_slots(layer, expert):
                if proj == "gate_proj":
                    out.append((f"{base}.w13", (local, slice(0, inter))))
                elif proj == "up_proj":
                    out.append((f"{base}.w13", (local, slice(inter, 2 * inter))))
                else:
                    out.append((f"{base}.w2", local))
            return out
        if name in params:
            return [(name, None)]
        return []


def build_model(config: ModelConfig, dtype: torch.dtype, expert_range: tuple[int, int] | None = None,
                device: torch.device | str = "cpu",
                slot_experts: dict[int, list[int]] | None = None) -> DeepseekV3Model:
    """An empty model in `dtype`, the gate kept in fp32 as the reference keeps it."""
    with torch.device(device):
        model = DeepseekV3Model(config, expert_range, slot_experts).to(dtype)
    for moe in model.moe_layers():
        moe.gate.float()
    model.rope.reset_frequencies()  # positions rotate in fp32, as the reference's do
    return model.eval()
