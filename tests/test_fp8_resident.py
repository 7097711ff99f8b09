"""Issue 14 item 3: FP8 weights that stay FP8.

`keep_fp8` (the default, `model.keep_fp8` in the config) holds an FP8 checkpoint's e4m3 weights and
128x128 scales as they are and dequantizes inside each matmul: the model must compute bit for bit
what the dequantize-at-load path computes, hold 1 byte per FP8 weight (what `resident_weight_bytes`,
the arithmetic behind the R1 plan, says), and do so under expert parallelism and weight moves too."""
from __future__ import annotations

import pytest
import torch

from _engine_runs import N, greedy_reqs, prefill_then_decode, run
from _reference import PROMPTS, hf_greedy
from expertmesh.actors.loader import CheckpointReader, fp8_by_convention, needed_names, resident_weight_bytes
from expertmesh.actors.model import fp8 as fp8_mod
from expertmesh.actors.model.config import ModelConfig
from expertmesh.actors.model.experts import ExpertWeights
from expertmesh.actors.model.fp8 import Fp8Linear, dequantize_fp8, pack_e4m3_pairs
from expertmesh.actors.worker import ModelWorker, WorkerSpec, expert_range
from expertmesh.cluster.devtools.checkpoints import quantize_fp8
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.executor import PlacementSpec
from expertmesh.cluster.engine.scheduler import SchedulerConfig

torch.set_num_threads(1)

SHORT = [[5, 7, 9, 11, 300, 2], list(range(40, 90)), [1000 + 3 * i for i in range(17)]]


