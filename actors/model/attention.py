"""Multi-head latent attention (MLA) over the paged latent KV cache.

New tokens' latents and rotated k_pe are written to their slots first; each sequence then attends
over its whole context read back from the cache. On the CPU kernels every row of a step (decode
rows, and on AMX CPUs bf16 prefill rows too) goes through one absorbed `mla_attend` call per layer
(batch.attend_plan). Otherwise prefill chunks (a sequence with several new tokens, possibly after a
cached prefix) run one sequence at a time with a causal mask, expanded as the reference computes
them, and decode tokens of all sequences run together, padded to the longest context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..forward_batch import ForwardBatch
from ..kv_cache import MLAKVCache
from .config import ModelConfig
from .fp8 import Fp8Linear
from .layers import RMSNorm
from .packed import PairPackedLinear, emulated_bf16
from .rope import RotaryEmbedding, softmax_scale


# Above this many multiply-adds a per-head matmul goes to torch.bmm (oneDNN blocks it; the kernel's
# vector loop runs ~60 GFMA/s here): `small` at batch 32 is ~1M, DeepSeek-R1's W_UK at batch 1 8M.
BMM_KERNEL_MAX_MACS = 4 * 1024 * 1024


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in the scores' dtype. The reference computes softmax(dtype=float32)
    .to(dtype); torch's bf16 softmax accumulates in fp32 and rounds once too (equal but for the
    exp's last bit: 93 of 8.5M elements one bf16 ulp apart at 8 x 1032 x 1032), without the fp32
    copy of the scores, ~4-7x faster on CPU at a 1k-token prefill. fp32 scores: the same op."""
    return F.softmax(scores, dim=-1)


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        h, qk = config.hidden_size, config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk, bias=False)
        self.q_lora = config.q_lora_rank is not None
        self.q_lora_rank = config.q_lora_rank or 0
        self.kv_a_proj_with_mqa = nn.Linear(h, config.kv_lora_rank + self.rope_dim, bias=False)
        # q_a_proj and kv_a_proj_with_mqa as one pair-packed linear (fuse_projections), both read x
        self.qkv_a: nn.Module | None = None
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=False)
        self.scale = softmax_scale(config)
        self._absorbed_key: tuple[int, int] | None = None
        # mla_attention's weight arguments (_block_args) and the kv_b_proj key they were taken at
        self._block: tuple | None = None
        self._block_key: tuple[int, int] | None = None
        self._w_uk: torch.Tensor | None = None  # [heads, nope, rank]
        # an FP8-resident kv_b_proj's split, dequantized once per forward call and dropped after it
        self._call_absorbed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._w_uv_t: torch.Tensor | None = None  # [heads, rank, v]
        # the CPU kernels' ops (kernels/mla_cpu.cpp) once `use_kernel` found them; None: torch's ops
        self.kernel = None
        self.kernel_prefill = False  # whether bf16 prefill rows take the kernel too (its AMX path)

    def use_kernel(self) -> bool:
        """Attention through the CPU MLA kernel (built on first use): the context read at its KV
        slots, no padded gather, no per-step bmm set-up. Decode rows always; where the CPU has AMX,
        bf16 prefill rows too (absorbed, as tile GEMMs: the reference's per-sequence expansion of
        the context through kv_b_proj is what a prefill spent its attention time on). fp32 prefill
        keeps the reference's expanded form. False on CUDA or with no compiler."""
        if self.kv_a_layernorm.weight.device.type != "cpu":
            return False
        from .kernels import cpu_kernels

        self.kernel = cpu_kernels()
        if self.kernel is not None:
            self.kernel_prefill = self.kernel.mla_attend_on_tiles(self.kv_lora_rank + self.rope_dim, self.kv_lora_rank)
        return self.kernel is not None

    def fuse_projections(self, ops) -> int:
        """With the CPU kernels' pair-packed linears: q_a_proj and kv_a_proj_with_mqa (which both
        read x) become one PairPackedLinear, qkv_a (their rows stacked, no copy kept of either).
        Before pair_pack_linears; 1 if fused, else 0 (no q_lora, not bf16 CPU linears)."""
        lins = (getattr(self, "q_a_proj", None), self.kv_a_proj_with_mqa)
        if not self.q_lora or not all(type(lin) is nn.Linear and lin.bias is None and lin.weight.dtype == torch.bfloat16
                                      and lin.weight.device.type == "cpu" and lin.in_features % 2 == 0 for lin in lins):
            return 0
        both = nn.Linear(lins[0].in_features, sum(lin.out_features for lin in lins), bias=False,
                         dtype=torch.bfloat16, device="meta")
        both.weight = nn.Parameter(torch.cat([lin.weight for lin in lins]), requires_grad=False)
        self.qkv_a = PairPackedLinear(both, ops)
        self.q_a_proj = self.kv_a_proj_with_mqa = None
        return 1

    def _matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """torch.matmul; in bf16 on a CPU without bf16 matmul instructions (AVX2: oneDNN emulates
        them, 4-7x slower than its fp32 matmul) in fp32, rounded once to bf16 as a bf16 matmul's
        fp32-accumulated output is."""
        if emulated_bf16(a):
            return torch.matmul(a.float(), b.float()).to(a.dtype)
        return torch.matmul(a, b)

    def _on_kernel(self, x: torch.Tensor, batch: ForwardBatch, kv: MLAKVCache) -> bool:
        if self.kernel is None or x.device.type != "cpu" or x.dtype != kv.joint.dtype:
            return False
        pure_decode = bool(batch.decode_seqs) and len(batch.decode_seqs) == x.shape[0]
        return pure_decode or (self.kernel_prefill and x.dtype == torch.bfloat16)

    def _fused_rows(self, x: torch.Tensor, cos: torch.Tensor) -> bool:
        """Whether the row steps around the projections run as mla_kv_write / mla_query (bf16, fused
        projections, the kernels built)."""
        return self.qkv_a is not None and self.kernel is not None and x.dtype == cos.dtype == torch.bfloat16

    def _block_args(self) -> tuple | None:
        """mla_attention's weight arguments where this layer's block can be one call (the fused row
        steps, every projection pair-packed bf16 -- not FP8-resident --, the kernels built), else
        None. Gathered once and kept: at one token each nn.Module attribute lookup costs ~1 us and
        the call takes ten of them; rebuilt when kv_b_proj's weight changes (as _absorbed is)."""
        kvb = self.kv_b_proj
        if type(kvb) is not nn.Linear:  # (an FP8-resident kv_b_proj: the separate calls)
            return None
        key = (kvb.weight.data_ptr(), kvb.weight._version)
        if self._block_key == key:
            return self._block
        if not (self.qkv_a is not None and self.kernel is not None and type(self.q_b_proj) is PairPackedLinear
                and type(self.o_proj) is PairPackedLinear):
            return None  # (not kept: use_cpu_kernels may make it ready later)
        w_uk, w_uv_t = self._absorbed()
        self._block = (self.qkv_a.packed, self.q_lora_rank, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
                       self.q_a_layernorm.weight, self.q_a_layernorm.eps, self.q_b_proj.packed, w_uk, w_uv_t,
                       self.o_proj.packed, self.o_proj.out_features)
        self._block_key = key
        return self._block

    def _one_call(self, x: torch.Tensor, cos: torch.Tensor, batch: ForwardBatch, kv: MLAKVCache) -> bool:
        """Whether the block from x to o_proj's output is one `mla_attention` call: bf16 rows on the
        kernel, the weights ready for it (_block_args), both per-head matmuls small enough for
        bmm_small."""
        return (x.dtype == cos.dtype == torch.bfloat16 and self._block_args() is not None  # (_fused_rows' test)
                and self._on_kernel(x, batch, kv)
                and x.shape[0] * self.num_heads * max(self.nope, self.v_dim) * self.kv_lora_rank
                <= BMM_KERNEL_MAX_MACS)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: MLAKVCache, rope: RotaryEmbedding,
                cos: torch.Tensor, sin: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        """Attention over x's rows; with `norm` (the decoder layer's input RMSNorm) the residual
        block x + attention(norm(x)), one kernel call where the block takes one (_one_call)."""
        try:
            if self._one_call(x, cos, batch, kv) and (norm is None or norm.on_kernel(x)):
                qkv_a, q_lora, kv_norm, kv_eps, q_norm, q_eps, q_b, w_uk, w_uv_t, o_proj, n_out = self._block
                plan = batch.attend_plan()
                return self.kernel.mla_attention(
                    x, qkv_a, q_lora, kv_norm, kv_eps, q_norm, q_eps, q_b, cos, sin, w_uk, w_uv_t,
                    kv.joint[self.layer], batch.out_slots, plan.shared, plan.slots, plan.seq, plan.lens, self.scale,
                    o_proj, n_out, rope.interleave, None if norm is None else norm.weight,
                    1e-6 if norm is None else norm.eps)
            if norm is None:
                return self._forward(x, batch, kv, rope, cos, sin)
            return x + self._forward(norm(x), batch, kv, rope, cos, sin)
        finally:
            if self._call_absorbed is not None:  # an FP8 kv_b_proj's dequantized copy lives for one call only
                self._call_absorbed = None

    def _forward(self, x: torch.Tensor, batch: ForwardBatch, kv: MLAKVCache, rope: RotaryEmbedding,
                 cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        on_kernel = self._on_kernel(x, batch, kv)
        if (on_kernel and self._fused_rows(x, cos) and isinstance(self.q_b_proj, PairPackedLinear)  # (an even q_lora_rank)
                and t * self.num_heads * self.nope * self.kv_lora_rank <= BMM_KERNEL_MAX_MACS):
            q_cat = self._project(x, batch.out_slots, kv, rope, cos, sin, absorbed=True)
            out = self._attend_latent(q_cat, batch, kv, absorbed=True)
            return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))
        q = self._project(x, batch.out_slots, kv, rope, cos, sin)
        if on_kernel:
            return self.o_proj(self._attend_latent(q, batch, kv).reshape(t, self.num_heads * self.v_dim))
        if batch.decode_seqs and len(batch.decode_seqs) == t:  # pure decode: one row per sequence, in order
            return self.o_proj(self._decode(q, batch, kv).reshape(t, self.num_heads * self.v_dim))
        out = x.new_empty(t, self.num_heads, self.v_dim)
        if batch.decode_seqs:
            out[batch.decode_rows] = self._decode(q[batch.decode_rows], batch, kv)
        batched = set(batch.decode_seqs)
        shared = batch.extend_shared
        prefix = self._expand(shared, kv) if shared is not None and shared.numel() else None
        for i, n in enumerate(batch.extend_lens):
            if i not in batched and n > 0:
                a = batch.starts[i]
                out[a : a + n] = self._extend(q[a : a + n], batch.ctx_slots[i], kv, prefix)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))

    def _project(self, x: torch.Tensor, out_slots: torch.Tensor, kv: MLAKVCache, rope: RotaryEmbedding,
                 cos: torch.Tensor, sin: torch.Tensor, absorbed: bool = False) -> torch.Tensor:
        """The rows' query [T, heads, nope | rope], rotated, after their latents and k_pe are written
        to `out_slots`; `absorbed` (the fused row steps only): mla_query's [T, heads, rank | rope]."""
        t = x.shape[0]
        if self._fused_rows(x, cos):
            a = self.qkv_a(x)
            q_a, kv_a = a[:, : self.q_lora_rank], a[:, self.q_lora_rank :]
            # latent normed and k_pe rotated straight into the cache
            self.kernel.mla_kv_write(kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin,
                                     kv.joint[self.layer], out_slots, rope.interleave)
            if absorbed:
                return self.kernel.mla_query(q_a, self.q_a_layernorm.weight, self.q_a_layernorm.eps,
                                             self.q_b_proj.packed, cos, sin, self._absorbed()[0], rope.interleave)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
            latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
            latent = self.kv_a_layernorm(latent)
            k_rot = rope.rotate_tail(k_rot.unsqueeze(1), 0, cos, sin).squeeze(1)
            kv.write(self.layer, out_slots, latent, k_rot)
        return rope.rotate_tail(q.view(t, self.num_heads, self.nope + self.rope_dim), self.nope, cos, sin)

    def decode_static(self, x: torch.Tensor, out_slots: torch.Tensor, slots: torch.Tensor, pad: torch.Tensor,
                      kv: MLAKVCache, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One decode row per sequence with every shape fixed by its arguments' and no host sync, so
        it can be captured as a graph (actors/decode_graphs.py): `slots` [B, W] each row's whole
        context, `pad` [B, W] True past its end. Absorbed, as _decode, without the shared-prefix split
        (its length changes from step to step)."""
        q = self._project(x, out_slots, kv, rope, cos, sin)
        out = self._absorbed_decode(q, kv, slots, pad)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_dim))

    def _expand(self, slots: torch.Tensor, kv: MLAKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Context slots [..., L] → keys [..., L, heads, qk] and values [..., L, heads, v]."""
        latent, k_pe = kv.read(self.layer, slots)
        if type(self.kv_b_proj) is nn.Linear and emulated_bf16(latent):
            kvb = self._matmul(latent, self.kv_b_proj.weight.t())
        else:
            kvb = self.kv_b_proj(latent)
        kvb = kvb.unflatten(-1, (self.num_heads, self.nope + self.v_dim))
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)], dim=-1)
        return k, v

    def _extend(self, q: torch.Tensor, slots: torch.Tensor, kv: MLAKVCache,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One sequence: q [n, heads, qk] for its last n context positions, causal. Expands the
        latent context to per-head keys and values, as the reference computes prefill; `prefix`
        is the keys and values of the step's shared prefix (batch.extend_shared), expanded once."""
        n, ctx = q.shape[0], slots.numel()
        if prefix is None:
            k, v = self._expand(slots, kv)
        else:
            k, v = self._expand(slots[prefix[0].shape[0]:], kv)
            k, v = torch.cat([prefix[0], k]), torch.cat([prefix[1], v])
        qt, kt = q.transpose(0, 1), k.permute(1, 2, 0)
        if q.dtype == torch.float32:  # the reference's ops in its order: fp32 tokens stay transformers'
            scores = self._matmul(qt, kt) * self.scale  # [heads, n, ctx]
            if n > 1:  # causal: only the last n columns can lie after a query row
                qpos = torch.arange(n, device=q.device).unsqueeze(1)
                scores[..., ctx - n :].masked_fill_(torch.arange(n, device=q.device).unsqueeze(0) > qpos,
                                                    float("-inf"))
        else:
            # bf16: scale and causal mask inside the GEMM's epilogue (one baddbmm, the mask a [n, ctx]
            # bias broadcast over heads), not two passes over [heads, n, ctx], the scores rounded once
            # instead of twice; with softmax_rows a 1-2k-token prefill's attention runs 2.3-2.5x here
            if emulated_bf16(q):  # (no bf16 matmul instructions: multiplied in fp32, rounded once)
                qt, kt = qt.float(), kt.float()
            bias = torch.zeros(n, ctx, dtype=qt.dtype, device=q.device)
            if n > 1:
                bias[:, ctx - n :].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1),
                                                float("-inf"))
            scores = torch.baddbmm(bias, qt, kt, alpha=self.scale).to(q.dtype)
        return self._matmul(softmax_rows(scores), v.transpose(0, 1)).transpose(0, 1)  # [n, heads, v]

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_UK [heads, nope, rank] and W_UV^T [heads, rank, v], as
        contiguous bmm operands, rebuilt only when the weight changes."""
        if isinstance(self.kv_b_proj, Fp8Linear):  # FP8 resident: dequantized once a call, never kept
            if self._call_absorbed is None:
                self._call_absorbed = self._split_absorbed(self.kv_b_proj.dequantized())
            return self._call_absorbed
        weight = self.kv_b_proj.weight
        key = (weight.data_ptr(), weight._version)
        if self._absorbed_key != key or self._w_uk is None or self._w_uv_t is None:
            self._w_uk, self._w_uv_t = self._split_absorbed(weight.detach())
            self._absorbed_key = key
        return self._w_uk, self._w_uv_t

    def _split_absorbed(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope].contiguous(), w[:, self.nope :].transpose(1, 2).contiguous()

    def _bmm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """torch.bmm, or at decode sizes in bf16 the CPU kernels' bmm_small (torch's pays ~50 us of
        set-up per call for these shapes: 8 calls a step)."""
        if (self.kernel is not None and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
                and x.device.type == "cpu" and x.numel() * w.shape[-1] <= BMM_KERNEL_MAX_MACS):
            return self.kernel.bmm_small(x, w)
        return self._matmul(x, w)

    def _query_latent(self, q: torch.Tensor) -> torch.Tensor:
        """[rows, heads, nope | rope] -> [rows, heads, rank | rope]: W_UK folded into the query."""
        w_uk, _ = self._absorbed()
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        q_lat = self._bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [rows, heads, rank]
        return torch.cat([q_lat, q_rot], dim=-1)

    def _attend_latent(self, q: torch.Tensor, batch: ForwardBatch, kv: MLAKVCache, absorbed: bool = False) -> torch.Tensor:
        """Every row of the step in one CPU kernel call (batch.attend_plan), absorbed; `absorbed`: q is
        already [rows, heads, rank | rope] (mla_query), else [rows, heads, nope | rope]."""
        plan = batch.attend_plan()
        q_cat = q if absorbed else self._query_latent(q)
        out_lat = self.kernel.mla_attend(q_cat, kv.joint[self.layer], plan.shared, plan.slots,
                                         plan.seq, plan.lens, self.scale, self.kv_lora_rank)
        return self._bmm(out_lat.transpose(0, 1), self._absorbed()[1]).transpose(0, 1)  # [rows, heads, v]

    def _decode(self, q: torch.Tensor, batch: ForwardBatch, kv: MLAKVCache) -> torch.Tensor:
        """Many sequences, one new token each, attending in the latent space (DeepSeek's absorbed
        MLA): W_UK folds into the query and W_UV into the output, so the cached latents are read
        as they are instead of being expanded to per-head keys and values every step."""
        return self._absorbed_decode(q, kv, batch.decode_slots, batch.decode_pad, batch.decode_shared)

    def _absorbed_decode(self, q: torch.Tensor, kv: MLAKVCache, slots: torch.Tensor, pad: torch.Tensor,
                         shared: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, heads, nope | rope] over each row's context: `shared` [P] slots every row starts
        with (gathered once), then slots [B, L] (True in pad [B, L] past a row's end) → [B, heads, v]."""
        w_uv_t = self._absorbed()[1]
        q_cat = self._query_latent(q)  # [B, heads, rank + rope]
        ctx = kv.read_joint(self.layer, slots)  # [B, L, rank + rope]: latent, k_pe
        # one matmul over [rank | rope]: q_lat . latent + q_rot . k_pe
        scores = torch.matmul(q_cat, ctx.transpose(1, 2))  # [B, heads, L]
        p = 0 if shared is None else shared.numel()
        if p:  # the prefix all rows share: gathered once, one [B * heads, P] matmul for the batch
            ctx_shared = kv.read_joint(self.layer, shared)  # [P, rank + rope]
            b, h, d = q_cat.shape
            scores = torch.cat([torch.mm(q_cat.reshape(b * h, d), ctx_shared.t()).view(b, h, p), scores], dim=-1)
        scores.mul_(self.scale)
        scores[..., p:].masked_fill_(pad[:, None, :], float("-inf"))
        probs = softmax_rows(scores)
        out_lat = torch.matmul(probs[..., p:], ctx[..., : self.kv_lora_rank])  # [B, heads, rank]
        if p:
            b, h, _ = out_lat.shape
            out_lat += torch.mm(probs[..., :p].reshape(b * h, p), ctx_shared[:, : self.kv_lora_rank]).view(b, h, -1)
        return torch.bmm(out_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [B, heads, v]
