"""A rank worker: the model (with its shard of the experts), its KV cache and its requests' sampling
state. A plain object — the Ray actor in rank_actor.py is a thin shell around it, and tests and the
single-process engine drive it directly."""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .kv_cache import MLAKVCache
from .loader import CheckpointReader
from .forward_batch import ForwardBatch
from .model.config import ModelConfig
from .model.deepseek_v3 import DeepseekV3Model, build_model
from .model.packed import native_bf16
from .profiling import StepProfiler
from .sampler import Sampler, SamplingState
from .step import SampledToken, StepInput, StepOutput

log = logging.getLogger(__name__)

LOAD_HISTORY_S = 600.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class WorkerSpec:
    checkpoint: str
    dtype: str = "float32"
    kv_slots: int = 4096  # slot buffer size, including the reserved slot 0
    ep_rank: int = 0
    ep_size: int = 1
    device: str = "cpu"
    progress: bool = False
    seed: int = 0
    # oneDNN-packed weights where they apply (CPU bf16): same outputs, faster. EXPERTMESH_PREPACK=0
    # turns it off (benchmarks build an unpacked engine beside a packed one with it).
    prepack: bool = field(default_factory=lambda: os.environ.get("EXPERTMESH_PREPACK", "1") != "0")
    # Expert-parallel slots (EPLB): redundant copies beyond n_routed_experts, and the layout to load
    # ([MoE layer][slot] → logical expert; None: the default, see actors/model/placement.py).
    redundant_experts: int = 0
    # FP8 checkpoints: keep e4m3 weights + block scales resident, dequantized inside each matmul
    # (model/fp8.py); False dequantizes to `dtype` at load (2x the weight memory in bf16).
    keep_fp8: bool = True
    expert_placement: list[list[int]] | None = None
    # Optional speed mode, off by default (model/int8.py): the lm_head as a dynamic int8 linear on
    # CPU. Logits move ~1% relative, so tokens can differ from transformers'.
    int8_lm_head: bool = False
    # Beside a packed bf16 lm_head on CPU, an int8 copy that screens greedy rows' logits (exact
    # argmax, ~half the head's bytes read at batch 1-2; model/greedy_head.py). +1 byte per head weight.
    greedy_head_screen: bool = True
    # Routed experts and decode attention through the hand-written CPU kernels (model/kernels),
    # built on first use; EXPERTMESH_CPU_KERNELS=0 keeps torch's ops (to compare the two).
    cpu_kernels: bool = field(default_factory=lambda: os.environ.get("EXPERTMESH_CPU_KERNELS", "1") != "0")
    # Pure-decode steps as captured graphs (decode_graphs.py): "auto" captures CUDA graphs on a GPU
    # where the model's step can take fixed shapes and runs eagerly otherwise; "fx" records them with
    # torch.fx on any device (how a machine without a GPU checks the capture); "off".
    # EXPERTMESH_DECODE_GRAPHS sets the default.
    decode_graphs: str = field(default_factory=lambda: os.environ.get("EXPERTMESH_DECODE_GRAPHS", "auto"))
    decode_graph_max_batch: int = 64


def expert_range(n_experts: int, ep_rank: int, ep_size: int) -> tuple[int, int]:
    if n_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide n_routed_experts={n_experts}")
    per = n_experts // ep_size
    return ep_rank * per, (ep_rank + 1) * per