def _worker(ckpt, dtype: str, keep: bool, **kw) -> ModelWorker:
    return ModelWorker(WorkerSpec(str(ckpt), dtype=dtype, kv_slots=512, keep_fp8=keep, **kw))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resident_fp8_computes_what_dequantize_at_load_computes(tiny_fp8_ckpt, dtype):
    """Partial edge blocks (hidden 192, moe_intermediate 160), prefill and batched decode, with the
    CPU kernels off on both sides: the torch path's per-expert loop (FP8) against its dense form."""
    kept = _worker(tiny_fp8_ckpt, dtype, True, cpu_kernels=False)
    loaded = _worker(tiny_fp8_ckpt, dtype, False, cpu_kernels=False)
    assert any(isinstance(m, Fp8Linear) for m in kept.model.modules())
    assert all(m.experts.w13.dtype == torch.float8_e4m3fn for m in kept.model.moe_layers())
    assert not any(isinstance(m, Fp8Linear) for m in loaded.model.modules())
    for a, b in zip(prefill_then_decode(kept, SHORT), prefill_then_decode(loaded, SHORT)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resident_fp8_on_the_cpu_kernels_computes_what_dequantize_at_load_computes(tiny_fp8_ckpt, dtype):
    """With the CPU kernels on both sides: FP8-resident experts through grouped_ffn_fp8, which
    dequantizes each block of weight rows just before the dense kernel's dot products, give the
    dense experts' bits."""
    from expertmesh.actors.model.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("no CPU kernels here")
    kept = _worker(tiny_fp8_ckpt, dtype, True)
    loaded = _worker(tiny_fp8_ckpt, dtype, False)
    assert all(m.experts.w13.dtype == torch.float8_e4m3fn and m.experts.kernel is not None
               for m in kept.model.moe_layers())
    for a, b in zip(prefill_then_decode(kept, SHORT), prefill_then_decode(loaded, SHORT)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_ffn_fp8_is_bitwise_the_dequantized_experts(dtype):
    """The kernel alone, on partial edge blocks (hidden 192, intermediate 160, 128 x 128 blocks),
    empty experts, small ones on the row kernel and big ones (past max_rows) on the dense big path."""
    from expertmesh.actors.model.kernels import cpu_kernels

    ops = cpu_kernels()
    if ops is None:
        pytest.skip("no CPU kernels here")
    gen = torch.Generator().manual_seed(5)
    count, hidden, inter = 5, 192, 160
    w = ExpertWeights(0, count, hidden, inter)
    with torch.no_grad():
        w.w13.copy_(torch.randn(w.w13.shape, generator=gen) * 0.05)
        w.w2.copy_(torch.randn(w.w2.shape, generator=gen) * 0.05)
    dense = [(w.w13[e].clone(), w.w2[e].clone()) for e in range(count)]
    w.to_fp8((128, 128), dtype)
    with torch.no_grad():
        for e, (a, b) in enumerate(dense):
            for rows, scale in ((slice(0, inter), w.w1_scale_inv), (slice(inter, 2 * inter), w.w3_scale_inv)):
                q, s = quantize_fp8(a[rows])
                w.w13[e, rows] = q
                scale[e] = s
            q, s = quantize_fp8(b)
            w.w2[e], w.w2_scale_inv[e] = q, s
    w13 = torch.stack([w.dequantized(e)[0] for e in range(count)])
    w2 = torch.stack([w.dequantized(e)[1] for e in range(count)])
    counts = [3, 0, 40, 1, 7]
    xs = torch.randn(sum(counts), hidden, generator=gen).to(dtype)
    got = ops.grouped_ffn_fp8(xs, w.w13, w.w2, w.w1_scale_inv, w.w3_scale_inv, w.w2_scale_inv, 128, 128, counts, 16)
    assert torch.equal(got, ops.grouped_ffn(xs, w13, w2, counts, 16))
    with pytest.raises(RuntimeError, match="one scale per block"):
        ops.grouped_ffn_fp8(xs, w.w13, w.w2, w.w1_scale_inv[:-1], w.w3_scale_inv, w.w2_scale_inv, 128, 128, counts, 16)


@pytest.mark.parametrize("shape", [(192, 512, 128, 128), (130, 190, 128, 128), (100, 62, 16, 4), (40, 4100, 128, 128)])
def test_linear_packed_fp8_is_bitwise_the_pair_kernel_on_the_dequantized_weight(shape):
    """The FP8 pair linear alone: partial edge blocks, rows padding N to 32, small blocks (a scale
    row per block), a K spanning several scale columns, row counts on the looked-up path (<= 6) and
    on the dequantized-scratch path; bad blocks get a clear error."""
    from expertmesh.actors.model.kernels import cpu_kernels, pack_pairs

    ops = cpu_kernels()
    if ops is None or not hasattr(ops, "linear_packed_fp8"):
        pytest.skip("no FP8 pair linear in this build")
    n, k, br, bc = shape
    gen = torch.Generator().manual_seed(n + k)
    q = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)  # subnormals to 448
    s = torch.rand(-(-n // br), -(-k // bc), generator=gen) * 1e-2 + 1e-5
    dense = pack_pairs(dequantize_fp8(q, s, (br, bc)).to(torch.bfloat16))
    packed = pack_e4m3_pairs(q)
    for m in (0, 1, 2, 5, 6, 7, 33):
        x = torch.randn(m, dense.shape[1] * 2, generator=gen).to(torch.bfloat16)
        assert torch.equal(ops.linear_packed_fp8(x, packed, s, br, bc, n), ops.linear_packed(x, dense, n)), m
    with pytest.raises(RuntimeError, match="block rows a multiple of 16"):
        ops.linear_packed_fp8(x, packed, s, 8, bc, n)
    with pytest.raises(RuntimeError, match="a scale for every block"):
        ops.linear_packed_fp8(x, packed, s[:, :-1], br, bc, n)


def test_swiglu_packed_fp8_is_bitwise_the_dense_swiglu():
    """An FP8 SwiGLU in one call (gate and up stacked with their scale rows) against swiglu_packed on
    the dequantized weights, at one row, six, and past six."""
    from expertmesh.actors.model.kernels import cpu_kernels, pack_pairs

    ops = cpu_kernels()
    if ops is None or not hasattr(ops, "swiglu_packed_fp8"):
        pytest.skip("no FP8 pair linear in this build")
    gen = torch.Generator().manual_seed(3)
    hidden, inter = 200, 256
    gate, up, down = (quantize_fp8(torch.randn(shape, generator=gen) * 0.05)
                      for shape in ((inter, hidden), (inter, hidden), (hidden, inter)))
    deq = lambda qs: dequantize_fp8(*qs, (128, 128)).to(torch.bfloat16)  # noqa: E731
    for m in (1, 6, 19):
        x = torch.randn(m, hidden, generator=gen).to(torch.bfloat16)
        want = ops.swiglu_packed(x, pack_pairs(torch.cat([deq(gate), deq(up)])), pack_pairs(deq(down)), hidden)
        got = ops.swiglu_packed_fp8(x, pack_e4m3_pairs(torch.cat([gate[0], up[0]])), torch.cat([gate[1], up[1]]), pack_e4m3_pairs(down[0]),
                                    down[1], 128, 128, hidden)
        assert torch.equal(got, want), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_fp8_kernel_is_the_torch_dequantization(dtype):
    """The kernels' one-call dequantization (an FP8 kv_b_proj's, each step): the values of
    fp8.dequantize_fp8 on partial edge blocks, 32-aligned blocks on the table path and odd ones."""
    from expertmesh.actors.model.kernels import cpu_kernels

    ops = cpu_kernels()
    if ops is None:
        pytest.skip("no CPU kernels here")
    gen = torch.Generator().manual_seed(9)
    for n, k, br, bc in ((300, 200, 128, 128), (64, 100, 16, 24), (5, 7, 2, 3)):
        q = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        s = torch.rand(-(-n // br), -(-k // bc), generator=gen) * 1e-2 + 1e-5
        assert torch.equal(ops.dequantize_fp8(q, s, br, bc, dtype), dequantize_fp8(q, s, (br, bc)).to(dtype))
    with pytest.raises(RuntimeError, match="one scale per"):
        ops.dequantize_fp8(q, s[:-1], br, bc, dtype)


def test_fp8_linears_run_on_the_pair_kernel_with_the_cpu_kernels(tiny_fp8_ckpt):
    """A bf16 worker with the kernels keeps its FP8 projections in e4m3 pairs (kv_b_proj excepted:
    absorbed attention reads its dequantized weight, made once per attention call and not kept)."""
    from expertmesh.actors.model.fp8 import PairPackedFp8Linear, PairPackedFp8SwiGLU
    from expertmesh.actors.model.kernels import cpu_kernels

    ops = cpu_kernels()
    if ops is None or not hasattr(ops, "linear_packed_fp8"):
        pytest.skip("no FP8 pair linear in this build")
    worker = _worker(tiny_fp8_ckpt, "bfloat16", True)
    model = worker.model
    prefill_then_decode(worker, SHORT[:1], steps=1)  # kv_b_proj dequantized once a call, then dropped
    assert all(layer.self_attn._call_absorbed is None for layer in model.layers)
    packed = {name for name, m in model.named_modules() if isinstance(m, PairPackedFp8Linear)}
    assert any(name.endswith("o_proj") for name in packed)
    # the dense layer's MLP (intermediate 128: whole block-rows) in one call; the shared experts'
    # (160: up's scale rows would start mid-block) as three linears
    assert isinstance(model.layers[0].mlp, PairPackedFp8SwiGLU)
    assert any(name.endswith("shared_experts.down_proj") for name in packed)
    assert all(isinstance(layer.self_attn.kv_b_proj, Fp8Linear) for layer in model.layers)
    assert all(p.dtype == torch.float8_e4m3fn for name, p in model.named_parameters() if name.endswith(".packed")
               and any(name.startswith(n + ".") for n in packed))


def test_slabbed_matmul_equals_one_slab(tiny_fp8_ckpt, monkeypatch):
    """A weight larger than a slab is dequantized a block-row slab at a time: same logits."""
    whole = prefill_then_decode(_worker(tiny_fp8_ckpt, "float32", True), SHORT)
    monkeypatch.setattr(fp8_mod, "SLAB_ELEMS", 128 * 192)  # one 128-row block-row of a 192-wide weight
    assert fp8_mod.slab_rows(400, 192, 128) == 128
    for a, b in zip(prefill_then_decode(_worker(tiny_fp8_ckpt, "float32", True), SHORT), whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_engine_tokens_equal_transformers_with_fp8_resident(tiny_fp8_ckpt):
    engine = Engine(EngineConfig(str(tiny_fp8_ckpt), keep_fp8=True,
                                 scheduler=SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)))
    try:
        assert engine.executor.describe()[0]["weight_bytes"]["fp8"] > 0
        assert run(engine, greedy_reqs(PROMPTS, "f")) == hf_greedy(tiny_fp8_ckpt, PROMPTS, N)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_bytes_match_the_arithmetic(tiny_fp8_ckpt, dtype):
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    reader = CheckpointReader(tiny_fp8_ckpt, progress=False)
    for keep in (True, False):
        w = _worker(tiny_fp8_ckpt, name, keep, prepack=False)
        fp8_names = reader.fp8_names() if keep else set()
        screen = w.model.head_screen is not None  # CPU bf16 where the head is pair-packed
        assert screen == (dtype == torch.bfloat16 and w.model.head_kernel is not None
                          and w.model.head_kernel.has_packed_linear())
        assert w.model.weight_bytes() == resident_weight_bytes(reader.config, dtype, None, fp8_names, screen)
    kept = _worker(tiny_fp8_ckpt, name, True, prepack=False).model.weight_bytes()
    n_fp8 = sum(torch.Size(s).numel() for n, s in reader.needed().items() if n in reader.fp8_names())
    assert kept["fp8"] == n_fp8  # one byte per FP8 weight


def test_r1_plan_follows_from_its_config():
    """configs/deepseek-r1-a100.yaml: 37.0 GiB of weights per rank at ep 32 in FP8, 70.1 in bf16."""
    r1 = ModelConfig.from_dict(dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        vocab_size=129280, q_lora_rank=1536, kv_lora_rank=512, num_attention_heads=128, num_key_value_heads=128,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}))
    a, b = expert_range(256, 0, 32)
    mine = lambda layer, e: a <= e < b  # noqa: E731
    fp8 = {n for n, s in needed_names(r1, mine).items() if fp8_by_convention(n, s)}
    gib = lambda d: round(sum(d.values()) / 2**30, 1)  # noqa: E731
    assert gib(resident_weight_bytes(r1, torch.bfloat16, mine, fp8)) == 37.0
    assert gib(resident_weight_bytes(r1, torch.bfloat16, mine, set())) == 70.1


def test_fp8_expert_slots_move_as_raw_bytes():
    """EPLB moves a slot as `dense_slot` bytes; an FP8 slot round-trips exactly (weights and scales)."""
    torch.manual_seed(0)
    w = ExpertWeights(0, 3, 192, 160).to(torch.bfloat16)  # bf16 compute, as served
    w.to_fp8((128, 128))
    with torch.no_grad():
        for e in range(3):
            for rows, scale in ((slice(0, 160), w.w1_scale_inv), (slice(160, 320), w.w3_scale_inv)):
                q, s = quantize_fp8(torch.randn(160, 192))
                w.w13[e, rows].copy_(q)
                scale[e].copy_(s)
            q, s = quantize_fp8(torch.randn(192, 160))
            w.w2[e].copy_(q)
            w.w2_scale_inv[e].copy_(s)
    rows = [w.dense_slot(i) for i in range(3)]
    assert all(r.dtype == torch.uint8 and r.numel() == w.slot_nbytes for r in rows)
    again = ExpertWeights.assemble(w, [2, 0, 1], [rows[2].clone(), 0, rows[1].clone()])
    assert again.compute_dtype == w.compute_dtype == torch.bfloat16  # moved slots keep the compute dtype
    for j, src in enumerate([2, 0, 1]):
        for a, b in zip(again.dequantized(j), w.dequantized(src)):
            assert torch.equal(a, b)
    x = torch.randn(5, 192, dtype=torch.bfloat16)
    assert torch.equal(again.grouped_ffn(x, [5, 0, 0]), w.grouped_ffn(x, [0, 0, 5]))
    expect = torch.cat([dequantize_fp8(w.w13[2, :160], w.w1_scale_inv[2]), dequantize_fp8(w.w13[2, 160:], w.w3_scale_inv[2])]).to(torch.bfloat16)
    assert torch.equal(again.dequantized(0)[0], expect)


@pytest.mark.parametrize("redundant", [0, 4])
def test_expert_parallel_keeps_fp8_resident(ray_cluster, tiny_fp8_ckpt, redundant):
    """EP2 over Ray (gloo), each rank holding its experts in FP8; with R 4 and a rebalance every 3
    steps the FP8 slots move between ranks as raw bytes. Tokens equal transformers'."""
    from expertmesh.cluster.engine.balancing import EplbConfig

    eplb = EplbConfig(enabled=bool(redundant), redundant_experts=redundant, interval_steps=3, window_steps=12,
                      min_gain=-1.0)
    engine = Engine(EngineConfig(str(tiny_fp8_ckpt), ep_size=2, keep_fp8=True, eplb=eplb,
                                 scheduler=SchedulerConfig(kv_tokens_per_rank=2048, page_size=4)),
                    placement=PlacementSpec(cpus_per_rank=0.25))
    try:
        assert run(engine, greedy_reqs(PROMPTS, "e")) == hf_greedy(tiny_fp8_ckpt, PROMPTS, N)
        reader = CheckpointReader(tiny_fp8_ckpt, progress=False)
        for rank in engine.executor.describe():
            if redundant:
                continue  # slots, not a range: the arithmetic's filter is the default layout's
            a, b = rank["expert_range"]
            mine = lambda layer, e: a <= e < b  # noqa: E731
            want = resident_weight_bytes(reader.config, torch.float32, mine, reader.fp8_names(mine))
            assert rank["weight_bytes"] == want
        if redundant:
            assert engine.executor.eplb_stats()["moved_experts"] > 0
    finally:
        engine.shutdown()


def test_fast_e4m3_conversion_is_exact():
    """Every e4m3 value but NaN (0x7f, 0xff), via the CPU bit path, equals torch's own conversion."""
    every = torch.arange(256, dtype=torch.uint8)
    every = every[(every & 0x7F) != 0x7F].view(torch.float8_e4m3fn)
    assert torch.equal(fp8_mod._e4m3_scaled_bits(every).float() * 2.0 ** 120, every.float())
    w = (torch.randn(300, 200) * 40).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2)
    ref = w.float() * s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(dequantize_fp8(w, s), ref)
    big = torch.full((3, 2), 300.0)  # s x 2^120 would overflow: the plain conversion is used
    ref = w.float() * big.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(dequantize_fp8(w, big), ref)
    aligned = (torch.randn(256, 128) * 40).to(torch.float8_e4m3fn)
    s2 = torch.rand(2, 1) * 1e-3
    assert torch.equal(dequantize_fp8(aligned, s2), aligned.float() * s2.repeat_interleave(128, 0))


def test_a_non_e4m3_weight_is_refused_not_converted(tiny_fp8_ckpt):
    """An e5m2 tensor copied into an e4m3 weight would be silently re-rounded: a clear error instead."""
    from expertmesh.actors.model.fp8 import Fp8Tensor

    w = _worker(tiny_fp8_ckpt, "float32", True)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    shape = w.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.shape
    bad = Fp8Tensor(torch.zeros(shape, dtype=torch.float8_e5m2), torch.ones(2, 2), (128, 128))
    with pytest.raises(ValueError, match="keep_fp8: false"):
        w.model.load_weights([(name, bad)])
