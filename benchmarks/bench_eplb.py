"""Expert load balancing (EPLB): batch-64 decode on a skewed-gate checkpoint, EPLB off vs on.

On the `small` preset with an unbalanced gate (`--gate-skew`, default 1.0: experts 0-2 take half
of every token's 6 slots; benchmarks/results/ckpt-small-skewed), in ONE run on a local Ray cluster
(127.0.0.1), per ep_size (2, then 4): three engines side by side — EPLB off, on with R = 0, on with
R = 4 redundant experts — alternating which runs first on every repeat. Each repeat: 64 requests
(~32-token prompts) prefilled, `--warm` decode steps in which the balancer sees the load and
rebalances (every 8 steps, window 8), then `--steps` decode steps measured, then a prefill burst
(32 prompts of ~96 tokens, one output token each) on the layout decode left.

Reported per configuration (medians over the measured steps): step wall time, the busiest rank's
expert time (max over ranks of the `experts` span, which the other ranks wait for inside the
combine), decode tokens/s and its ratio to EPLB off, balancedness (rows each rank computed, mean /
max, per MoE layer), prefill tokens/s of the burst, and for each rebalance: its duration (first staged step to switch-over, serving
on), the step time the ranks spent moving weights, and how many expert copies crossed ranks.

Raw numbers → benchmarks/results/eplb.json.

    python benchmarks/bench_eplb.py            # ~6-8 min here
    python benchmarks/bench_eplb.py --quick    # ~3 min
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import fmt, median  # noqa: E402

log = logging.getLogger("bench_eplb")

CONFIGS = {"off": None, "on_r0": 0, "on_r4": 4}  # EPLB off, on with R redundant experts


def skewed_checkpoint(preset: str, skew: float) -> Path:
    folder = benchlib.RESULTS / f"ckpt-{preset}-skewed"
    marker = folder / ".complete"
    if marker.exists() and json.loads(marker.read_text()).get("gate_skew") == skew:
        return folder
    from expertmesh.cluster.devtools.checkpoints import make_checkpoint

    make_checkpoint(folder, preset=preset, seed=0, gate_skew=skew)
    marker.write_text(json.dumps({"preset": preset, "seed": 0, "gate_skew": skew}) + "\n")
    return folder


def make_engine(ckpt: Path, dtype: str, ep: int, redundant: int | None, kv_tokens: int, cpus: float, tag: str):
    from expertmesh.cluster.engine.balancing import EplbConfig
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.executor import PlacementSpec
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    eplb = EplbConfig(enabled=redundant is not None, redundant_experts=redundant or 0, interval_steps=8,
                      check_every_steps=4, window_steps=8)
    sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens, max_running_requests=64)
    return Engine(EngineConfig(str(ckpt), dtype=dtype, ep_size=ep, scheduler=sched, eplb=eplb),
                  placement=PlacementSpec(cpus_per_rank=cpus), group_name=f"bench-eplb-{tag}")


def run_decode(eng, batch: int, warm: int, steps: int, seed: int, tag: str, first: dict) -> dict:
    """One repeat on `eng`; `first` receives the balancer's stats right after its first rebalance."""
    from expertmesh.actors.sampling_params import SamplingParams
    from expertmesh.cluster.engine.types import EngineRequest

    eng.flush_cache()
    for i, p in enumerate(benchlib.random_prompts(batch, 24, 40, seed=seed)):
        eng.add_request(EngineRequest(f"{tag}-{i}", p, SamplingParams(max_tokens=warm + steps + 8, temperature=0,
                                                                     ignore_eos=True)))
    sched = eng.scheduler
    while sched.waiting or any(r.prefilling for r in sched.running.values()):
        eng.step()
    stats = getattr(eng.executor, "eplb_stats", lambda: None)

    def step():
        eng.step()
        s = stats()
        if s and s["rebalances"] and not first:
            first.update(s, at_step=eng.stats.steps)

    before = stats()
    for _ in range(warm):
        step()
    warm_stats = stats()
    walls, busiest, experts_mean, eplb_s = [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
        t = [o.timings for o in eng.last_outputs]
        busiest.append(max(x.experts for x in t))
        experts_mean.append(sum(x.experts for x in t) / len(t))
        eplb_s.append(max(x.eplb for x in t))
    after = stats()
    while eng.has_work():
        eng.step()
    # a prefill burst on the layout the decode phase left: many rows per hot expert
    burst = benchlib.random_prompts(batch // 2, 88, 104, seed=seed + 1000)
    for i, p in enumerate(burst):
        eng.add_request(EngineRequest(f"{tag}-p{i}", p, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)))
    t0 = time.perf_counter()
    prefill_steps = []
    while eng.has_work():
        eng.step()
        prefill_steps.append(max(o.timings.experts for o in eng.last_outputs))
    prefill_s = time.perf_counter() - t0
    step_ms = median(walls) * 1e3
    return {
        "step_wall_ms_median": step_ms, "step_wall_ms": [w * 1e3 for w in walls],
        "busiest_rank_experts_ms_median": median(busiest) * 1e3,
        "mean_rank_experts_ms_median": median(experts_mean) * 1e3,
        "decode_tok_s": batch / (step_ms / 1e3),
        "measured_steps_with_weight_moves": sum(1 for x in eplb_s if x > 0),
        "prefill_tok_s": sum(map(len, burst)) / prefill_s, "prefill_s": prefill_s,
        "prefill_busiest_experts_s": sum(prefill_steps),
        "eplb_before_warm": before, "eplb_after_warm": warm_stats, "eplb_end": after,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--gate-skew", type=float, default=1.0)
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warm", type=int, default=20, help="decode steps before measuring (the balancer acts)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cpus-per-rank", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("expertmesh", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    steps = args.steps or (8 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    benchlib.setup_env()
    os.environ.setdefault("RAY_worker_niceness", "0")
    import warnings

    warnings.filterwarnings("ignore")
    ckpt = skewed_checkpoint(args.preset, args.gate_skew)
    import ray

    data: dict = {"config": {"preset": args.preset, "gate_skew": args.gate_skew, "dtype": args.dtype,
                             "batch": args.batch, "warm": args.warm, "steps": steps, "repeats": repeats,
                             "cpus_per_rank": args.cpus_per_rank, "backend": "gloo", "torch_threads_per_rank": 1},
                  "machine": benchlib.machine_info(), "runs": {}}
    kv = max(args.batch * (40 + args.warm + steps + 16), args.batch // 2 * 112) // min(args.ep) + 512
    for ep in args.ep:
        ray.init(address="local", num_cpus=max(4, 3 * ep), include_dashboard=False, log_to_driver=False)
        engines = {}
        try:
            t0 = time.perf_counter()
            for key, r in CONFIGS.items():
                engines[key] = make_engine(ckpt, args.dtype, ep, r, kv, args.cpus_per_rank, f"ep{ep}-{key}")
            log.info("ep %d: three engines up in %.1fs", ep, time.perf_counter() - t0)
            runs: dict[str, list] = {k: [] for k in CONFIGS}
            firsts: dict[str, dict] = {k: {} for k in CONFIGS}
            keys = list(CONFIGS)
            for rep in range(repeats):
                order = keys[rep % 3:] + keys[:rep % 3]
                for key in order:
                    r = run_decode(engines[key], args.batch, args.warm, steps, rep, f"ep{ep}{key}r{rep}", firsts[key])
                    runs[key].append(r)
                    b = (r["eplb_end"] or {}).get("balancedness")
                    log.info("ep %d rep %d %s: step %.1f ms, busiest experts %.1f ms, %.1f tok/s, balancedness %s",
                             ep, rep, key, r["step_wall_ms_median"], r["busiest_rank_experts_ms_median"],
                             r["decode_tok_s"], [round(x, 2) for x in b] if b else "-")
            data["runs"][f"ep{ep}"] = runs
            data.setdefault("first_rebalance", {})[f"ep{ep}"] = firsts
        finally:
            for e in engines.values():
                try:
                    e.shutdown()
                except Exception:  # noqa: BLE001
                    pass
            ray.shutdown()
    data["summary"] = summarize(data)
    out = benchlib.write_json(args.out / "eplb.json", data)
    report(data)
    print(f"wrote {out}")
    return 0


def summarize(data: dict) -> dict:
    out = {}
    for ep_key, runs in data["runs"].items():
        s = {}
        for key, rs in runs.items():
            rs = sorted(rs, key=lambda r: r["decode_tok_s"])
            mid = rs[len(rs) // 2]
            warm = mid["eplb_after_warm"] or {}
            s[key] = {
                "step_wall_ms": mid["step_wall_ms_median"], "busiest_experts_ms": mid["busiest_rank_experts_ms_median"],
                "mean_experts_ms": mid["mean_rank_experts_ms_median"], "decode_tok_s": mid["decode_tok_s"],
                "balancedness_measured": (mid["eplb_end"] or {}).get("balancedness"),
                "balancedness_before_first_rebalance": warm.get("balancedness_before"),
                "balancedness_after_first_rebalance": warm.get("balancedness_after"),
                "rebalance_duration_s": [r["eplb_after_warm"]["last_duration_s"] for r in rs if r["eplb_after_warm"]],
                "rebalance_move_s": [r["eplb_after_warm"]["last_move_s"] for r in rs if r["eplb_after_warm"]],
                "moved_copies": [r["eplb_after_warm"]["moved_experts"] for r in rs if r["eplb_after_warm"]],
                "measured_steps_with_weight_moves": sum(r["measured_steps_with_weight_moves"] for r in rs),
                "prefill_tok_s": median([r["prefill_tok_s"] for r in rs]),
                "prefill_busiest_experts_s": median([r["prefill_busiest_experts_s"] for r in rs]),
            }
        for key in ("on_r0", "on_r4"):
            f = data["first_rebalance"][ep_key][key]
            s[key]["first_rebalance"] = {k: f.get(k) for k in ("at_step", "balancedness_before", "balancedness_after",
                                                                "last_duration_s", "last_move_s", "moved_experts")}
            s[key]["rebalances_total"] = max((r["eplb_end"] or {}).get("rebalances", 0) for r in runs[key])
            pairs = list(zip(runs["off"], runs[key]))
            s[f"{key}_over_off_tok_s"] = median([b["decode_tok_s"] / a["decode_tok_s"] for a, b in pairs])
            s[f"{key}_over_off_busiest_experts"] = median(
                [b["busiest_rank_experts_ms_median"] / a["busiest_rank_experts_ms_median"] for a, b in pairs])
            s[f"{key}_over_off_prefill_tok_s"] = median([b["prefill_tok_s"] / a["prefill_tok_s"] for a, b in pairs])
        out[ep_key] = s
    return out


def report(data: dict) -> None:
    c = data["config"]
    print()
    print(f"== EPLB benchmark ({c['preset']} gate_skew {c['gate_skew']}, {c['dtype']}, batch {c['batch']} decode, "
          f"{c['steps']} steps x {c['repeats']} repeats after {c['warm']} warm-up steps; medians) ==")
    for ep_key, s in data["summary"].items():
        print(f"{ep_key}:")
        for key in CONFIGS:
            x = s[key]
            bal = x["balancedness_measured"]
            line = (f"  {key:6s}: step {fmt(x['step_wall_ms'], 1)} ms, busiest rank experts "
                    f"{fmt(x['busiest_experts_ms'], 1)} ms (mean rank {fmt(x['mean_experts_ms'], 1)}), "
                    f"{fmt(x['decode_tok_s'], 1)} tok/s")
            line += (f"; prefill burst {fmt(x['prefill_tok_s'], 0)} tok/s (busiest-rank experts "
                     f"{fmt(1e3 * x['prefill_busiest_experts_s'], 0)} ms)")
            if bal:
                line += f", balancedness {[round(b, 2) for b in bal]}"
            f = x.get("first_rebalance")
            if f and f.get("at_step"):
                line += (f"; first rebalance (step {f['at_step']}) {[round(b, 2) for b in f['balancedness_before']]} -> "
                         f"{[round(b, 2) for b in f['balancedness_after']]}, moving {fmt(1e3 * f['last_move_s'], 1)} ms "
                         f"over {fmt(1e3 * f['last_duration_s'], 0)} ms, {f['moved_experts']} copies; "
                         f"{x['rebalances_total']} rebalances in all, {x['measured_steps_with_weight_moves']} measured "
                         f"steps moved weights")
            print(line)
        print(f"  tok/s vs off: R=0 {fmt(s['on_r0_over_off_tok_s'])}, R=4 {fmt(s['on_r4_over_off_tok_s'])}; busiest-rank "
              f"expert time vs off: R=0 {fmt(s['on_r0_over_off_busiest_experts'])}, R=4 "
              f"{fmt(s['on_r4_over_off_busiest_experts'])}; prefill tok/s vs off: R=0 "
              f"{fmt(s['on_r0_over_off_prefill_tok_s'])}, R=4 {fmt(s['on_r4_over_off_prefill_tok_s'])}")


if __name__ == "__main__":
    raise SystemExit(main())
