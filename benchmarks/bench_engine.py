"""Engine throughput vs transformers' generate, and the radix cache on a shared-prefix workload.

On the `small` preset (generated once into benchmarks/results/ckpt-small), in ONE process so
both sides see the same (noisy, shared) CPU, alternating which side runs first on every repeat:

(a) output tokens/s of the engine (in-process, ep_size 1) vs HF `generate` (greedy, left-padded,
    same checkpoint and dtype, ignore_eos / no EOS stop) at batch 1 and 32, same prompts of mixed
    length, e.g. 64 new tokens; wall time includes prefill, as a caller sees it;
(b) 32 requests sharing a 1k-token prefix plus distinct short suffixes, radix cache on vs off:
    throughput ((prompt + output tokens) / wall) and TTFT (from arrival, queueing included);
(c) a profile of one batch-32 decode step on both sides (torch.profiler, ops grouped by what they
    compute) and the engine's own StepTimings, to say what dominates.

Raw numbers → benchmarks/results/engine.json, plot → benchmarks/results/engine.png.

    python benchmarks/bench_engine.py                 # full run (~4-6 min here)
    python benchmarks/bench_engine.py --quick         # smaller, one repeat (~1-2 min)
    python benchmarks/bench_engine.py --dtype float32 # fp32 (tokens must equal HF's exactly)
    python benchmarks/bench_engine.py --ab-revert 6d3b407..452e68b --threads 2
        # this checkout's data plane (actors/) vs the same without a range of commits (or, with
        # --ab-base REV, vs the actors/ of an older commit as they were), on the issue-14
        # workloads (batch 1 and 32 of 128 prompt + 128 new; 32 x (1000 shared + 32) prefix, 32
        # new, cache on), one subprocess per side, alternating which goes first; per-repeat ratios
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import fmt, median, quantile  # noqa: E402

log = logging.getLogger("bench_engine")


# -- the two systems ------------------------------------------------------------------------------
def load_engine(ckpt: Path, dtype: str, prefix_cache: bool, kv_tokens: int):
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens, prefix_cache=prefix_cache)
    return Engine(EngineConfig(str(ckpt), dtype=dtype, scheduler=sched))


def load_hf(ckpt: Path, dtype: str):
    import torch
    from expertmesh.cluster.devtools.checkpoints import load_hf_reference_model

    hf = load_hf_reference_model(ckpt).to(getattr(torch, dtype)).eval()
    # ignore_eos: no EOS stop and no EOS logits processor (min_new_tokens would add a [B, V]
    # torch.where per step that the engine does not pay)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 1
    return hf


def engine_run(eng, prompts: list[list[int]], new_tokens: int, tag: str) -> dict:
    from expertmesh.actors.sampling_params import SamplingParams
    from expertmesh.cluster.engine.types import EngineRequest

    eng.flush_cache()  # every run starts cold: no hits from an earlier repeat's identical prompts
    gc.collect()
    steps0, pre0 = eng.stats.steps, eng.stats.prefill_tokens
    reqs = [EngineRequest(f"{tag}-{i}", p, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    from expertmesh.cluster.engine.engine import _merge
    from expertmesh.cluster.engine.types import RequestOutput

    res = {r.request_id: RequestOutput(r.request_id) for r in reqs}
    executor_s = 0.0
    t0 = time.perf_counter()
    for r in reqs:  # what Engine.run_to_completion does, plus the executor's share of each step
        eng.add_request(r)
    prefill_s = decode_s = 0.0  # steps that carried prefill tokens vs pure decode steps
    while eng.has_work():
        pre = eng.stats.prefill_tokens
        ts = time.perf_counter()
        for d in eng.step():
            _merge(res[d.request_id], d)
        dt = time.perf_counter() - ts
        if eng.stats.prefill_tokens != pre:
            prefill_s += dt
        else:
            decode_s += dt
        executor_s += eng.stats.last_step_s
    wall = time.perf_counter() - t0
    outs = [res[r.request_id] for r in reqs]
    bad = [o.error for o in outs if o.error]
    if bad:
        raise RuntimeError(f"engine request failed: {bad[0]}")
    ttft = [o.metrics.ttft_s for o in outs if o.metrics]
    return {
        "wall_s": wall,
        "executor_s": executor_s,  # model steps on the rank; the rest is scheduler + detokenizer + bookkeeping
        "prefill_steps_s": prefill_s, "decode_steps_s": decode_s,
        "prompt_tokens": sum(len(p) for p in prompts),
        "output_tokens": sum(len(o.token_ids) for o in outs),
        "cached_tokens": sum(o.cached_tokens for o in outs),
        "prefill_tokens_computed": eng.stats.prefill_tokens - pre0,
        "steps": eng.stats.steps - steps0,
        "ttft_s": ttft,
        "tokens": [o.token_ids for o in outs],
    }


def hf_run(hf, prompts: list[list[int]], new_tokens: int) -> dict:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    gc.collect()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          temperature=None, top_p=None, top_k=None)
    wall = time.perf_counter() - t0
    gen = out[:, width:]
    if gen.shape[1] != new_tokens:
        raise RuntimeError(f"HF generated {gen.shape[1]} tokens, expected {new_tokens}")
    return {"wall_s": wall, "prompt_tokens": sum(len(p) for p in prompts), "padded_prompt_tokens": ids.numel(),
            "output_tokens": gen.numel(), "tokens": gen.tolist()}


# -- (a) engine vs HF -----------------------------------------------------------------------------------
def bench_vs_hf(eng, hf, batches: list[int], new_tokens: int, repeats: int, seed: int) -> list[dict]:
    rows = []
    for b in batches:
        prompts = benchlib.random_prompts(b, 32, 128, seed=seed + b)
        runs = {"engine": [], "hf": []}
        engine_overhead = []
        decode_rates = {"engine": [], "hf": []}  # tokens/s of the decode phase alone
        prefill_times = {"engine": [], "hf": []}
        agree = None
        for rep in range(repeats):
            order = ("engine", "hf") if rep % 2 == 0 else ("hf", "engine")
            got = {}
            for who in order:
                r = engine_run(eng, prompts, new_tokens, f"b{b}r{rep}") if who == "engine" else hf_run(hf, prompts, new_tokens)
                if who == "hf":
                    r["prefill_s"] = hf_run(hf, prompts, 1)["wall_s"]  # generate() of one token = its prefill
                got[who] = r
                runs[who].append(r["wall_s"])
                decode_rates[who].append(b * (new_tokens - 1) / max(1e-9, (
                    r["decode_steps_s"] if who == "engine" else r["wall_s"] - r["prefill_s"])))
                prefill_times[who].append(r["prefill_steps_s"] if who == "engine" else r["prefill_s"])
                if who == "engine":
                    engine_overhead.append(1 - r["executor_s"] / r["wall_s"])
                log.info("batch %d rep %d %-6s %.2fs  %.1f out tok/s", b, rep, who, r["wall_s"],
                         r["output_tokens"] / r["wall_s"])
            e, h = got["engine"]["tokens"], got["hf"]["tokens"]
            agree = {
                "sequences_equal": sum(x == y for x, y in zip(e, h)),
                "first_token_equal": sum(x[:1] == y[:1] for x, y in zip(e, h)),
                "token_positions_equal_frac": sum(a == c for x, y in zip(e, h) for a, c in zip(x, y)) / max(1, b * new_tokens),
                "of": b,
            }
        out_tokens = b * new_tokens
        eng_tps = [out_tokens / w for w in runs["engine"]]
        hf_tps = [out_tokens / w for w in runs["hf"]]
        ratios = [w_h / w_e for w_e, w_h in zip(runs["engine"], runs["hf"])]
        rows.append({
            "batch": b, "new_tokens": new_tokens, "prompt_lengths": [len(p) for p in prompts],
            "engine_wall_s": runs["engine"], "hf_wall_s": runs["hf"],
            "engine_out_tok_s": eng_tps, "hf_out_tok_s": hf_tps,
            "engine_out_tok_s_median": median(eng_tps), "hf_out_tok_s_median": median(hf_tps),
            "ratio_per_repeat": ratios, "ratio_median": median(ratios), "agreement": agree,
            "engine_share_outside_model_steps_median": median(engine_overhead),
            "engine_prefill_s_median": median(prefill_times["engine"]), "hf_prefill_s_median": median(prefill_times["hf"]),
            "engine_decode_tok_s_median": median(decode_rates["engine"]), "hf_decode_tok_s_median": median(decode_rates["hf"]),
        })
    return rows


# -- (b) shared prefix: radix cache on vs off -------------------------------------------------------------------
def bench_prefix(engines: dict, n_req: int, prefix_len: int, suffix: tuple[int, int], new_tokens: int,
                 repeats: int, seed: int) -> dict:
    import random

    runs = {"on": [], "off": []}
    for rep in range(repeats):
        rng = random.Random(seed + 1000 + rep)
        prefix = [rng.randrange(2, 120_000) for _ in range(prefix_len)]  # fresh prefix per repeat
        prompts = [prefix + [rng.randrange(2, 120_000) for _ in range(rng.randint(*suffix))] for _ in range(n_req)]
        order = ("on", "off") if rep % 2 == 0 else ("off", "on")
        for mode in order:
            r = engine_run(engines[mode], prompts, new_tokens, f"px{rep}{mode}")
            total = r["prompt_tokens"] + r["output_tokens"]
            r.update(throughput_tok_s=total / r["wall_s"], output_tok_s=r["output_tokens"] / r["wall_s"],
                     ttft_median_s=median(r["ttft_s"]), ttft_p90_s=quantile(r["ttft_s"], 0.9),
                     ttft_mean_s=sum(r["ttft_s"]) / len(r["ttft_s"]))
            r.pop("tokens")
            runs[mode].append(r)
            log.info("prefix rep %d cache %-3s %.2fs  %.0f tok/s  TTFT median %.2fs  cached %d  prefilled %d",
                     rep, mode, r["wall_s"], r["throughput_tok_s"], r["ttft_median_s"], r["cached_tokens"],
                     r["prefill_tokens_computed"])
    ratio = [on["throughput_tok_s"] / off["throughput_tok_s"] for on, off in zip(runs["on"], runs["off"])]
    ttft_ratio = [off["ttft_median_s"] / on["ttft_median_s"] for on, off in zip(runs["on"], runs["off"])]
    return {
        "requests": n_req, "prefix_len": prefix_len, "suffix_len": list(suffix), "new_tokens": new_tokens,
        "runs": runs, "throughput_ratio_per_repeat": ratio, "throughput_ratio_median": median(ratio),
        "ttft_median_ratio_off_over_on_per_repeat": ttft_ratio, "ttft_median_ratio_off_over_on": median(ttft_ratio),
        "on_throughput_median": median([r["throughput_tok_s"] for r in runs["on"]]),
        "off_throughput_median": median([r["throughput_tok_s"] for r in runs["off"]]),
        "on_ttft_median_s": median([r["ttft_median_s"] for r in runs["on"]]),
        "off_ttft_median_s": median([r["ttft_median_s"] for r in runs["off"]]),
    }


# -- (c) where a decode step goes ---------------------------------------------------------------------------------
def _categorize(events, cfg) -> dict[str, float]:
    """Self CPU ms of a profile's ops, grouped by what they compute (shapes identify the matmuls)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    kv_b_out = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    cats: dict[str, float] = defaultdict(float)
    for e in events:
        name, shapes = e.key, e.input_shapes or []
        ms = e.self_cpu_time_total / 1e3
        dims = [tuple(s) for s in shapes if isinstance(s, (list, tuple)) and len(s) == 2]
        if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise"):
            if any(v in d for d in dims):
                cats["lm_head matmul"] += ms
            elif any(d[-1] == cfg.kv_lora_rank for d in dims[:1]) and any(kv_b_out in d for d in dims[1:]):
                cats["MLA kv_b_proj re-expansion (whole context)"] += ms
            else:
                cats["other matmuls (projections, experts, MLPs)"] += ms
        elif name in ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax", "aten::masked_fill",
                      "aten::masked_fill_"):
            cats["attention scores/softmax (bmm, softmax, mask)"] += ms
        elif name in ("aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::copy_", "aten::cat",
                      "aten::index_select", "aten::gather", "aten::scatter_", "aten::index_add_", "aten::where",
                      "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to", "aten::stack"):
            cats["gathers/copies/cat (KV read, permutes, logits copies)"] += ms
        elif name in ("aten::argmax", "aten::topk", "aten::sort", "aten::max", "aten::log_softmax"):
            cats["argmax/topk/sort"] += ms
        else:
            cats["other ops (elementwise, norms, small ops)"] += ms
    return dict(cats)


