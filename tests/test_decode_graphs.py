"""Issue 14, item 5: decode steps in fixed shapes, captured and replayed as graphs.

No GPU here, so the capture is checked with the "fx" backend: torch.fx records the step's aten ops
over the graph's buffers with Python's decisions fixed, as a CUDA graph fixes them, and replays the
recording. A step that read a tensor's value on the host (a sync a CUDA capture refuses) would be
replayed stale and its tokens would go wrong; the step run on fake tensors (shapes, no values)
names such a read outright.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from _reference import PROMPTS, hf_greedy
from expertmesh.actors.decode_graphs import DecodeGraphs, GraphConfig
from expertmesh.actors.forward_batch import ForwardBatch
from expertmesh.actors.sampling_params import SamplingParams
from expertmesh.actors.worker import ModelWorker, WorkerSpec
from expertmesh.cluster.engine.engine import Engine, EngineConfig
from expertmesh.cluster.engine.scheduler import SchedulerConfig
from expertmesh.cluster.engine.types import EngineRequest

torch.set_num_threads(1)
N = 12

# ops that read a device tensor on the host or size their output by its values: a CUDA graph
# cannot capture them (or captures a stale value)
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "bincount", "item", "is_nonzero", "equal", "masked_scatter", "nonzero_static"}


class HostSyncGuard(TorchDispatchMode):
    """Records every op whose result depends on reading tensor values on the host."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNCING:
            self.found.append(name)
        elif name == "repeat_interleave" and "output_size" not in (kwargs or {}):
            self.found.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.found.append(f"{name} with a bool mask")
        return func(*args, **(kwargs or {}))


def _worker(ckpt, dtype="float32", **kw) -> ModelWorker:
    return ModelWorker(WorkerSpec(str(ckpt), dtype=dtype, kv_slots=1024, **kw))


def _decode_batch(worker: ModelWorker, prompts, first_slot: int = 1) -> ForwardBatch:
    """Each prompt prefilled alone into its own slots; the returned batch decodes one token each."""
    nxt, ctx = first_slot, []
    for p in prompts:
        s = torch.arange(nxt, nxt + len(p))
        nxt += len(p)
        worker.model(ForwardBatch(torch.tensor(p), torch.arange(len(p)), s, [len(p)], [s]), worker.kv)
        ctx.append(s)
    out = torch.arange(nxt, nxt + len(prompts))
    return ForwardBatch(torch.tensor([7 + i for i in range(len(prompts))]), torch.tensor([c.numel() for c in ctx]),
                        out, [1] * len(prompts), [torch.cat([c, out[i : i + 1]]) for i, c in enumerate(ctx)])


