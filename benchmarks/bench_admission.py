"""R1-shaped workload: admission by use vs lifetime reservation, side by side in one run.

64 requests with 512-token prompts ask for the rest of the context (max_tokens 3584: the `small`
preset's context is 4096) and stop early, after 200–1500 tokens, on a stop id taken from a
reference run of the same request (seeded sampling at R1's 0.6 / 0.95, which is exact under
batching, so every run must reproduce the reference tokens). All arrive at once; the pool is the
same for both policies. Optionally the same work on vLLM's CPU build (benchmarks/peers), which
is told each request's real length (its admission does not depend on max_tokens either).

    .venv/bin/python benchmarks/bench_admission.py                 # 64 requests, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_admission.py --requests 16 --max-out 600 --no-vllm   # quick look
"""
from __future__ import annotations

import argparse
import gc
import logging
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402
from benchlib import fmt, quantile  # noqa: E402

log = logging.getLogger("bench_admission")


def make_workload(args) -> list[dict]:
    rng = random.Random(args.seed)
    return [{"prompt": [rng.randrange(2, 120_000) for _ in range(args.prompt_tokens)],
             "target": rng.randrange(args.min_out, args.max_out + 1), "seed": 1000 + i}
            for i in range(args.requests)]


def _engine(ckpt: Path, args, admission: str, kv_tokens: int):
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.scheduler import SchedulerConfig

    sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens, page_size=16, max_running_requests=args.requests,
                            max_batch_tokens=2048, chunked_prefill_tokens=1024, admission=admission)
    return Engine(EngineConfig(str(ckpt), dtype=args.dtype, scheduler=sched))


def _params(w: dict, max_tokens: int, stop: list[int]):
    from expertmesh.actors.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.6, top_p=0.95, seed=w["seed"], ignore_eos=True,
                          stop_token_ids=stop)


def reference(ckpt: Path, args, work: list[dict]) -> None:
    """Each request's tokens up to its target; its stop id: a token whose first occurrence falls
    between min_out and the target, so the request ends exactly there."""
    from expertmesh.cluster.engine.types import EngineRequest

    big = args.requests * (args.prompt_tokens + args.max_out + 32)
    e = _engine(ckpt, args, "lifetime", big)
    try:
        t0 = time.perf_counter()
        res = e.run_to_completion([EngineRequest(f"ref{i}", w["prompt"], _params(w, w["target"], []))
                                   for i, w in enumerate(work)])
        log.info("reference run: %.0f s", time.perf_counter() - t0)
    finally:
        e.shutdown()
    for i, w in enumerate(work):
        out = res[f"ref{i}"].token_ids
        first: dict[int, int] = {}
        for k, t in enumerate(out):
            first.setdefault(t, k)
        ok = [k for t, k in first.items() if args.min_out - 1 <= k < len(out)]
        k = max(ok) if ok else len(out) - 1
        w["stop"], w["length"], w["tokens"] = out[k], k + 1, out[: k + 1]