def profile_decode(eng, hf, cfg, batch: int, steps: int, seed: int, dtype: str) -> dict:
    """One batch of `batch` requests decoding; `steps` decode steps profiled on each side."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from expertmesh.actors.sampling_params import SamplingParams
    from expertmesh.cluster.engine.types import EngineRequest

    prompts = benchlib.random_prompts(batch, 32, 128, seed=seed + 77)
    out: dict = {"batch": batch, "steps": steps}

    # engine: prefill, two warm decode steps, then profile `steps` decode steps
    eng.flush_cache()
    for i, p in enumerate(prompts):
        eng.add_request(EngineRequest(f"prof-{i}", p, SamplingParams(max_tokens=steps + 24, temperature=0, ignore_eos=True)))
    sched = eng.scheduler
    while sched.waiting or any(r.prefilling for r in sched.running.values()):
        eng.step()
    eng.step()
    timings, walls = [], []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - t0)
            timings.append(eng.last_outputs[0].timings)
    while eng.has_work():
        eng.step()
    ev = prof.key_averages(group_by_input_shape=True)
    cats = _categorize(ev, cfg)
    step_ms = median(walls) * 1e3
    st = {k: median([getattr(t, k) for t in timings]) * 1e3 for k in ("total", "attention", "gate", "experts", "sample")}
    st["other (dense MLP layer, embed, norm, batch building)"] = st["total"] - sum(
        st[k] for k in ("attention", "gate", "experts", "sample"))
    out["engine"] = {"step_wall_ms_median": step_ms, "step_timings_ms_median": st,
                     "profile_ms_per_step": {k: v / steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}}

    # HF: the same model forward generate() runs per step (cache, logits_to_keep=1, argmax)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    walls = []
    with torch.inference_mode():
        o = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, nxt, last = o.past_key_values, o.logits[:, -1].argmax(-1), pos[:, -1]

        def hf_step():
            nonlocal cache, nxt, last, mask
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            last = last + 1
            r = hf(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache,
                   use_cache=True, logits_to_keep=1)
            cache, nxt = r.past_key_values, r.logits[:, -1].argmax(-1)

        hf_step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                t0 = time.perf_counter()
                hf_step()
                walls.append(time.perf_counter() - t0)
    cats = _categorize(prof.key_averages(group_by_input_shape=True), cfg)
    out["hf"] = {"step_wall_ms_median": median(walls) * 1e3,
                 "profile_ms_per_step": {k: v / steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}}

    # arithmetic of one decode step (what both must compute), and lm_head alone on this machine
    ctx = sum(len(p) for p in prompts) + batch * 4
    kvb = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    flops = {
        "lm_head": 2 * batch * cfg.hidden_size * cfg.vocab_size,
        "kv_b re-expansion over the context (all layers)": 2 * ctx * cfg.kv_lora_rank * kvb * cfg.num_hidden_layers,
    }
    w = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=getattr(torch, dtype))
    x = torch.randn(batch, cfg.hidden_size, dtype=w.dtype)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        ts.append(time.perf_counter() - t0)
    out["lm_head_alone_ms"] = median(ts[2:]) * 1e3
    out["decode_step_gflop"] = {k: v / 1e9 for k, v in flops.items()}
    # Amdahl: an engine whose step were nothing but the lm_head both must run could beat HF's step
    # by at most this much
    out["ceiling_ratio_if_engine_step_were_only_lm_head"] = out["hf"]["step_wall_ms_median"] / out["lm_head_alone_ms"]
    return out


# -- A/B of two data planes (this checkout's actors/ vs an older commit's) ---------------------------------------
AB_WORKLOADS = ("batch1", "batch32", "prefix")


def ab_workloads(eng, seed: int, names: tuple[str, ...] = AB_WORKLOADS) -> dict:
    """The issue-14 workloads on one engine: output tokens/s (wall, prefill included) and tokens."""
    import random

    out = {}
    for name, b in (("batch1", 1), ("batch32", 32)):
        if name not in names:
            continue
        r = engine_run(eng, benchlib.random_prompts(b, 128, 128, seed=seed + b), 128, f"ab-{name}")
        out[name] = {"tok_s": r["output_tokens"] / r["wall_s"], "tokens": r["tokens"]}
    if "prefix" not in names:
        return out
    rng = random.Random(seed + 1000)
    prefix = [rng.randrange(2, 120_000) for _ in range(1000)]
    prompts = [prefix + [rng.randrange(2, 120_000) for _ in range(32)] for _ in range(32)]
    r = engine_run(eng, prompts, 32, "ab-prefix")
    out["prefix"] = {"tok_s": r["output_tokens"] / r["wall_s"], "tokens": r["tokens"],
                     "cached_tokens": r["cached_tokens"]}
    return out


def ab_child(args) -> int:
    """One side of --ab-base: load an engine on the actors/ in EXPERTMESH_AB_ACTORS (if set), run
    the workloads, print one JSON line."""
    import json
    import os

    actors = os.environ.get("EXPERTMESH_AB_ACTORS")
    if actors:  # point the editable install's expertmesh.actors at the other checkout's folder
        import importlib

        for mod in list(sys.modules.values()):
            mapping = getattr(mod, "MAPPING", None)
            if isinstance(mapping, dict) and "expertmesh.actors" in mapping:
                mapping["expertmesh.actors"] = actors
        importlib.invalidate_caches()
        _older_worker_spec()
    benchlib.setup_env(args.threads)
    ckpt = benchlib.ensure_checkpoint(args.preset)
    eng = load_engine(ckpt, args.dtype, True, 40_000)
    import expertmesh.actors

    engine_run(eng, benchlib.random_prompts(2, 16, 24, seed=99), 4, "warm")
    res = ab_workloads(eng, args.seed, tuple(args.ab_workloads))
    res["actors"] = str(Path(expertmesh.actors.__file__).parent)
    eng.shutdown()
    print("AB-RESULT " + json.dumps(res), flush=True)
    return 0


def _older_worker_spec() -> None:
    """The other side's WorkerSpec may predate a field today's engine hands it (decode_graphs, say):
    such fields are dropped, with a line on stderr, so that side runs as it did."""
    import dataclasses

    from expertmesh.actors.worker import WorkerSpec
    from expertmesh.cluster.engine import engine as engine_module

    known = {f.name for f in dataclasses.fields(WorkerSpec)}

    def spec(**kwargs) -> WorkerSpec:
        dropped = sorted(set(kwargs) - known)
        if dropped:
            print(f"ab: the base's WorkerSpec has no {', '.join(dropped)}: not passed", file=sys.stderr)
        return WorkerSpec(**{k: v for k, v in kwargs.items() if k in known})

    engine_module.WorkerSpec = spec


def ab_main(args) -> int:
    import json
    import os
    import subprocess
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    base_dir = Path(tempfile.mkdtemp(prefix="expertmesh-ab-"))
    rev = args.ab_base or "HEAD"
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "actors"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base_dir)], input=archive, check=True)
    if args.ab_revert:  # HEAD's actors/ without the changes of a commit range (others' later work kept)
        diff = subprocess.run(["git", "-C", str(repo), "diff", args.ab_revert, "--", "actors"], check=True,
                              capture_output=True).stdout
        subprocess.run(["patch", "-R", "-p1", "-s", "-d", str(base_dir)], input=diff, check=True)
    sides = {"base": str(base_dir / "actors"), "new": ""}
    cmd = [sys.executable, __file__, "--ab-child", "--threads", str(args.threads), "--dtype", args.dtype,
           "--preset", args.preset, "--seed", str(args.seed), "--ab-workloads", *args.ab_workloads]
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    repeats = args.repeats or 3
    for rep in range(repeats):
        for side in (("base", "new") if rep % 2 == 0 else ("new", "base")):
            env = {**os.environ, "EXPERTMESH_AB_ACTORS": sides[side]}
            if side == "base":  # its CPU kernels build apart: one shared build dir would rebuild every switch
                env["EXPERTMESH_KERNEL_DIR"] = str(base_dir / "kernels")
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("AB-RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{side} run failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[len("AB-RESULT "):])
            runs[side].append(res)
            log.info("rep %d %-4s (%s): %s", rep, side, res["actors"],
                     ", ".join(f"{w} {res[w]['tok_s']:.1f} tok/s" for w in args.ab_workloads))
    label = args.ab_base or f"HEAD without {args.ab_revert}"
    summary = {"base": label, "threads": args.threads, "dtype": args.dtype, "repeats": repeats}
    print(f"\n== data plane A/B: this checkout vs actors/ of {label} ({args.preset}, {args.dtype}, "
          f"{args.threads} torch threads, output tok/s, wall incl. prefill) ==")
    for w in args.ab_workloads:
        base = [r[w]["tok_s"] for r in runs["base"]]
        new = [r[w]["tok_s"] for r in runs["new"]]
        ratios = [n / b for n, b in zip(new, base)]
        same = all(rb[w]["tokens"] == rn[w]["tokens"] for rb, rn in zip(runs["base"], runs["new"]))
        summary[w] = {"base_tok_s": base, "new_tok_s": new, "ratio_per_repeat": ratios, "tokens_identical": same}
        print(f"{w:>8}: base {fmt(median(base), 1)} -> new {fmt(median(new), 1)} tok/s (median); ratio per repeat "
              f"{', '.join(fmt(x) for x in ratios)}; same tokens as base: {same}")
    benchlib.write_json(args.out / f"engine_ab_{args.dtype}_t{args.threads}.json", summary)
    return 0


# -- output ---------------------------------------------------------------------------------------------------
def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 + (1 if data.get("profile") else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels + (2.5 if panels == 4 else 0), 4.4))
    ax = axes[0]
    vs = data["vs_hf"]
    xs = range(len(vs))
    ax.bar([x - 0.2 for x in xs], [r["hf_out_tok_s_median"] for r in vs], 0.4, label="transformers generate")
    ax.bar([x + 0.2 for x in xs], [r["engine_out_tok_s_median"] for r in vs], 0.4, label="expertmesh engine")
    for x, r in zip(xs, vs):
        ax.text(x + 0.2, r["engine_out_tok_s_median"], f"{r['ratio_median']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in vs])
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title(f"engine vs HF ({data['config']['dtype']}, {vs[0]['new_tokens']} new tokens)")
    ax.legend(fontsize=8)

    px = data.get("prefix")
    if px:
        ax = axes[1]
        ax.bar(["cache off", "cache on"], [px["off_throughput_median"], px["on_throughput_median"]],
               color=["tab:gray", "tab:green"])
        ax.set_ylabel("(prompt + output) tokens/s (median)")
        ax.set_title(f"{px['requests']} x {px['prefix_len']}-token shared prefix: cache on/off "
                     f"{px['throughput_ratio_median']:.2f}x", fontsize=10)
        ax = axes[2]
        on = [r["ttft_s"] for r in px["runs"]["on"]][0]
        off = [r["ttft_s"] for r in px["runs"]["off"]][0]
        ax.boxplot([off, on], tick_labels=["cache off", "cache on"])
        ax.set_ylabel("TTFT s (first repeat, all requests)")
        ax.set_title("time to first token (queueing included)")
    prof = (data.get("profile") or [None])[-1]
    if prof:
        ax = axes[-1]
        cats = sorted(set(prof["engine"]["profile_ms_per_step"]) | set(prof["hf"]["profile_ms_per_step"]))
        bottom = {"engine": 0.0, "hf": 0.0}
        for c in cats:
            vals = [prof[s]["profile_ms_per_step"].get(c, 0.0) for s in ("hf", "engine")]
            ax.bar(["HF", "engine"], vals, bottom=[bottom["hf"], bottom["engine"]], label=c)
            bottom["hf"] += vals[0]
            bottom["engine"] += vals[1]
        ax.set_ylabel("ms per decode step (self CPU, profiled)")
        ax.set_title(f"batch-{prof['batch']} decode step")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads and one repeat")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prefix-requests", type=int, default=None)
    ap.add_argument("--prefix-len", type=int, default=None)
    ap.add_argument("--prefix-new-tokens", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-prefix", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings here)")
    ap.add_argument("--ab-base", default=None, metavar="GIT_REV",
                    help="compare this checkout's actors/ with those of GIT_REV on the issue-14 workloads")
    ap.add_argument("--ab-revert", default=None, metavar="A..B",
                    help="like --ab-base, the base being HEAD's actors/ with the changes A..B reverse-applied")
    ap.add_argument("--ab-workloads", nargs="+", default=list(AB_WORKLOADS), choices=AB_WORKLOADS)
    ap.add_argument("--ab-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("expertmesh", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.ab_child:
        return ab_child(args)
    if args.ab_base or args.ab_revert:
        return ab_main(args)
    q = args.quick
    repeats = args.repeats or (1 if q else 3)
    batches = args.batches or ([1, 8] if q else [1, 32])
    new_tokens = args.new_tokens or (16 if q else 64)
    n_px = args.prefix_requests or (16 if q else 32)
    px_len = args.prefix_len or (512 if q else 1024)
    px_new = args.prefix_new_tokens or (8 if q else 16)

    benchlib.setup_env(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    ckpt = benchlib.ensure_checkpoint(args.preset)
    from expertmesh.actors.model.config import ModelConfig

    cfg = ModelConfig.from_dir(str(ckpt))
    data: dict = {"config": {"preset": args.preset, "dtype": args.dtype, "repeats": repeats, "quick": q,
                             "torch_threads": args.threads, "checkpoint": str(ckpt)},
                  "machine": benchlib.machine_info()}
    t0 = time.perf_counter()
    kv_px = n_px * (px_len + 24 + px_new + 48)
    eng = load_engine(ckpt, args.dtype, True, max(16384, kv_px))
    data["load_s"] = {"engine": time.perf_counter() - t0}
    hf = None
    if not args.skip_hf:
        t0 = time.perf_counter()
        hf = load_hf(ckpt, args.dtype)
        data["load_s"]["hf"] = time.perf_counter() - t0
        # warm both (first calls allocate and pick kernels)
        warm = benchlib.random_prompts(2, 16, 24, seed=99)
        hf_run(hf, warm, 4)
    engine_run(eng, benchlib.random_prompts(2, 16, 24, seed=99), 4, "warm")

    if hf is not None:
        data["vs_hf"] = bench_vs_hf(eng, hf, batches, new_tokens, repeats, args.seed)
        if not args.no_profile:
            data["profile"] = [profile_decode(eng, hf, cfg, b, 4 if q else 6, args.seed, args.dtype) for b in batches]
        del hf
        gc.collect()
    if not args.skip_prefix:
        off = load_engine(ckpt, args.dtype, False, max(16384, kv_px))
        engine_run(off, benchlib.random_prompts(2, 16, 24, seed=99), 4, "warm")
        data["prefix"] = bench_prefix({"on": eng, "off": off}, n_px, px_len, (8, 24), px_new, repeats, args.seed)
        off.shutdown()
    eng.shutdown()

    out_json = benchlib.write_json(args.out / "engine.json", data)
    report(data)
    if data.get("vs_hf") or data.get("prefix"):
        if data.get("vs_hf"):
            plot(data, args.out / "engine.png")
            print(f"wrote {out_json} and {args.out / 'engine.png'}")
        else:
            print(f"wrote {out_json}")
    return 0


def report(data: dict) -> None:
    print()
    print(f"== engine benchmark ({data['config']['preset']}, {data['config']['dtype']}, "
          f"{data['config']['repeats']} repeats, medians) ==")
    for r in data.get("vs_hf", []):
        a = r["agreement"]
        print(f"batch {r['batch']:>3}: engine {fmt(r['engine_out_tok_s_median'], 1)} out tok/s, HF generate "
              f"{fmt(r['hf_out_tok_s_median'], 1)} out tok/s -> ratio {fmt(r['ratio_median'])}x "
              f"(per repeat {', '.join(fmt(x) for x in r['ratio_per_repeat'])}; goal >= 5x at batch 32); "
              f"identical sequences {a['sequences_equal']}/{a['of']}, first tokens {a['first_token_equal']}/{a['of']}; "
              f"engine time outside model steps {fmt(100 * r['engine_share_outside_model_steps_median'], 0)}%")
        print(f"           prefill engine {fmt(r['engine_prefill_s_median'])}s vs HF {fmt(r['hf_prefill_s_median'])}s; "
              f"decode phase engine {fmt(r['engine_decode_tok_s_median'], 1)} vs HF {fmt(r['hf_decode_tok_s_median'], 1)} tok/s")
    px = data.get("prefix")
    if px:
        print(f"shared prefix ({px['requests']} x {px['prefix_len']}-token prefix + {px['suffix_len']} suffix, "
              f"{px['new_tokens']} new): cache on {fmt(px['on_throughput_median'], 0)} tok/s vs off "
              f"{fmt(px['off_throughput_median'], 0)} tok/s -> {fmt(px['throughput_ratio_median'])}x (goal >= 4x); "
              f"TTFT median on {fmt(px['on_ttft_median_s'])}s vs off {fmt(px['off_ttft_median_s'])}s "
              f"({fmt(px['ttft_median_ratio_off_over_on'])}x); prompt tokens served from the cache (cache on): "
              f"{median([r['cached_tokens'] for r in px['runs']['on']])} of {px['runs']['on'][0]['prompt_tokens']}, "
              f"prefilled on {median([r['prefill_tokens_computed'] for r in px['runs']['on']])} vs off "
              f"{median([r['prefill_tokens_computed'] for r in px['runs']['off']])}")
        for mode in ("on", "off"):
            rs = px["runs"][mode]
            print(f"  cache {mode}: prefill steps {fmt(median([r['prefill_steps_s'] for r in rs]))}s, decode steps "
                  f"{fmt(median([r['decode_steps_s'] for r in rs]))}s, wall {fmt(median([r['wall_s'] for r in rs]))}s")
    for prof in data.get("profile") or []:
        print(f"batch-{prof['batch']} decode step: engine {fmt(prof['engine']['step_wall_ms_median'], 1)} ms, "
              f"HF {fmt(prof['hf']['step_wall_ms_median'], 1)} ms; lm_head alone "
              f"{fmt(prof['lm_head_alone_ms'], 1)} ms (HF step / lm_head = "
              f"{fmt(prof['ceiling_ratio_if_engine_step_were_only_lm_head'])}x: the most any engine could gain); "
              f"GFLOP/step {({k: round(v, 2) for k, v in prof['decode_step_gflop'].items()})}")
        for side in ("engine", "hf"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in prof[side]["profile_ms_per_step"].items())
            print(f"  {side} ms/step by category: {parts}")
        st = prof["engine"]["step_timings_ms_median"]
        print("  engine StepTimings ms: " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))


if __name__ == "__main__":
    sys.exit(main())
