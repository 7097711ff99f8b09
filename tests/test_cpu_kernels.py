"""Issue 14: the hand-written CPU kernels (actors/model/kernels) compute what the torch paths
compute. The MoE kernel equals the per-expert F.linear loop on shapes with vector and tile tails,
experts with no rows and experts past its row limit (its at::linear branch), under the EP backend
too; the MLA decode kernel equals the padded gather + matmul + softmax path, with and without a
shared prefix; the few-rows linear (the dense lm_head's) equals F.linear; and an engine on all
three keeps transformers' greedy tokens."""
from __future__ import annotations

import shutil

import pytest
import torch

from _reference import PROMPTS, hf_greedy
from expertmesh.actors.model.experts import ExpertWeights
from expertmesh.actors.model.kernels import cpu_kernels

torch.set_num_threads(2)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler on this machine: the kernel cannot be built")


def _weights(count: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    w = ExpertWeights(0, count, hidden, inter)
    with torch.no_grad():
        w.w13.copy_(torch.randn(w.w13.shape, generator=gen) * 0.1)
        w.w2.copy_(torch.randn(w.w2.shape, generator=gen) * 0.1)
    return w.to(dtype)


def _loop(w: ExpertWeights, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    start, rows = 0, []
    for e, n in enumerate(counts):
        rows.append(w._ffn(e, xs[start:start + n]))
        start += n
    return torch.cat(rows)


def test_the_kernel_builds_here():
    """setup.sh builds it; a test session on a machine with a compiler must find it."""
    ops = cpu_kernels()
    assert ops is not None
    assert ops.vector_width() in (1, 8, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,inter", [(64, 32), (40, 24), (72, 50)])
def test_kernel_equals_the_per_expert_loop(dtype, hidden, inter):
    """fp32: equal to rounding (only the order of each dot product's additions differs); bf16:
    within one bf16 step of the output's scale (each intermediate is rounded as F.linear, silu
    and the product round it)."""
    w = _weights(8, hidden, inter, dtype)
    counts = [3, 0, 5, 1, 0, 9, 7, 2]  # 9 > max_rows=8 below: that expert takes at::linear
    xs = (torch.randn(sum(counts), hidden, generator=torch.Generator().manual_seed(1))).to(dtype)
    want = _loop(w, xs, counts).float()
    for max_rows in (8, 64):
        got = cpu_kernels().grouped_ffn(xs, w.w13, w.w2, counts, max_rows)
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().item()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
        else:
            assert (got.float() - want).abs().max().item() <= 2 ** -7 * scale
            assert (got.float() - want).abs().mean().item() <= 2 ** -10 * scale
    assert cpu_kernels().grouped_ffn(xs[:0], w.w13, w.w2, [0] * 8, 64).shape == (0, hidden)


def test_grouped_ffn_uses_the_kernel_once_enabled():
    w = _weights(8, 64, 32, torch.float32)
    counts = [2, 0, 1, 4, 0, 0, 3, 1]
    xs = torch.randn(sum(counts), 64)
    before = w.grouped_ffn(xs, counts)
    assert w.use_kernel() and w.kernel is not None
    assert not w.prepack()  # the kernel reads the dense stacks: they stay
    torch.testing.assert_close(w.grouped_ffn(xs, counts), before, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_with_a_clear_error():
    ops = cpu_kernels()
    w = _weights(4, 64, 32, torch.float32)
    xs = torch.randn(5, 64)
    with pytest.raises(RuntimeError, match="counts sum to xs.size"):
        ops.grouped_ffn(xs, w.w13, w.w2, [1, 1, 1, 1], 64)
    with pytest.raises(RuntimeError, match="one count per expert"):
        ops.grouped_ffn(xs, w.w13, w.w2, [5], 64)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.grouped_ffn(xs.bfloat16(), w.w13, w.w2, [5, 0, 0, 0], 64)
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.grouped_ffn(xs, w.w13, w.w2, [6, -1, 0, 0], 64)


def test_expert_parallel_backend_with_the_kernel_equals_local(tmp_path):
    """The EP backend's grouped FFN (a 1-rank gloo group) runs the same kernel as the local one."""
    from _engine_runs import ep_and_local_outputs

    w = _weights(8, 64, 32, torch.bfloat16, seed=3)
    assert w.use_kernel()
    ep, local = ep_and_local_outputs(w, w, tmp_path / "store", torch.Generator().manual_seed(4))
    assert torch.equal(ep, local)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_moe_experts_is_bitwise_the_permute_gather_ffn_combine_steps(dtype, tokens):
    """The routed-experts step in one call: the same bits as permute_by_expert + gather_rows +
    grouped_ffn + combine (what LocalExperts ran op by op), with experts 100-107 held here (first
    = 100), some of them chosen by no token, and big experts past max_rows at 200 tokens."""
    from expertmesh.actors.model.experts import combine, gather_rows, permute_by_expert

    ops = cpu_kernels()
    gen = torch.Generator().manual_seed(tokens)
    w = _weights(8, 64, 96, dtype, seed=tokens)
    ids = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(tokens)]) + 100  # experts 6, 7 idle
    weights = torch.rand(tokens, 3, generator=gen)
    x = torch.randn(tokens, 64, generator=gen).to(dtype)
    order, counts = permute_by_expert(ids - 100, 8)
    outs = ops.grouped_ffn(gather_rows(x, order // 3), w.w13, w.w2, counts.tolist(), 16)
    want = combine(outs, order, weights, tokens, 3, ops)
    got = ops.moe_experts(x, ids, weights, w.w13, w.w2, 100, 16)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    bad = ids.clone()
    bad[0, 0] = 99
    with pytest.raises(RuntimeError, match="is not one of"):
        ops.moe_experts(x, bad, weights, w.w13, w.w2, 100, 16)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_packed_swiglu_is_the_dense_mlp(rows):
    """A dense MLP / shared expert in one swiglu_packed call: DenseMLP's bf16 outputs up to the
    order of each dot product's additions (the same roundings of gate, up, silu, product, output)."""
    from expertmesh.actors.model.layers import DenseMLP
    from expertmesh.actors.model.packed import PackedSwiGLU

    if not cpu_kernels().has_packed_linear():
        pytest.skip("no pair-packed linears in this build")
    gen = torch.Generator().manual_seed(rows)
    mlp = DenseMLP(64, 96).to(torch.bfloat16)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.2)
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    want = mlp(x).float()
    got = PackedSwiGLU(mlp, cpu_kernels())(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 64)
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= 2 ** -6 * scale
    assert (got.float() - want).abs().mean().item() <= 2 ** -10 * scale


@pytest.mark.parametrize("interleave", [True, False])
def test_mla_row_steps_in_one_call_are_bitwise_the_separate_kernels(interleave):
    """mla_kv_write (kv_a_layernorm, the k_pe rotation, the cache write) and mla_query (q_a_layernorm,
    q_b_proj, the query rotation, W_UK folded in) give the bits of the kernels they chain; rows
    come as column slices of one projection's output, as attention.py hands them over."""
    from expertmesh.actors.model.packed import PairPackedLinear

    ops = cpu_kernels()
    if not ops.has_packed_linear():
        pytest.skip("no pair-packed linears in this build")
    gen = torch.Generator().manual_seed(int(interleave))
    t, heads, nope, rope, rank, q_lora = 5, 4, 16, 8, 32, 24

    def bf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    a = bf(t, q_lora + rank + rope)
    q_a, kv_a = a[:, :q_lora], a[:, q_lora:]
    cos, sin = bf(t, rope // 2), bf(t, rope // 2)
    kv_w, q_w = bf(rank, scale=0.5) + 1, bf(q_lora, scale=0.5) + 1
    cache = torch.zeros(16, rank + rope, dtype=torch.bfloat16)
    slots = torch.tensor([7, 3, 11, 1, 9])
    ops.mla_kv_write(kv_a, kv_w, 1e-6, cos, sin, cache, slots, interleave)
    latent = ops.rms_norm(kv_a[:, :rank], kv_w, 1e-6)
    k_pe = ops.rope_rows(kv_a[:, rank:].unsqueeze(1), cos, sin, 0, interleave).squeeze(1)
    assert torch.equal(cache[slots], torch.cat([latent, k_pe], dim=-1))
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots] = False
    assert not cache[untouched].any()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.mla_kv_write(kv_a, kv_w, 1e-6, cos, sin, cache, slots + 10, interleave)

    lin = torch.nn.Linear(q_lora, heads * (nope + rope), bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(bf(*lin.weight.shape, scale=0.3))
    q_b = PairPackedLinear(lin, ops)
    w_uk = bf(heads, nope, rank, scale=0.3)
    q = ops.linear_packed(ops.rms_norm(q_a, q_w, 1e-6), q_b.packed, heads * (nope + rope)).view(t, heads, nope + rope)
    q = ops.rope_rows(q, cos, sin, nope, interleave)
    q_lat = ops.bmm_small(q[..., :nope].transpose(0, 1), w_uk).transpose(0, 1)
    got = ops.mla_query(q_a, q_w, 1e-6, q_b.packed, cos, sin, w_uk, interleave)
    assert torch.equal(got, torch.cat([q_lat, q[..., nope:]], dim=-1))


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("prefix", [0, 5])
def test_mla_attention_in_one_call_is_bitwise_the_chained_kernels(interleave, prefix):
    """mla_attention (the whole absorbed block: qkv_a, mla_kv_write, mla_query, mla_attend, W_UV,
    o_proj) gives the bits of the kernels MLAttention chains, and writes the same cache cells."""
    from expertmesh.actors.model.packed import PairPackedLinear

    ops = cpu_kernels()
    if not ops.has_packed_linear():
        pytest.skip("no pair-packed linears in this build")
    gen = torch.Generator().manual_seed(2 * prefix + int(interleave))
    t, hidden, heads, nope, rope, rank, q_lora, v = 3, 64, 4, 16, 8, 32, 24, 16

    def bf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    def packed(n_out, n_in):
        lin = torch.nn.Linear(n_in, n_out, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(bf(n_out, n_in, scale=0.2))
        return PairPackedLinear(lin, ops)

    qkv_a, q_b, o_proj = packed(q_lora + rank + rope, hidden), packed(heads * (nope + rope), q_lora), packed(hidden, heads * v)
    kv_w, q_w = bf(rank, scale=0.5) + 1, bf(q_lora, scale=0.5) + 1
    w_uk, w_uv_t = bf(heads, nope, rank, scale=0.3), bf(heads, rank, v, scale=0.3)
    x, cos, sin = bf(t, hidden), bf(t, rope // 2), bf(t, rope // 2)
    cache = bf(32, rank + rope)
    shared = torch.arange(20, 20 + prefix)
    slots = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0], [7, 8, 9, 10, 11]])  # each row's new slot last
    out_slots, lens, seq = torch.tensor([4, 6, 11]), torch.tensor([4, 2, 5]), torch.arange(t)

    want_cache = cache.clone()
    a = ops.linear_packed(x, qkv_a.packed, q_lora + rank + rope)
    ops.mla_kv_write(a[:, q_lora:], kv_w, 1e-6, cos, sin, want_cache, out_slots, interleave)
    q = ops.mla_query(a[:, :q_lora], q_w, 1e-6, q_b.packed, cos, sin, w_uk, interleave)
    lat = ops.mla_attend(q, want_cache, shared, slots, seq, lens, 0.3, rank)
    o = ops.bmm_small(lat.transpose(0, 1), w_uv_t).transpose(0, 1)
    want = ops.linear_packed(o.reshape(t, heads * v), o_proj.packed, hidden)

    got = ops.mla_attention(x, qkv_a.packed, q_lora, kv_w, 1e-6, q_w, 1e-6, q_b.packed, cos, sin, w_uk, w_uv_t,
                            cache, out_slots, shared, slots, seq, lens, 0.3, o_proj.packed, hidden, interleave)
    assert torch.equal(got, want) and torch.equal(cache, want_cache)
    # with the layer's input norm: the residual block x + attention(rms_norm(x))
    norm_w = bf(hidden, scale=0.5) + 1
    resid = ops.mla_attention(x, qkv_a.packed, q_lora, kv_w, 1e-6, q_w, 1e-6, q_b.packed, cos, sin, w_uk, w_uv_t,
                              cache, out_slots, shared, slots, seq, lens, 0.3, o_proj.packed, hidden, interleave,
                              norm_w, 1e-5)
    normed = ops.mla_attention(ops.rms_norm(x, norm_w, 1e-5), qkv_a.packed, q_lora, kv_w, 1e-6, q_w, 1e-6, q_b.packed,
                               cos, sin, w_uk, w_uv_t, cache, out_slots, shared, slots, seq, lens, 0.3, o_proj.packed,
                               hidden, interleave)
    assert torch.equal(resid, x + normed)
    with pytest.raises(RuntimeError, match="w_uv_t"):
        ops.mla_attention(x, qkv_a.packed, q_lora, kv_w, 1e-6, q_w, 1e-6, q_b.packed, cos, sin, w_uk, w_uv_t[:, 1:],
                          cache, out_slots, shared, slots, seq, lens, 0.3, o_proj.packed, hidden, interleave)


def test_fp32_engine_on_the_kernel_keeps_transformers_greedy_tokens(tiny_ckpt):
    """Batched prefill and decode through the kernel: the greedy tokens stay transformers'."""
    from _engine_runs import greedy_reqs, run
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    engine = Engine(EngineConfig(str(tiny_ckpt), scheduler=SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)))
    try:
        worker = engine.executor.worker
        assert all(m.experts.kernel is not None for m in worker.model.moe_layers())
        assert all(layer.self_attn.kernel is not None for layer in worker.model.layers)
        assert worker.model.head_kernel is not None
        prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[6], PROMPTS[7]]
        assert run(engine, greedy_reqs(prompts, "k")) == hf_greedy(tiny_ckpt, prompts, 12)
    finally:
        engine.shutdown()


def _attend(q, cache, shared, slots, lens, scale, rank, seq=None):
    """The torch path's math, one query row at a time, in q's dtype as attention._decode rounds it."""
    out = []
    for r in range(q.shape[0]):
        b = r if seq is None else int(seq[r])
        ctx = cache[torch.cat([shared, slots[b, : lens[r]]])]  # [n, D]
        scores = torch.matmul(q[r], ctx.t()) * scale  # [H, n]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out.append(torch.matmul(probs, ctx[:, :rank]))
    return torch.stack(out)


def _assert_attention_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: to rounding; bf16: within the bf16 steps of the scores, probabilities and output."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        scale_out = want.abs().max().item()
        assert (got.float() - want).abs().max().item() <= 2 ** -6 * scale_out
        assert (got.float() - want).abs().mean().item() <= 2 ** -9 * scale_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,rank,rope", [(8, 128, 16), (5, 32, 8), (3, 40, 24)])
@pytest.mark.parametrize("prefix", [0, 37])
def test_mla_decode_rows_equal_the_torch_path(dtype, heads, rank, rope, prefix):
    gen = torch.Generator().manual_seed(heads + rank + prefix)
    d, slots_total = rank + rope, 700
    cache = torch.randn(slots_total, d, generator=gen).to(dtype)
    q = torch.randn(6, heads, d, generator=gen).to(dtype)
    perm = torch.randperm(slots_total - 1, generator=gen) + 1
    shared, own = perm[:prefix], perm[prefix:]
    lens = torch.tensor([1, 50, 17, 0 if prefix else 3, 90, 64])
    slots = torch.zeros(6, 90, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        slots[b, :n] = own[b * 90 : b * 90 + n]
    scale = d ** -0.5
    want = _attend(q, cache, shared, slots, lens, scale, rank).float()
    got = cpu_kernels().mla_attend(q, cache, shared, slots, torch.arange(6), lens, scale, rank)
    assert got.dtype == dtype and got.shape == (6, heads, rank)
    _assert_attention_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,rank,rope", [(8, 128, 16), (4, 32, 8), (3, 64, 24)])
@pytest.mark.parametrize("prefix", [0, 70])
def test_mla_prefill_rows_equal_the_torch_path(dtype, heads, rank, rope, prefix):
    """Many rows per sequence, each seeing its context up to itself (causal lengths), rows of
    several sequences interleaved: on an AMX CPU in bf16 the tile path, with 32-pair tasks that
    split a sequence's rows, contexts that are not multiples of 16 or 32, and a shared prefix."""
    gen = torch.Generator().manual_seed(heads + rank + prefix + 1)
    d, slots_total = rank + rope, 900
    cache = torch.randn(slots_total, d, generator=gen).to(dtype)
    perm = torch.randperm(slots_total - 1, generator=gen) + 1
    shared, own = perm[:prefix], perm[prefix:]
    ctx_lens, new = [45, 3, 130], [19, 3, 7]  # own context per sequence, of which the last `new` are prefill rows
    slots = torch.zeros(3, 130, dtype=torch.long)
    seq, lens = [], []
    for b, (n, k) in enumerate(zip(ctx_lens, new)):
        slots[b, :n] = own[b * 130 : b * 130 + n]
        for j in range(k):
            seq.append(b)
            lens.append(n - k + j + 1)
    order = torch.randperm(len(seq), generator=gen)  # rows need not be grouped by sequence
    seq, lens = torch.tensor(seq)[order], torch.tensor(lens)[order]
    q = torch.randn(len(seq), heads, d, generator=gen).to(dtype)
    scale = d ** -0.5
    want = _attend(q, cache, shared, slots, lens, scale, rank, seq).float()
    got = cpu_kernels().mla_attend(q, cache, shared, slots, seq, lens, scale, rank)
    assert got.dtype == dtype and got.shape == (len(seq), heads, rank)
    _assert_attention_close(got, want)
    if dtype == torch.bfloat16 and _cpu_has_amx():
        assert cpu_kernels().mla_attend_on_tiles(d, rank) == (rank % 32 == 0)


def test_mla_attend_refuses_slots_outside_the_cache():
    ops = cpu_kernels()
    cache, q = torch.randn(10, 24), torch.randn(1, 2, 24)
    none, first = torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.mla_attend(q, cache, none, torch.tensor([[3, 10]]), first, torch.tensor([2]), 1.0, 16)
    with pytest.raises(RuntimeError, match="has no context"):
        ops.mla_attend(q, cache, none, torch.tensor([[3]]), first, torch.tensor([0]), 1.0, 16)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.mla_attend(q.bfloat16(), cache, none, torch.tensor([[3]]), first, torch.tensor([1]), 1.0, 16)
    with pytest.raises(RuntimeError, match="seq"):
        ops.mla_attend(q, cache, none, torch.tensor([[3]]), torch.tensor([1]), torch.tensor([1]), 1.0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_small_equals_f_linear(dtype):
    """The dense lm_head's few-rows path: 1, 3 and 16 rows, a width with a vector tail, and a
    row count that is not a multiple of the kernel's row block."""
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(1000, 72, generator=gen) * 0.1).to(dtype)
    for m in (1, 3, 16):
        x = torch.randn(m, 72, generator=gen).to(dtype)
        got, want = cpu_kernels().linear_small(x, w), torch.nn.functional.linear(x.float(), w.float())
        assert got.dtype == dtype and got.shape == (m, 1000)
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert cpu_kernels().linear_small(x[:0], w).shape == (0, 1000)
    with pytest.raises(RuntimeError, match="x \\[M, K\\], w \\[N, K\\]"):
        cpu_kernels().linear_small(x[:, :10], w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_kernel_equals_combine_bitwise(dtype):
    """The weighted sum back into token order: the same fp32 additions in the same order."""
    from expertmesh.actors.model.experts import combine, permute_by_expert

    gen = torch.Generator().manual_seed(11)
    t, k, e, h = 37, 4, 16, 72
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=gen)
    order, _ = permute_by_expert(ids, e)
    outs = torch.randn(t * k, h, generator=gen).to(dtype)
    want = combine(outs, order, weights, t, k)
    got = combine(outs, order, weights, t, k, cpu_kernels())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="not a permutation"):
        cpu_kernels().combine(outs, torch.zeros_like(order), weights)


def test_pair_packed_head_equals_f_linear():
    """The bf16 lm_head in vdpbf16ps pairs (where the CPU has AVX512-BF16, or only AVX2: pairs
    widened by hand): an output count that is not a multiple of 32, 1 to 300 rows (tiles of 5 or
    6 and their tails, AVX2's fp32-widened blocks from 64 rows, AMX tiles and 128-row chunks), 3-D
    input."""
    from expertmesh.actors.model.packed import PairPackedLinear

    if not cpu_kernels().has_packed_linear():
        pytest.skip("this CPU has AVX-512 without BF16: the bf16 head keeps oneDNN's packing")
    gen = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(96, 1000, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1000, 96, generator=gen) * 0.1)
    head = PairPackedLinear(lin, cpu_kernels())
    for m in (1, 2, 5, 6, 13, 16, 40, 64, 300):  # AMX from 4 rows: tiles, 16-row tails, 128-row chunks
        x = torch.randn(m, 96, generator=gen).to(torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), lin.weight.float())
        got = head(x)
        assert got.dtype == torch.bfloat16 and got.shape == (m, 1000)
        torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())
    assert head(torch.zeros(2, 3, 96, dtype=torch.bfloat16)).shape == (2, 3, 1000)
    with pytest.raises(RuntimeError, match="packed K"):
        cpu_kernels().linear_packed(torch.zeros(1, 64, dtype=torch.bfloat16), head.packed, 1000)