def _engine_greedy(ckpt, mode: str, dtype: str = "float32", monkeypatch=None):
    monkeypatch.setenv("EXPERTMESH_DECODE_GRAPHS", mode)
    engine = Engine(EngineConfig(str(ckpt), dtype=dtype,
                                 scheduler=SchedulerConfig(kv_tokens_per_rank=4096, page_size=1)))
    reqs = [EngineRequest(f"p{i}", p, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    out = engine.run_to_completion(reqs)
    return [out[r.request_id].token_ids for r in reqs], engine


def _graphs_of(engine) -> DecodeGraphs | None:
    workers = [w for w in vars(engine.executor).values() if isinstance(w, ModelWorker)]
    workers += [w for v in vars(engine.executor).values() if isinstance(v, list) for w in v
                if isinstance(w, ModelWorker)]
    return workers[0].graphs


def test_replayed_graphs_give_transformers_tokens(tiny_ckpt, monkeypatch):
    """fp32 greedy tokens through the engine, every pure-decode step replayed from a recorded graph
    (batches shrink as prompts finish, so several buckets are captured and each replayed with new
    inputs), equal transformers'."""
    tokens, engine = _engine_greedy(tiny_ckpt, "fx", monkeypatch=monkeypatch)
    graphs = _graphs_of(engine)
    assert graphs is not None and graphs.backend == "fx"
    assert graphs.replays > len(graphs.captured) >= 1
    assert tokens == hf_greedy(tiny_ckpt, PROMPTS, N)


def test_bf16_graph_step_matches_the_eager_step(tiny_ckpt):
    """bf16 on the CPU kernels (their custom ops inside the recording): the graph's hidden states
    are the eager step's up to bf16 rounding in a different op order (torch's softmax and matmuls
    instead of the fused attention and MoE kernels)."""
    worker = _worker(tiny_ckpt, "bfloat16", decode_graphs="off")
    batch = _decode_batch(worker, PROMPTS).prepare()
    eager = worker.model(batch, worker.kv).float()
    graphs = DecodeGraphs(worker.model, worker.kv, backend="fx")
    replayed = graphs.run(batch).float()
    assert replayed.shape == eager.shape
    assert (replayed - eager).abs().max() <= 2 ** -6 * eager.abs().max()


def _static_rows(worker: ModelWorker, n: int = 3):
    batch = _decode_batch(worker, PROMPTS[:n])
    graphs = DecodeGraphs(worker.model, worker.kv, backend="fx")
    rows = graphs._rows(graphs.config.batch_bucket(n), 128)
    graphs._fill(rows, batch, [c.numel() for c in batch.ctx_slots])
    return rows


def test_torch_ops_step_reads_no_tensor_value(tiny_ckpt):
    """The step as CUDA runs it (torch's ops, no CPU kernels: bf16, dense experts) under a fake
    tensor mode, where tensors have shapes but no values: any read of a value on the host (.item,
    .tolist, a bool mask, an output sized by its data) raises. The eager step does read some."""
    worker = _worker(tiny_ckpt, "bfloat16", decode_graphs="off", cpu_kernels=False, prepack=False)
    rows = _static_rows(worker)
    with torch.inference_mode(), FakeTensorMode(allow_non_fake_inputs=True):
        hidden = worker.model.decode_static(rows, worker.kv)
    assert tuple(hidden.shape) == (4, worker.config.hidden_size)
    batch = _decode_batch(worker, PROMPTS[:3], first_slot=300).prepare()
    with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)), torch.inference_mode(), \
            FakeTensorMode(allow_non_fake_inputs=True):
        worker.model(batch, worker.kv)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_step_runs_no_syncing_op(tiny_ckpt, dtype):
    """With the CPU kernels (their ops have no fake form), every op the step dispatches: none of
    those a CUDA graph refuses; the eager MoE path (torch's per-expert loop, sizes read with
    bincount) does dispatch one, so the guard sees what it looks for."""
    worker = _worker(tiny_ckpt, dtype, decode_graphs="off")
    rows = _static_rows(worker)
    with HostSyncGuard() as guard:
        worker.model.decode_static(rows, worker.kv)
    assert guard.found == []

    plain = _worker(tiny_ckpt, dtype, decode_graphs="off", cpu_kernels=False, prepack=False)
    with HostSyncGuard() as guard:
        plain.model(_decode_batch(plain, PROMPTS[:3]).prepare(), plain.kv)
    assert guard.found, "the guard saw no syncing op in the eager step"


def test_padding_rows_write_only_slot_0_and_count_no_load(tiny_ckpt):
    """3 sequences run at the 4-row bucket: the padding row writes KV slot 0 only, the expert load
    grows by exactly the 3 real rows' top-k per MoE layer, the real rows are the eager step's."""
    worker = _worker(tiny_ckpt, decode_graphs="off")
    batch = _decode_batch(worker, PROMPTS[1:4])
    graphs = DecodeGraphs(worker.model, worker.kv, GraphConfig(max_batch=8), backend="fx")
    kv_before = worker.kv.joint.clone()
    load_before = worker.expert_load()
    hidden = graphs.run(batch)
    assert graphs.captured == [(4, 128)]
    changed = (worker.kv.joint != kv_before).any(dim=-1).any(dim=0).nonzero().flatten().tolist()
    assert set(changed) <= {0, *batch.out_slots.tolist()} and set(batch.out_slots.tolist()) <= set(changed)
    k = worker.config.num_experts_per_tok
    assert ((worker.expert_load() - load_before).sum(dim=1) == 3 * k).all()
    worker.kv.joint.copy_(kv_before)  # the same step, eagerly
    eager = worker.model(batch.prepare(), worker.kv)
    torch.testing.assert_close(hidden, eager, rtol=1e-5, atol=1e-5)


def test_buckets_and_what_runs_eagerly(tiny_ckpt):
    cfg = GraphConfig(max_batch=64, max_context=4096, min_width=128)
    assert [cfg.batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 64)] == [1, 2, 4, 8, 8, 16, 24, 64]
    assert [cfg.width_bucket(n) for n in (1, 128, 129, 1000, 4096)] == [128, 128, 256, 1024, 4096]
    with pytest.raises(ValueError, match="bad decode graph sizes"):
        GraphConfig(max_batch=0)
    worker = _worker(tiny_ckpt, decode_graphs="off")
    graphs = DecodeGraphs(worker.model, worker.kv, GraphConfig(max_batch=2, max_context=256), backend="fx")
    assert graphs.serves(_decode_batch(worker, PROMPTS[1:3]))
    assert not graphs.serves(_decode_batch(worker, PROMPTS[1:4], first_slot=200))  # 3 > max_batch
    slots = torch.arange(1, 301)
    assert not graphs.serves(ForwardBatch(torch.tensor([1]), torch.tensor([299]), slots[-1:], [1], [slots]))
    prefill = torch.arange(1, 5)
    assert not graphs.serves(ForwardBatch(torch.tensor([1, 2, 3, 4]), torch.arange(4), prefill, [4], [prefill]))
    with pytest.raises(ValueError, match="backend"):
        DecodeGraphs(worker.model, worker.kv, backend="tensorrt")
    with pytest.raises(ValueError, match="need the model on a GPU"):
        DecodeGraphs(worker.model, worker.kv, backend="cuda")