class ModelWorker:
    def __init__(self, spec: WorkerSpec, process_group=None):
        if spec.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {spec.dtype!r}; choose one of {sorted(DTYPES)}")
        self.spec = spec
        self.rank = spec.ep_rank
        self.device = torch.device(spec.device)
        reader = CheckpointReader(spec.checkpoint, progress=spec.progress)
        self.config: ModelConfig = reader.config
        placements = self._placements(spec)
        slot_experts = None
        if placements is not None and not all(p.is_identity for p in placements):
            moe_ids = [i for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i)]
            slot_experts = {i: p.rank_experts(spec.ep_rank) for i, p in zip(moe_ids, placements)}
            self.expert_range = (0, 0)  # slots, not a range: see slot_experts
        else:
            self.expert_range = expert_range(self.config.n_routed_experts, spec.ep_rank, spec.ep_size)
        dtype = DTYPES[spec.dtype]
        if self.device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16() and not spec.cpu_kernels:
            log.warning("dtype bfloat16 on a CPU without AVX-512 BF16/AMX and with the CPU kernels off: oneDNN "
                        "emulates bf16 matmuls, slower than float32 (on an AVX2 EPYC: 0.5x float32's tokens/s at "
                        "batch 32); the CPU kernels (on by default) serve bf16 there (README: Benchmarks)")
        self.model: DeepseekV3Model = build_model(self.config, dtype, self.expert_range, self.device, slot_experts)
        fp8_names = reader.fp8_names(self.model.wants_expert) if spec.keep_fp8 else set()
        if fp8_names:
            self.model.keep_fp8(fp8_names, self.config.fp8_block)
        self.model.load_weights(reader.iter_weights(dtype, expert_filter=self.model.wants_expert,
                                                    keep_fp8=bool(fp8_names)))
        self.read_tensor_names = set(reader.read_names)
        if spec.int8_lm_head:
            self.model.int8_lm_head()
        if spec.cpu_kernels and self.device.type == "cpu":
            self.model.use_cpu_kernels(greedy_head_screen=spec.greedy_head_screen and not spec.int8_lm_head)
        if spec.prepack:
            self.model.prepack()
        self.mover = None
        if spec.ep_size > 1:
            from .expert_mover import ExpertMover
            from .model.ep import ExpertParallelExperts

            for moe, placement in zip(self.model.moe_layers(), placements):
                moe.routed = ExpertParallelExperts(moe.experts, process_group, spec.ep_size,
                                                   self.config.n_routed_experts, placement, rank=spec.ep_rank)
            self.mover = ExpertMover(self.model.moe_layers(), spec.ep_rank, spec.ep_size)
        self.profiler = StepProfiler()
        self.model.set_profiler(self.profiler)
        self.kv = MLAKVCache(self.config.num_hidden_layers, spec.kv_slots, self.config.kv_lora_rank,
                             self.config.qk_rope_head_dim, dtype, self.device)
        self.graphs = self._decode_graphs(spec)
        self.sampler = Sampler(seed=spec.seed)
        self.sampler.kernel = self.model.head_kernel  # None without the CPU kernels
        self.states: dict[str, SamplingState] = {}
        self._load_history: deque[tuple[float, torch.Tensor]] = deque()
        self.slots: dict[str, torch.Tensor] = {}
        wb = self.model.weight_bytes()
        log.info("rank %d/%d ready: experts [%d, %d), %d KV slots, weights %.1f MiB (fp8 %.1f, scales %.2f, dense %.1f)",
                 self.rank, spec.ep_size, *self.expert_range, spec.kv_slots, sum(wb.values()) / 2**20,
                 wb["fp8"] / 2**20, wb["scales"] / 2**20, wb["dense"] / 2**20)

    def _decode_graphs(self, spec: WorkerSpec):
        """The decode graphs this worker replays (decode_graphs.py), or None; `decode_graphs_status`
        says which, or why none (a rank's status shows it)."""
        if spec.decode_graphs not in ("auto", "fx", "off"):
            raise ValueError(f"decode_graphs {spec.decode_graphs!r}: choose auto, fx or off")
        if spec.decode_graphs == "off":
            self.decode_graphs_status = "off (the setting)"
            return None
        if spec.decode_graphs == "auto" and self.device.type != "cuda":
            self.decode_graphs_status = f"off ({self.device.type}: none captured)"
            return None
        from .decode_graphs import DecodeGraphs, GraphConfig

        reason = self.model.static_unsupported() if spec.ep_size == 1 else "expert parallelism"
        if reason:
            log.info("decode steps run eagerly, not as graphs: %s", reason)
            self.decode_graphs_status = f"off ({reason})"
            return None
        backend = "cuda" if spec.decode_graphs == "auto" else "fx"
        self.decode_graphs_status = f"on ({backend}, up to batch {spec.decode_graph_max_batch})"
        return DecodeGraphs(self.model, self.kv, GraphConfig(max_batch=spec.decode_graph_max_batch), backend)

    def set_group(self, process_group) -> None:
        """Use a re-formed process group (after a dead rank was replaced): weights, KV and the
        per-request state stay as they are."""
        for moe in self.model.moe_layers():
            if hasattr(moe.routed, "group"):
                moe.routed.group = process_group

    def _placements(self, spec: WorkerSpec):
        """Expert slots per MoE layer under expert parallelism (None at ep_size 1, where every
        expert is local and redundant copies would change nothing)."""
        if spec.ep_size == 1:
            if spec.redundant_experts:
                log.info("redundant experts (%d) ignored at ep_size 1: every expert is local", spec.redundant_experts)
            return None
        from .model.placement import layer_placements

        n_moe = sum(1 for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i))
        return layer_placements(n_moe, self.config.n_routed_experts, spec.redundant_experts, spec.ep_size,
                                spec.expert_placement)

    def slot_experts(self) -> list[list[int]]:
        """[MoE layer] logical expert of each of this rank's slots."""
        return [m.experts.slot_experts for m in self.model.moe_layers()]

    # -- what tests and the engine ask about --------------------------------------------------
    def routed_expert_param_count(self) -> int:
        return sum(m.experts.param_count for m in self.model.moe_layers())

    def expert_load(self, window_s: float | None = None) -> torch.Tensor:
        """[moe layers, experts] tokens routed from this rank's requests: since start, or over the
        last `window_s` seconds (from snapshots taken at most once a second, kept for 10 minutes)."""
        now = self._cumulative_load()
        if window_s is None:
            return now
        cutoff = time.monotonic() - window_s
        base = next((c for t, c in self._load_history if t >= cutoff), None)
        return now - base if base is not None else now

    def _cumulative_load(self) -> torch.Tensor:
        layers = self.model.moe_layers()
        return torch.stack([m.load.counts for m in layers]) if layers else torch.zeros(0, dtype=torch.int64)

    def _snapshot_load(self) -> None:
        t = time.monotonic()
        if self._load_history and t - self._load_history[-1][0] < 1.0:
            return
        self._load_history.append((t, self._cumulative_load()))
        while self._load_history and t - self._load_history[0][0] > LOAD_HISTORY_S:
            self._load_history.popleft()

    # -- the step -----------------------------------------------------------------------------
    def step(self, work: StepInput) -> StepOutput:
        t0 = time.perf_counter()
        self.profiler.reset()
        for rid in work.released:
            self.states.pop(rid, None)
            self.slots.pop(rid, None)
        for rid, slots in work.remap.items():
            self.slots[rid] = torch.tensor(slots, dtype=torch.long)
        for req in work.new_requests:
            # a resumed request's earlier output counts as output: penalties, seeded draw steps
            split = len(req.prompt_token_ids) - req.resumed
            self.states[req.request_id] = SamplingState(req.sampling, list(req.prompt_token_ids[:split]),
                                                        list(req.prompt_token_ids[split:]))
            self.slots[req.request_id] = torch.tensor(req.prefix_slots, dtype=torch.long)
        if work.placement is not None and self.mover is not None:
            with self.profiler.span("eplb"):
                self.mover.apply(work.placement)
        batch = self._batch(work)
        if batch.num_tokens:
            self._snapshot_load()  # before the step's tokens are counted: windows start at a step
        out = StepOutput(rank=self.rank)
        hidden = self._graph_step(batch)
        if hidden is None:
            hidden = self.model(batch, self.kv)
        sample_rows = [i for i, s in enumerate(work.seqs) if s.sample]
        if sample_rows:
            with self.profiler.span("sample"):
                if len(sample_rows) == batch.num_tokens:  # one new token per sequence, every one sampled
                    rows = hidden
                else:
                    rows = hidden[batch.last_token_index()[sample_rows]]
                states = [self.states[work.seqs[i].request_id] for i in sample_rows]
                greedy = self.model.greedy_tokens(rows) if Sampler.plain_greedy(states) else None
                if greedy is not None:
                    result = self.sampler.take(greedy.tolist(), states)
                else:
                    result = self.sampler(self.model.logits(rows), states)
            for j, i in enumerate(sample_rows):
                lp = result.logprobs[j] if result.logprobs else None
                out.sampled.append(SampledToken(work.seqs[i].request_id, result.token_ids[j],
                                                lp.logprob if lp else None, lp.top if lp else None))
        if work.report_load:
            out.expert_load = self._cumulative_load().tolist()
            out.computed_rows = [getattr(m.routed, "computed", 0) for m in self.model.moe_layers()]
        out.timings = self.profiler.timings()
        out.timings.total = time.perf_counter() - t0
        return out

    def _graph_step(self, batch: ForwardBatch) -> torch.Tensor | None:
        """The step's hidden states replayed from a decode graph, or None where it runs eagerly. A
        capture that fails turns the graphs off for this worker (logged) and the step runs eagerly:
        a GPU or driver the capture does not suit costs speed, not requests."""
        if self.graphs is None or not self.graphs.serves(batch):
            return None
        from .decode_graphs import CaptureError

        try:
            return self.graphs.run(batch)
        except CaptureError as exc:
            log.exception("rank %d: decode graphs off, decode steps run eagerly from now on", self.rank)
            self.graphs = None
            self.decode_graphs_status = f"off (a capture failed: {exc})"
            return None

    def _batch(self, work: StepInput) -> ForwardBatch:
        if not work.seqs:
            return ForwardBatch.empty(self.device)
        ids, pos, out_slots, lens, ctx, host = [], [], [], [], [], []
        for s in work.seqs:
            prev = self.slots[s.request_id]
            new = torch.tensor(s.slots, dtype=torch.long)
            full = torch.cat([prev, new])
            self.slots[s.request_id] = full
            ids += s.token_ids
            pos += range(prev.numel(), full.numel())
            out_slots.append(new)
            lens.append(len(s.token_ids))
            ctx.append(full.to(self.device))
            host.append(full)
        # not prepared here: a decode graph needs none of prepare()'s tables, the model's forward
        # prepares the batch it runs
        return ForwardBatch(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device),
                            torch.cat(out_slots).to(self.device), lens, ctx, host)
