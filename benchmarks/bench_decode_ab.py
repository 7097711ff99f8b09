"""A decode step through the composite CPU ops vs op by op, alternating every step, in one engine.

At one token a data-plane change worth 5% is below this machine's run-to-run noise (the same
batch-1 run moves ±20% minute to minute, `bench_engine.py --ab-base` sees it process to process).
Here one engine (`small`, bf16, the CPU kernels) decodes while the variant switches at EVERY step,
so both see the same minutes: "composite" is the shipped path (a decoder layer's attention block
one `mla_attention` call, its MoE block one `moe_layer` call); "op_by_op" makes each layer's
attention and MoE take their op-by-op paths (the separate kernels those ops chain). Per variant:
the median, quartiles and count of decode-step times (the rank's step: forward + greedy head);
the ratio of medians; and whether each variant's own greedy run gives the same tokens (bitwise).

    python benchmarks/bench_decode_ab.py                   # batch 1, 8 runs of 256 new tokens
    python benchmarks/bench_decode_ab.py --batch 32 --runs 4

Raw per-step times -> benchmarks/results/decode_ab.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_engine import engine_run, load_engine  # noqa: E402

log = logging.getLogger("bench_decode_ab")
VARIANTS = ("composite", "op_by_op")


def set_variant(model, variant: str) -> None:
    """op_by_op: every layer's attention and MoE report that the one-call path does not apply
    (an instance attribute over the method); composite: the methods as shipped."""
    for layer in model.layers:
        moe = layer.mlp if hasattr(type(layer.mlp), "_layer_args") else None
        if variant == "op_by_op":
            layer.self_attn._one_call = lambda *args: False
            if moe is not None:
                moe._layer_args = lambda x: None
        else:
            layer.self_attn.__dict__.pop("_one_call", None)
            if moe is not None:
                moe.__dict__.pop("_layer_args", None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_ab.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    benchlib.setup_env(args.threads)
    ckpt = benchlib.ensure_checkpoint("small")
    kv = args.batch * (args.prompt_len + args.new_tokens) + 1024
    eng = load_engine(ckpt, "bfloat16", prefix_cache=False, kv_tokens=kv)
    worker = eng.executor.worker
    model = worker.model
    prompts = benchlib.random_prompts(args.batch, args.prompt_len, args.prompt_len + 1, seed=0)

    tokens = {}
    for v in VARIANTS:  # each variant's own greedy tokens (and a warm-up)
        set_variant(model, v)
        tokens[v] = engine_run(eng, prompts, 32, f"tok-{v}")["tokens"]

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    state = {"i": 0}
    step = worker.step

    def alternating(work):
        v = VARIANTS[state["i"] % 2]
        state["i"] += 1
        set_variant(model, v)
        t0 = time.perf_counter()
        out = step(work)
        if work.seqs and all(len(s.token_ids) == 1 for s in work.seqs):  # decode steps only
            times[v].append((time.perf_counter() - t0) * 1e3)
        return out

    worker.step = alternating
    try:
        for r in range(args.runs):
            engine_run(eng, prompts, args.new_tokens, f"run{r}")
            state["i"] += 1  # the next run starts on the other variant
    finally:
        worker.step = step
        set_variant(model, "composite")
        eng.shutdown()

    med = {v: statistics.median(times[v]) for v in VARIANTS}
    for v in VARIANTS:
        q = statistics.quantiles(times[v], n=4)
        log.info("%-9s decode step median %.3f ms (q1 %.3f, q3 %.3f, %d steps)", v, med[v], q[0], q[2], len(times[v]))
    same = tokens["composite"] == tokens["op_by_op"]
    log.info("batch %d: composite / op_by_op speed %.3f (ratio of median step times); same tokens: %s",
             args.batch, med["op_by_op"] / med["composite"], same)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": args.batch, "times_ms": times, "same_tokens": same}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