def test_worker_settings(tiny_ckpt, tiny_fp8_ckpt):
    """"auto" on CPU captures nothing; a model whose step cannot take fixed shapes runs eagerly with
    the reason logged; an unknown setting is refused."""
    auto = _worker(tiny_ckpt)
    assert auto.graphs is None and auto.decode_graphs_status == "off (cpu: none captured)"
    fx = _worker(tiny_ckpt, decode_graphs="fx")
    assert fx.graphs is not None and fx.decode_graphs_status == "on (fx, up to batch 64)"
    fp8 = _worker(tiny_fp8_ckpt, decode_graphs="fx")  # FP8-resident experts
    assert fp8.graphs is None and fp8.decode_graphs_status.startswith("off (oneDNN-packed or FP8-resident experts")
    assert "FP8-resident" in _worker(tiny_fp8_ckpt, decode_graphs="off").model.static_unsupported()
    with pytest.raises(ValueError, match="decode_graphs 'yes'"):
        _worker(tiny_ckpt, decode_graphs="yes")


def test_deploy_config_reaches_the_worker(tmp_path):
    """model.decode_graphs (true / false) in a deploy config is what the replica's engine hands each
    worker (auto / off); another value is refused naming its key."""
    from expertmesh.cluster.config import ConfigError, load_config
    from expertmesh.cluster.serve.replica import engine_config_from

    text = "name: d\nmodel:\n  checkpoint: ./ckpt\n  decode_graphs: {}\nparallel:\n  ep_size: 1\n"
    path = tmp_path / "cfg.yaml"
    for value, setting in (("true", "auto"), ("false", "off")):
        path.write_text(text.format(value))
        assert engine_config_from(load_config(path)).decode_graphs == setting
    path.write_text(text.format("always"))
    with pytest.raises(ConfigError, match="decode_graphs"):
        load_config(path)


def test_a_failed_capture_turns_graphs_off_and_loses_no_step(tiny_ckpt, caplog):
    """A capture that fails (here: the step refuses to be traced, as a GPU the capture does not suit
    would) is logged, the worker's graphs are dropped and that step and the next run eagerly, with
    the tokens an eager worker gives."""
    from expertmesh.actors.sampling_params import SamplingParams as Params
    from expertmesh.actors.step import NewRequest, SeqWork, StepInput

    def tokens(worker):
        p = PROMPTS[3]
        first = worker.step(StepInput(new_requests=[NewRequest("r", p, Params(max_tokens=4, temperature=0), [])],
                                      seqs=[SeqWork("r", p, list(range(1, len(p) + 1)), sample=True)]))
        out = [first.sampled[0].token_id]
        for i in range(3):
            res = worker.step(StepInput(seqs=[SeqWork("r", [out[-1]], [len(p) + 1 + i], sample=True)]))
            out.append(res.sampled[0].token_id)
        return out

    worker = _worker(tiny_ckpt, decode_graphs="fx")

    def untraceable(rows, kv):
        raise RuntimeError("operation not permitted when stream is capturing")

    worker.model.decode_static = untraceable
    with caplog.at_level("ERROR"):
        got = tokens(worker)
    assert worker.graphs is None and worker.decode_graphs_status.startswith("off (a capture failed")
    assert "decode graphs off" in caplog.text and "operation not permitted" in caplog.text
    assert got == tokens(_worker(tiny_ckpt, decode_graphs="off"))


