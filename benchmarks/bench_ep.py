"""Expert parallelism: where a batch-64 decode step goes at ep_size 1 and 2, and how fast the experts run.

On the `small` preset (benchmarks/results/ckpt-small), in ONE run on a local Ray cluster (127.0.0.1):
two engines side by side, EP1 (one Ray rank actor) and EP2 (two rank actors, gloo all-to-all),
alternating which runs first on every repeat. Each repeat: 64 requests with ~128-token prompts,
prefilled, then `--steps` pure decode steps measured (64 tokens a step).

Reported (medians over the measured steps, per rank):
- the step split from the ranks' StepTimings: attention, gate, dispatch, experts, combine, sample,
  other (dense layer, embedding, norms, batch building); `dispatch` and `combine` are the EP
  all-to-all phases (they include the wait for the slower rank, the routing sort and, for combine,
  the fp32 weighted sum); their share of the rank's step is the all-to-all share (goal <= 20%);
- decode tokens/s (64 / engine step wall time) and EP2 over EP1;
- the expert FFN's GFLOP/s (2*3*H*I flops per routed (token, expert) pair, plus the shared
  expert's per token, since the `experts` span holds both) in the engine, and in a
  microbenchmark of the grouped FFN at the same shapes against torch's plain matmul at those
  shapes (the same per-expert GEMMs with nothing else; goal >= 60%) and against one dense matmul
  of all the pairs (the machine's GEMM rate when weights are reused).

Raw numbers → benchmarks/results/ep.json, plot → benchmarks/results/ep.png.

    python benchmarks/bench_ep.py            # full (~3-4 min here)
    python benchmarks/bench_ep.py --quick    # ~1.5 min
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import fmt, median  # noqa: E402

log = logging.getLogger("bench_ep")

PARTS = ("attention", "gate", "dispatch", "experts", "combine", "sample")


def make_engine(ckpt: Path, dtype: str, ep: int, kv_tokens: int, cpus_per_rank: float):
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.executor import PlacementSpec
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens, max_running_requests=64)
    return Engine(EngineConfig(str(ckpt), dtype=dtype, ep_size=ep, scheduler=sched),
                  placement=PlacementSpec(cpus_per_rank=cpus_per_rank), group_name=f"bench-ep{ep}")


def _pairs_per_rank(load_before, load_after, ep: int, n_experts: int, moe_layers: int) -> list[int]:
    """Routed (token, expert) pairs each rank computed: loads are [src rank][layer][global expert]."""
    per = n_experts // ep
    out = [0] * ep
    for src in range(len(load_after)):
        for layer in range(moe_layers):
            for e in range(n_experts):
                out[e // per] += load_after[src][layer][e] - load_before[src][layer][e]
    return out


def run_decode(eng, cfg, batch: int, prompt_len: tuple[int, int], steps: int, seed: int, tag: str) -> dict:
    from expertmesh.actors.sampling_params import SamplingParams
    from expertmesh.cluster.engine.types import EngineRequest

    eng.flush_cache()
    prompts = benchlib.random_prompts(batch, *prompt_len, seed=seed)
    for i, p in enumerate(prompts):
        eng.add_request(EngineRequest(f"{tag}-{i}", p, SamplingParams(max_tokens=steps + 24, temperature=0, ignore_eos=True)))
    # prefill (and one warm decode step)
    sched = eng.scheduler
    while sched.waiting or any(r.prefilling for r in sched.running.values()):
        eng.step()
    eng.step()
    ep = eng.config.ep_size
    load0 = eng.executor.expert_load()
    walls, execs, per_rank = [], [], [[] for _ in range(ep)]
    tokens_per_rank = [[] for _ in range(ep)]
    for _ in range(steps):
        dec = eng.stats.decode_tokens
        t0 = time.perf_counter()
        eng.step()
        walls.append(time.perf_counter() - t0)
        execs.append(eng.stats.last_step_s)
        if eng.stats.decode_tokens - dec != batch:
            raise RuntimeError(f"expected {batch} decode tokens in a step, got {eng.stats.decode_tokens - dec} "
                               f"(waiting {len(sched.waiting)}, running {len(sched.running)})")
        for o in eng.last_outputs:
            per_rank[o.rank].append(o.timings)
            tokens_per_rank[o.rank].append(len(o.sampled))
    load1 = eng.executor.expert_load()
    while eng.has_work():
        eng.step()

    moe_layers = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    pairs = _pairs_per_rank(load0, load1, ep, cfg.n_routed_experts, moe_layers)
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    ranks = []
    for r in range(ep):
        t = per_rank[r]
        med = {k: median([getattr(x, k) for x in t]) * 1e3 for k in ("total",) + PARTS}
        med["other"] = med["total"] - sum(med[k] for k in PARTS)
        a2a = [(x.dispatch + x.combine) / x.total for x in t]
        shared_tokens = sum(tokens_per_rank[r]) * moe_layers * cfg.n_shared_experts  # decode: 1 token per request
        flops = 2 * 3 * h * inter * (pairs[r] + shared_tokens)
        expert_s = sum(x.experts for x in t)
        ranks.append({
            "rank": r, "step_ms_median": med, "alltoall_share_median": median(a2a),
            "tokens_per_step": median(tokens_per_rank[r]),
            "routed_pairs_per_step": pairs[r] / steps, "expert_gflop_per_step": flops / steps / 1e9,
            "expert_gflops_in_engine": flops / expert_s / 1e9 if expert_s else None,
        })
    step_ms = median(walls) * 1e3
    return {
        "ep_size": ep, "batch": batch, "steps": steps,
        "step_wall_ms": [w * 1e3 for w in walls], "step_wall_ms_median": step_ms,
        "executor_ms_median": median(execs) * 1e3,
        "decode_tok_s": batch / (step_ms / 1e3),
        "ranks": ranks,
        "alltoall_share_max_rank": max(r["alltoall_share_median"] for r in ranks),
    }


# -- grouped expert FFN vs torch matmul at the same shapes ------------------------------------------------
def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return median(ts)


def expert_microbench(cfg, dtype: str, tokens: int, experts: int, reps: int, seed: int) -> dict:
    """The model's own grouped FFN (and the full local routed-experts step) on `experts` local experts
    receiving the pairs of `tokens` tokens routed uniformly over all routed experts, against the same
    per-expert GEMMs alone and against one dense GEMM of all the pairs."""
    import torch
    import torch.nn.functional as F

    from expertmesh.actors.model.experts import ExpertWeights, LocalExperts

    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    h, inter, k, n_all = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    w = ExpertWeights(0, experts, h, inter).to(dt)
    with torch.no_grad():
        w.w13.normal_(0, h ** -0.5)
        w.w2.normal_(0, inter ** -0.5)
    # routing: k distinct experts per token among all n_all; keep the pairs that land on our `experts`
    topk = torch.stack([torch.randperm(n_all)[:k] for _ in range(tokens)])
    keep = topk < experts
    counts = torch.bincount(topk[keep], minlength=experts).tolist()
    pairs = int(keep.sum())
    xs = torch.randn(pairs, h, dtype=dt)
    flops = 2 * 3 * h * inter * pairs

    grouped = _time(lambda: w.grouped_ffn(xs, counts), reps)
    # the full LocalExperts step (permute, gather, grouped FFN, fp32 weighted combine) when every
    # expert is local (experts == n_all)
    full = None
    if experts == n_all:
        x = torch.randn(tokens, h, dtype=dt)
        weights = torch.rand(tokens, k)
        le = LocalExperts(w)
        full = _time(lambda: le(x, topk, weights), reps)
    # same per-expert GEMMs, contiguous inputs and transposed weights prepared up front, nothing else
    ins1, ins2, w13t, w2t = [], [], [], []
    for e, n in enumerate(counts):
        ins1.append(torch.randn(n, h, dtype=dt))
        ins2.append(torch.randn(n, inter, dtype=dt))
        w13t.append(w.w13[e].t().contiguous())
        w2t.append(w.w2[e].t().contiguous())

    def plain_mm():
        for e, n in enumerate(counts):
            if n:
                torch.mm(ins1[e], w13t[e])
                torch.mm(ins2[e], w2t[e])

    def plain_linear():
        for e, n in enumerate(counts):
            if n:
                F.linear(ins1[e], w.w13[e])
                F.linear(ins2[e], w.w2[e])

    mm = _time(plain_mm, reps)
    lin = _time(plain_linear, reps)
    big1, big2 = torch.randn(pairs, h, dtype=dt), torch.randn(pairs, inter, dtype=dt)
    dense = _time(lambda: (F.linear(big1, w.w13[0]), F.linear(big2, w.w2[0])), reps)
    g = lambda s: flops / s / 1e9 if s else None  # noqa: E731
    return {
        "dtype": dtype, "tokens": tokens, "local_experts": experts, "pairs": pairs,
        "rows_per_expert_mean": pairs / experts, "gflop": flops / 1e9,
        "grouped_ffn_ms": grouped * 1e3, "grouped_ffn_gflops": g(grouped),
        "local_experts_step_ms": None if full is None else full * 1e3,
        "local_experts_step_gflops": g(full),
        "plain_matmul_same_shapes_ms": min(mm, lin) * 1e3, "plain_matmul_same_shapes_gflops": g(min(mm, lin)),
        "dense_one_matmul_ms": dense * 1e3, "dense_one_matmul_gflops": g(dense),
        "grouped_over_plain": min(mm, lin) / grouped,
        "grouped_over_dense": dense / grouped,
        "weight_bytes_read": experts_touched_bytes(counts, h, inter, dt),
        "weight_stream_gb_s_plain": experts_touched_bytes(counts, h, inter, dt) / min(mm, lin) / 1e9,
    }


def experts_touched_bytes(counts, h, inter, dt) -> int:
    import torch

    size = torch.empty((), dtype=dt).element_size()
    return sum(1 for n in counts if n) * 3 * h * inter * size


# -- output ----------------------------------------------------------------------------------------
def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    labels, rows = [], []
    for key in ("ep1", "ep2"):
        best = data["summary"][key]
        for r in best["ranks"]:
            labels.append(f"EP{best['ep_size']} rank {r['rank']}")
            rows.append(r["step_ms_median"])
    bottom = [0.0] * len(rows)
    for part in PARTS + ("other",):
        vals = [r[part] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    s = data["summary"]
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(f"batch-64 decode step ({data['config']['dtype']}): EP2/EP1 tokens/s = "
                 f"{s['ep2_over_ep1_tok_s']:.2f}, all-to-all share {100 * s['ep2_alltoall_share']:.0f}%")
    ax.legend(fontsize=7)
    ax = axes[1]
    mb = data["microbench"]
    names, vals = [], []
    for m in mb:
        tag = f"{m['local_experts']} experts"
        names += [f"grouped FFN\n{tag}", f"plain matmul\n{tag}", f"dense matmul\n{tag}"]
        vals += [m["grouped_ffn_gflops"], m["plain_matmul_same_shapes_gflops"], m["dense_one_matmul_gflops"]]
    for key in ("ep1", "ep2"):
        for r in data["summary"][key]["ranks"]:
            names.append(f"in engine\nEP{data['summary'][key]['ep_size']} r{r['rank']}")
            vals.append(r["expert_gflops_in_engine"] or 0)
    ax.bar(range(len(vals)), vals, color=["tab:blue", "tab:orange", "tab:gray"] * len(mb) + ["tab:green"] * (len(vals) - 3 * len(mb)))
    ax.set_xticks(range(len(vals)), names, fontsize=6)
    ax.set_ylabel("GFLOP/s")
    ax.set_title("expert FFN rate vs torch matmul at the same shapes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="decode steps measured per repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cpus-per-rank", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("expertmesh", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    steps = args.steps or (6 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)

    benchlib.setup_env()
    # Ray starts worker processes at nice 15 by default: on a shared machine the rank actors would
    # then lose every contest for the cores against the driver and everyone else's processes
    os.environ.setdefault("RAY_worker_niceness", "0")
    import warnings

    warnings.filterwarnings("ignore")
    ckpt = benchlib.ensure_checkpoint(args.preset)
    from expertmesh.actors.model.config import ModelConfig

    cfg = ModelConfig.from_dir(str(ckpt))
    data: dict = {"config": {"preset": args.preset, "dtype": args.dtype, "batch": args.batch, "steps": steps,
                             "repeats": repeats, "prompt_len": [120, 136], "cpus_per_rank": args.cpus_per_rank,
                             "backend": "gloo", "torch_threads_per_rank": 1,
                             "ray_worker_niceness": os.environ.get("RAY_worker_niceness")},
                  "machine": benchlib.machine_info()}

    # microbenchmark first, in this process, before any rank actor competes for the cores
    mreps = 5 if args.quick else 15
    data["microbench"] = [
        expert_microbench(cfg, args.dtype, args.batch, cfg.n_routed_experts, mreps, args.seed),
        expert_microbench(cfg, args.dtype, args.batch, cfg.n_routed_experts // 2, mreps, args.seed),
    ]

    import ray

    kv = args.batch * (136 + steps + 24 + 48)
    engines: dict = {}

    def start() -> None:
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        engines["ep1"] = make_engine(ckpt, args.dtype, 1, kv, args.cpus_per_rank)
        engines["ep2"] = make_engine(ckpt, args.dtype, 2, kv, args.cpus_per_rank)
        data["startup_s"] = time.perf_counter() - t0
        data["placement"] = {k: e.executor.describe() for k, e in engines.items()}
        for d in data["placement"].values():
            for r in d:
                r.pop("read_tensor_names", None)

    def stop() -> None:
        for e in engines.values():
            try:
                e.shutdown()
            except Exception:
                pass
        engines.clear()
        ray.shutdown()

    runs = {"ep1": [], "ep2": []}
    restarts = 0
    start()
    try:
        rep = 0
        while rep < repeats:
            order = ("ep1", "ep2") if rep % 2 == 0 else ("ep2", "ep1")
            try:
                got = {key: run_decode(engines[key], cfg, args.batch, (120, 136), steps, args.seed + rep, f"{key}r{rep}{restarts}")
                       for key in order}
            except Exception as exc:  # a `ray stop --force` elsewhere on the machine takes our cluster too
                if restarts >= 3:
                    raise
                restarts += 1
                log.warning("repeat %d failed (%s: %s); restarting Ray and the groups (%d)", rep,
                            type(exc).__name__, str(exc)[:200], restarts)
                stop()
                start()
                continue
            for key in order:
                r = got[key]
                runs[key].append(r)
                log.info("rep %d %s: step %.1f ms, %.1f tok/s, all-to-all share %s", rep, key,
                         r["step_wall_ms_median"], r["decode_tok_s"],
                         ", ".join(f"{100 * x['alltoall_share_median']:.0f}%" for x in r["ranks"]))
            rep += 1
    finally:
        stop()
    data["restarts"] = restarts
    data["runs"] = runs
    # summary: the median repeat (by tokens/s) of each configuration
    summary = {}
    for key, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["decode_tok_s"])
        summary[key] = rs[len(rs) // 2]
    ratios = [b["decode_tok_s"] / a["decode_tok_s"] for a, b in zip(runs["ep1"], runs["ep2"])]
    summary["ep2_over_ep1_tok_s_per_repeat"] = ratios
    summary["ep2_over_ep1_tok_s"] = median(ratios)
    summary["ep2_alltoall_share"] = median([r["alltoall_share_max_rank"] for r in runs["ep2"]])
    data["summary"] = summary
    out = benchlib.write_json(args.out / "ep.json", data)
    plot(data, args.out / "ep.png")
    report(data)
    print(f"wrote {out} and {args.out / 'ep.png'}")
    return 0


def report(data: dict) -> None:
    s = data["summary"]
    c = data["config"]
    print()
    print(f"== EP benchmark ({c['preset']}, {c['dtype']}, batch {c['batch']} decode, {c['steps']} steps x "
          f"{c['repeats']} repeats; medians) ==")
    for key in ("ep1", "ep2"):
        r = s[key]
        print(f"EP{r['ep_size']}: step {fmt(r['step_wall_ms_median'], 1)} ms (rank work {fmt(r['executor_ms_median'], 1)} ms "
              f"incl. the Ray call), {fmt(r['decode_tok_s'], 1)} decode tok/s")
        for x in r["ranks"]:
            m = x["step_ms_median"]
            print(f"  rank {x['rank']} ({x['tokens_per_step']} tokens): " + ", ".join(f"{k} {m[k]:.1f}" for k in ("total",) + PARTS + ("other",))
                  + f" ms; all-to-all {100 * x['alltoall_share_median']:.1f}% of the step; experts "
                  f"{fmt(x['expert_gflops_in_engine'], 1)} GFLOP/s over {x['routed_pairs_per_step']:.0f} routed pairs/step")
    print(f"EP2 / EP1 decode tokens/s: {fmt(s['ep2_over_ep1_tok_s'])} (per repeat "
          f"{', '.join(fmt(x) for x in s['ep2_over_ep1_tok_s_per_repeat'])}); EP2 all-to-all share (worst rank) "
          f"{fmt(100 * s['ep2_alltoall_share'], 1)}% (goal <= 20%)")
    for m in data["microbench"]:
        print(f"grouped FFN, {m['local_experts']} local experts, {m['pairs']} pairs ({m['rows_per_expert_mean']:.1f} rows/expert): "
              f"{fmt(m['grouped_ffn_gflops'], 1)} GFLOP/s vs plain matmul at the same shapes "
              f"{fmt(m['plain_matmul_same_shapes_gflops'], 1)} -> {fmt(100 * m['grouped_over_plain'], 0)}% (goal >= 60%); "
              f"one dense matmul of all pairs {fmt(m['dense_one_matmul_gflops'], 1)} GFLOP/s; "
              f"weights streamed at {fmt(m['weight_stream_gb_s_plain'], 1)} GB/s by the plain matmuls"
              + (f"; full local routed step (permute+FFN+combine) {fmt(m['local_experts_step_gflops'], 1)} GFLOP/s"
                 if m["local_experts_step_gflops"] else ""))
    ep1 = s["ep1"]["ranks"][0]["expert_gflops_in_engine"]
    plain = data["microbench"][0]["plain_matmul_same_shapes_gflops"]
    if ep1 and plain:
        print(f"in-engine expert FFN (EP1) {fmt(ep1, 1)} GFLOP/s = {fmt(100 * ep1 / plain, 0)}% of plain matmul at the same shapes")


if __name__ == "__main__":
    sys.exit(main())