def _cpu_has_amx() -> bool:
    """Whether the AMX paths must run here: the CPU has AMX, the kernels are built for it
    (-march=native) and EXPERTMESH_AMX=0 does not turn them off."""
    import os

    from expertmesh.actors.model.kernels import _cpu_flags, _march

    flags = set(_cpu_flags().split())
    return ({"amx_tile", "amx_bf16"} <= flags and _march() == "native"
            and os.environ.get("EXPERTMESH_AMX", "1") != "0")


def test_the_tile_unit_is_used_where_the_cpu_has_it():
    """An AMX CPU whose build or process silently lost the tile path would serve 1.5-2x slower."""
    if not _cpu_has_amx():
        pytest.skip("this CPU has no AMX")
    assert cpu_kernels().has_amx()


def test_amx_experts_equal_the_per_expert_loop():
    """bf16 experts past max_rows: the AMX tile path on an AMX CPU, the pair GEMMs on AVX512-BF16
    (at::linear elsewhere), with
    one and several 16-token blocks, an odd block count, tails, and small experts beside them on
    the vector kernel."""
    from expertmesh.actors.model.experts import kernel_max_rows

    w = _weights(8, 64, 96, torch.bfloat16, seed=3)
    counts = [3, 0, 16, 17, 1, 33, 40, 2]
    xs = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    want = _loop(w, xs, counts).float()
    got = cpu_kernels().grouped_ffn(xs, w.w13, w.w2, counts, 2)
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= 2 ** -7 * scale
    assert (got.float() - want).abs().mean().item() <= 2 ** -10 * scale
    assert kernel_max_rows(cpu_kernels(), torch.float32) == 32
    if _cpu_has_amx():
        assert kernel_max_rows(cpu_kernels(), torch.bfloat16) == 1
    elif cpu_kernels().has_pair_experts():  # AVX512-BF16: big bf16 experts on the pair GEMMs
        assert kernel_max_rows(cpu_kernels(), torch.bfloat16) == 16