def run_ours(ckpt: Path, args, work: list[dict], admission: str) -> dict:
    from expertmesh.cluster.engine.types import EngineRequest

    e = _engine(ckpt, args, admission, args.kv_tokens)
    try:
        reqs = [EngineRequest(f"{admission}{i}", w["prompt"], _params(w, args.max_tokens, [w["stop"]]))
                for i, w in enumerate(work)]
        gc.collect()
        t0 = time.perf_counter()
        for r in reqs:
            e.add_request(r)
        done: dict[str, float] = {}
        toks: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        peak, steps, running_sum = 0, 0, 0
        while e.has_work():
            for d in e.step():
                toks[d.request_id] += d.token_ids
                if d.finished:
                    done[d.request_id] = time.perf_counter() - t0
            peak = max(peak, len(e.scheduler.running))
            running_sum += len(e.scheduler.running)
            steps += 1
            if steps % 200 == 0:
                log.info("%s: step %d, %d done, %d running, %d waiting, %.0f s", admission, steps, len(done),
                         len(e.scheduler.running), len(e.scheduler.waiting), time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        exact = sum(toks[f"{admission}{i}"] == w["tokens"] for i, w in enumerate(work))
        out_tokens = sum(len(v) for v in toks.values())
        lat = sorted(done.values())
        st = e.scheduler.admission_stats
        return {"admission": admission, "wall_s": wall, "output_tokens": out_tokens, "tok_s": out_tokens / wall,
                "peak_running": peak, "mean_running": running_sum / max(1, steps), "steps": steps,
                "p50_s": quantile(lat, 0.5), "p99_s": quantile(lat, 0.99), "exact": exact, "requests": len(work),
                "retractions": st.retractions, "recomputed_tokens": st.recomputed_tokens}
    finally:
        e.shutdown()


def run_vllm(ckpt: Path, args, work: list[dict]) -> dict:
    sys.path.insert(0, str(HERE / "peers"))
    from bench_peers import PeerProcess  # noqa: E402

    peer = PeerProcess("vllm", "vllm", ckpt, args.dtype, args.threads, {},
                       ["--max-model-len", str(args.prompt_tokens + args.max_tokens), "--max-seqs", str(args.requests)],
                       kv_space_gib=args.vllm_kv_gib)
    try:
        r = peer.generate([w["prompt"] for w in work], [w["length"] for w in work])
        return {"admission": "vLLM CPU", "wall_s": r["wall_s"], "output_tokens": r["output_tokens"],
                "tok_s": r["output_tokens"] / r["wall_s"], "info": peer.info}
    finally:
        peer.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=3584)
    ap.add_argument("--min-out", type=int, default=200)
    ap.add_argument("--max-out", type=int, default=1500)
    ap.add_argument("--kv-tokens", type=int, default=32768, help="KV pool (tokens) of the rank, both policies")
    ap.add_argument("--dtype", default="float32", help="float32: seeded sampling is exact under any batching, so "
                    "every run reproduces the reference lengths (bf16 matmuls vary with batch shape)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-kv-gib", type=int, default=4)
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS / "admission.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    benchlib.setup_env(args.threads)
    ckpt = benchlib.ensure_checkpoint("small")
    work = make_workload(args)
    reference(ckpt, args, work)
    log.info("outputs end at %d..%d tokens (mean %.0f)", min(w["length"] for w in work),
             max(w["length"] for w in work), sum(w["length"] for w in work) / len(work))
    runs = [run_ours(ckpt, args, work, "lifetime"), run_ours(ckpt, args, work, "use")]
    if not args.no_vllm:
        try:
            runs.append(run_vllm(ckpt, args, work))
        except Exception as exc:  # the peers are optional; say why they are missing
            log.warning("vLLM run skipped: %s", exc)
    base = runs[0]["tok_s"]
    print(f"\n{args.requests} requests, {args.prompt_tokens}-token prompts, max_tokens {args.max_tokens}, "
          f"outputs {args.min_out}-{args.max_out} tokens, pool {args.kv_tokens} tokens, {args.dtype}, "
          f"{args.threads} threads")
    print("| admission | tok/s | × lifetime | peak running | mean running | p50 s | p99 s | retractions "
          "| recomputed tokens | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['admission']} | {fmt(r['tok_s'], 0)} | {fmt(r['tok_s'] / base)} | {r.get('peak_running', '')} "
              f"| {fmt(r['mean_running'], 1) if 'mean_running' in r else ''} | {fmt(r.get('p50_s'), 1)} "
              f"| {fmt(r.get('p99_s'), 1)} | {r.get('retractions', '')} | {r.get('recomputed_tokens', '')} "
              f"| {str(r['exact']) + '/' + str(r['requests']) if 'exact' in r else 'n/a'} |")
    benchlib.write_json(args.out, {"args": vars(args), "machine": benchlib.machine_info(), "runs": runs,
                                   "lengths": [w["length"] for w in work]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