def test_small_max_batch_buckets_stay_in_the_buffers(tiny_ckpt):
    """max_batch below 8 and not a power of two: the bucket of 5 rows is 6, not 8 (the buffers hold
    6), and a step of 5 sequences runs."""
    cfg = GraphConfig(max_batch=6)
    assert [cfg.batch_bucket(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    worker = _worker(tiny_ckpt, decode_graphs="off")
    batch = _decode_batch(worker, PROMPTS[1:6])
    graphs = DecodeGraphs(worker.model, worker.kv, cfg, backend="fx")
    assert graphs.run(batch).shape[0] == 5 and graphs.captured == [(6, 128)]


def test_first_step_of_all_decode_shaped_counts_its_load(tiny_ckpt):
    """A graph captured before any eager step (one-token prompts): the expert load's accumulator is
    made by the warm-up, outside the recording, so replays count into it."""
    worker = _worker(tiny_ckpt, decode_graphs="off")
    graphs = DecodeGraphs(worker.model, worker.kv, backend="fx")
    slots = [torch.tensor([1]), torch.tensor([2])]
    batch = ForwardBatch(torch.tensor([5, 9]), torch.tensor([0, 0]), torch.tensor([1, 2]), [1, 1], slots)
    graphs.run(batch)
    k = worker.config.num_experts_per_tok
    assert (worker.expert_load().sum(dim=1) == 2 * k).all()


class HostTensorGuard(TorchDispatchMode):
    """Records every op where a tensor on the host meets one on the device: on a GPU an H2D copy
    inside the step (a capture refuses it, or bakes in what it held at capture)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        if any(a.device.type != "cpu" for a in flat) and any(a.device.type == "cpu" and a.dim() > 0 for a in flat):
            self.found.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _meta_batch(lengths: list[int]) -> ForwardBatch:
    """A decode step over contexts of these lengths, its tensors on the meta device (the host copy
    of the slot table stays on the host, as the worker hands it)."""
    host = [torch.arange(n) % 1000 + 1 for n in lengths]
    n = len(lengths)
    return ForwardBatch(torch.full((n,), 5, device="meta"), torch.tensor(lengths, device="meta") - 1,
                        torch.full((n,), 7, device="meta"), [1] * n, [c.to("meta") for c in host], host)


def test_the_gpu_step_runs_off_the_host(tiny_ckpt):
    """The step as a GPU runs it -- weights, KV cache and the graphs' buffers on a device that is
    not the CPU, torch's ops (bf16, no CPU kernels) -- on PyTorch's meta device (shapes, no values:
    no GPU needed), recorded and replayed through DecodeGraphs at two buckets. Meta tensors refuse a
    host tensor beside them and any read of a value; HostTensorGuard sees the index tensors they
    accept; _grouped_mm's meta function makes the checks its CUDA kernel makes (bf16, rows aligned
    to 16 bytes)."""
    worker = _worker(tiny_ckpt, "bfloat16", device="meta", cpu_kernels=False, prepack=False)
    assert worker.decode_graphs_status == "off (meta: none captured)" and worker.model.static_unsupported() is None
    graphs = DecodeGraphs(worker.model, worker.kv, backend="fx")
    for lengths in ([40, 60, 3], [200] + [9] * 8, [50, 61, 2]):
        hidden = graphs.run(_meta_batch(lengths))
        assert hidden.device.type == "meta" and tuple(hidden.shape) == (len(lengths), worker.config.hidden_size)
    assert graphs.captured == [(4, 128), (16, 256)] and graphs.replays == 3
    rows = graphs._rows(4, 128)
    with HostTensorGuard() as guard:
        worker.model.decode_static(rows, worker.kv)
    assert guard.found == []
    with HostTensorGuard() as guard:  # the guard sees what it looks for
        torch.ones(4, device="meta").index_add_(0, torch.tensor([1]).to("meta"), torch.ones(1, device="meta"))
        torch.ones(4, device="meta")[torch.tensor([1, 2])]
    assert guard.found == ["index"]


def test_expert_sizes_the_gpu_grouped_gemm_refuses(tmp_path):
    """Experts whose rows are not a multiple of 16 bytes: static_unsupported says so (decode steps
    stay eager), and the grouped GEMM on a device that is not the CPU refuses them, as CUDA's does."""
    from expertmesh.cluster.devtools.checkpoints import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "odd", preset="tiny", seed=0, overrides={"moe_intermediate_size": 20})
    worker = _worker(ckpt, "bfloat16", device="meta", cpu_kernels=False, prepack=False)
    assert "multiples of 16 bytes" in worker.model.static_unsupported()
    experts = next(iter(worker.model.moe_layers())).experts
    ids = torch.zeros(4, worker.config.num_experts_per_tok, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        experts.routed_static(torch.ones(4, worker.config.hidden_size, dtype=torch.bfloat16, device="meta"),
                              ids, torch.ones(ids.shape, device="meta"))
    on_cpu = _worker(ckpt, "bfloat16", decode_graphs="fx", cpu_kernels=False, prepack=False)
    assert on_cpu.model.static_unsupported() is None  # (the CPU's grouped GEMM takes any size)