def test_bf16_steps_mixing_prefill_and_decode_rows_on_the_kernel_match_the_torch_path(tiny_ckpt):
    """One mla_attend call per layer for every row of a step: decode rows and prefill chunks
    (after a radix-shared prefix, and a fresh sequence beside them) give the torch path's logits
    to bf16 rounding. On an AMX CPU the prefill rows take the tile path (kernel_prefill)."""
    from expertmesh.actors.forward_batch import ForwardBatch
    from expertmesh.actors.worker import ModelWorker, WorkerSpec

    kern = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=1024))
    plain = ModelWorker(WorkerSpec(str(tiny_ckpt), dtype="bfloat16", kv_slots=1024, cpu_kernels=False))
    from expertmesh.actors.model.packed import PackedSwiGLU, PairPackedLinear

    if _cpu_has_amx():
        assert all(layer.self_attn.kernel_prefill for layer in kern.model.layers)
    if cpu_kernels().has_packed_linear():
        # ... and its dense linears take the pair kernel (kv_b_proj stays dense): on AMX, on
        # AVX512-BF16, and on AVX2, where oneDNN only emulates bf16
        attn = kern.model.layers[0].self_attn
        assert isinstance(attn.o_proj, PairPackedLinear) and type(attn.kv_b_proj) is torch.nn.Linear
        assert isinstance(kern.model.lm_head, PairPackedLinear)
        # q_a and kv_a as one linear (mla_kv_write / mla_query around it), MLPs as one call
        assert isinstance(attn.qkv_a, PairPackedLinear) and attn.q_a_proj is None
        assert all(isinstance(m.shared_experts, PackedSwiGLU) for m in kern.model.moe_layers())
    prefix = torch.tensor([0] + [300 + 7 * i for i in range(99)])
    pslots = torch.arange(1, 101)

    def steps(worker):
        model, kv = worker.model, worker.kv
        model(ForwardBatch(prefix, torch.arange(100), pslots, [100], [pslots]).prepare(), kv)
        dec_slot, ext_slots, fresh = torch.tensor([101]), torch.arange(102, 109), torch.arange(200, 220)
        ids = torch.cat([torch.tensor([5]), torch.arange(60, 67), torch.arange(80, 100)])
        pos = torch.cat([torch.tensor([100]), torch.arange(100, 107), torch.arange(20)])
        ctx = [torch.cat([pslots, dec_slot]), torch.cat([pslots, ext_slots]), fresh]
        mixed = ForwardBatch(ids, pos, torch.cat([dec_slot, ext_slots, fresh]), [1, 7, 20], ctx).prepare()
        first = model.logits(model(mixed, kv)[mixed.last_token_index()])
        # both continue by one decode row and one prefill chunk over the shared 100-token prefix
        ctx2 = [torch.cat([ctx[0], torch.tensor([109])]), torch.cat([ctx[1], torch.arange(110, 113)])]
        shared = ForwardBatch(torch.tensor([6, 70, 71, 72]), torch.tensor([101, 107, 108, 109]),
                              torch.tensor([109, 110, 111, 112]), [1, 3], ctx2).prepare()
        assert shared.attend_plan().shared.numel() == 100
        second = model.logits(model(shared, kv)[shared.last_token_index()])
        return torch.cat([first, second]).float()

    got, want = steps(kern), steps(plain)
    spread = (want.max(dim=-1).values - want.min(dim=-1).values).min().item()
    assert (got - want).abs().max().item() <= 0.05 * spread


def test_rms_norm_kernel_equals_the_reference_order():
    """bf16 rows (a strided view, as the latent split gives it): the reference's roundings, so
    nearly every output is bitwise torch's; the rest differ by one bf16 step (the mean's order)."""
    from expertmesh.actors.model.layers import RMSNorm

    gen = torch.Generator().manual_seed(9)
    norm = RMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=gen))
    x = (torch.randn(37, 112, generator=gen) * 3).to(torch.bfloat16)[:, :96]
    want = norm(x)
    norm.kernel = cpu_kernels()
    got = norm(x)
    assert got.dtype == torch.bfloat16 and got.shape == (37, 96)
    assert (got == want).float().mean().item() >= 0.99
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_kernels().rms_norm(x.float(), norm.weight, 1e-6)


def test_bmm_small_equals_torch_bmm():
    """The absorbed-attention per-head matmuls: a transposed (strided) x, tails of the vector width."""
    gen = torch.Generator().manual_seed(11)
    for h, m, k, n in ((8, 1, 32, 128), (8, 32, 128, 32), (3, 5, 40, 50)):
        x = torch.randn(m, h, k, generator=gen).to(torch.bfloat16).transpose(0, 1)
        w = torch.randn(h, k, n, generator=gen).to(torch.bfloat16)
        want = torch.bmm(x.float(), w.float())
        got = cpu_kernels().bmm_small(x, w)
        assert got.dtype == torch.bfloat16 and got.shape == (h, m, n)
        torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("with_norm", [False, True])
def test_moe_layer_in_one_call_is_bitwise_the_module_steps(shared, tokens, with_norm):
    """MoE.forward on the kernels as one moe_layer call (gate, routed experts, their bf16 rounding,
    the shared experts' sum, the expert load; with the post-attention norm, the residual block
    x + moe(norm(x))) gives the bits and the load counts of the same module run step by step
    (gate, record, LocalExperts, shared experts)."""
    from expertmesh.actors.model.layers import RMSNorm
    from expertmesh.actors.model.config import ModelConfig
    from expertmesh.actors.model.moe import MoE
    from expertmesh.actors.model.packed import pack_swiglus
    from expertmesh.cluster.devtools.checkpoints import hub_config

    ops = cpu_kernels()
    if not ops.has_packed_linear():
        pytest.skip("no pair-packed linears in this build")
    gen = torch.Generator().manual_seed(tokens + 10 * shared)
    cfg = ModelConfig.from_dict(hub_config("tiny", overrides={
        "hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "n_shared_experts": int(shared), "routed_scaling_factor": 2.5}))
    moe = MoE(cfg)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "bias" in name else 0.3))
    moe.experts = moe.routed.weights = moe.experts.to(torch.bfloat16)
    if shared:
        moe.shared_experts.to(torch.bfloat16)
    assert moe.experts.use_kernel()
    moe.gate.kernel = ops
    assert pack_swiglus(moe, ops) == int(shared)
    x = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16)
    norm = None
    if with_norm:
        norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
        norm.kernel = ops

    assert moe._layer_args(x) is not None
    got = moe(x, norm)
    got_load = moe.load.counts
    moe._layer_args = lambda x: None  # the same module, step by step
    want = moe(x, norm)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(moe.load.counts, 2 * got_load) and int(got_load.sum()) == tokens * 4


@pytest.mark.parametrize("groups,topk_group,top_k", [(8, 4, 6), (1, 1, 2), (4, 2, 3)])
def test_moe_gate_kernel_selects_the_references_experts(groups, topk_group, top_k):
    """The noaux_tc router (fp32 matmul, sigmoid, selection) in one call: the same expert set per
    token and the same weights (to the last bits of the dot's and normalisation's orders) as the
    gate's torch path."""
    from expertmesh.actors.model.config import ModelConfig
    from expertmesh.actors.model.gate import NoAuxTCGate
    from expertmesh.cluster.devtools.checkpoints import hub_config

    gen = torch.Generator().manual_seed(groups + top_k)
    cfg = ModelConfig.from_dict(hub_config("tiny", overrides={
        "hidden_size": 48, "n_routed_experts": 32, "num_experts_per_tok": top_k, "n_group": groups,
        "topk_group": topk_group, "norm_topk_prob": True, "routed_scaling_factor": 2.5}))
    gate = NoAuxTCGate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(32, 48, generator=gen))
        gate.e_score_correction_bias.copy_(torch.randn(32, generator=gen) * 0.1)
    x = torch.randn(40, 48, generator=gen).to(torch.bfloat16)
    want_ids, want_w = gate(x)
    gate.kernel = cpu_kernels()
    got_ids, got_w = gate(x)
    assert got_ids.dtype == torch.int64 and got_ids.shape == (40, top_k) and got_w.dtype == torch.float32
    order_want, order_got = want_ids.argsort(dim=1), got_ids.argsort(dim=1)
    assert torch.equal(want_ids.gather(1, order_want), got_ids.gather(1, order_got))
    torch.testing.assert_close(got_w.gather(1, order_got), want_w.gather(1, order_want), rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="groups"):
        cpu_kernels().moe_gate(torch.rand(2, 8).bfloat16(), torch.rand(30, 8), torch.zeros(30), 4, 2, 3, True, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
def test_rope_kernel_is_bitwise_the_torch_rotation(dtype, interleave):
    """rope_rows (the query with its nope part kept, and the strided k_pe slice) against
    RotaryEmbedding's torch ops: the same roundings, so the same bits."""
    from expertmesh.actors.model.config import ModelConfig
    from expertmesh.actors.model.rope import RotaryEmbedding
    from expertmesh.cluster.devtools.checkpoints import hub_config

    cfg = ModelConfig.from_dict({**hub_config("tiny"), "rope_interleave": interleave})
    rope = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(7)
    t, heads, nope, r = 9, 4, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    cos, sin = rope.cos_sin(torch.arange(100, 100 + t), dtype)
    q = (torch.randn(t, heads, nope + r, generator=g) * 3).to(dtype)
    kv = (torch.randn(t, 40 + r, generator=g) * 3).to(dtype)
    k = kv[:, 40:].unsqueeze(1)  # a strided slice, as kv_a_proj's output is split
    want_q = torch.cat([q[..., :nope], rope.rotate(q[..., nope:], cos, sin)], dim=-1)
    want_k = rope.rotate(k, cos, sin)
    rope.kernel = cpu_kernels()
    assert torch.equal(rope.rotate_tail(q, nope, cos, sin), want_q)
    assert torch.equal(rope.rotate_tail(k, 0, cos, sin), want_k)
    with pytest.raises(RuntimeError, match="rotate"):
        cpu_kernels().rope_rows(q, cos[:, :-1], sin[:, :-1], nope, interleave)
