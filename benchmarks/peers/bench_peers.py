"""expertmesh side by side with vLLM (CPU build) and llama.cpp on the same checkpoint and prompts.

Run with the PROJECT's python after benchmarks/peers/setup_peers.sh has made the peers' own venvs:

    .venv/bin/python benchmarks/peers/bench_peers.py            # full: 5 repeats (~25-35 min here)
    .venv/bin/python benchmarks/peers/bench_peers.py --quick    # 2 repeats, shorter EP phase
    .venv/bin/python benchmarks/peers/bench_peers.py --engines expertmesh llama --skip-ep --skip-exact

What it does, in ONE run on this (noisy, shared) machine:

1. Peers, bf16, 2 threads each. expertmesh runs in this process (the in-process engine at
   ep_size 1, radix prefix cache on, flushed before every run); every peer runs in its own
   subprocess under its own venv's python (peer_worker.py): vLLM CPU (in-process V1 engine,
   enforce_eager, prefix caching on and reset before every run, VLLM_MLA_DISABLE=1 because its CPU
   MLA kernel only takes a latent width of 576 and our presets have 144), llama.cpp with a BF16
   GGUF and, as an extra row, a Q8_0 GGUF (converted from the same checkpoint with the
   convert_hf_to_gguf.py vendored in llama-cpp-python's sdist). All engines stay loaded; on every
   repeat each workload runs once on each engine, the engines' order rotating from repeat to repeat.
   Greedy, EOS ignored (every request produces exactly its new tokens). Workloads:
     batch1   1 x (128 prompt + 128 new)
     batch32  32 x (128 prompt + 128 new)
     prefix   32 x (1000 shared + 32 own), 32 new, prefix caching on (a fresh prefix each repeat);
              llama.cpp has no automatic cross-request prefix cache: the prefix is decoded once
              and shared by hand (llama_memory_seq_cp into a unified KV cache)
   Output tokens/s = all output tokens / wall time of the whole request set (prefill included).
   Per-repeat ratios are ours / peer within the same repeat; medians over repeats.
2. expertmesh EP2 over EP1 on a local Ray cluster (127.0.0.1; both groups up at once, alternating):
   B x (128 prompt + --ep-new-tokens new) at B = 32 and 64; one torch thread and one CPU per
   rank actor in both groups (EP1 = one rank, EP2 = two ranks).
3. Token exactness in fp32 (reported, never failing): one short greedy prompt on transformers
   (the reference), expertmesh, vLLM and llama.cpp (F32 GGUF).

Results: benchmarks/results/peers.json (raw, per repeat), peers.md (tables), peers.png (plot).
Not a test, not for CI.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import benchlib  # noqa: E402
from benchlib import fmt, median  # noqa: E402

log = logging.getLogger("bench_peers")
VENVS = HERE / ".venvs"
WORK = HERE / ".work"
LLAMA_SRC = WORK / "llama-src"
LABELS = {"expertmesh": "expertmesh", "expertmesh-int8": "expertmesh int8 head", "vllm": "vLLM CPU",
          "llama": "llama.cpp BF16", "llama-q8": "llama.cpp Q8_0"}
PEERS = ("vllm", "llama", "llama-q8")
OURS = ("expertmesh", "expertmesh-int8")  # the optional int8 speed mode is compared with Q8_0


# -- checkpoints -> GGUF ------------------------------------------------------------------------------------
def gguf_for(ckpt: Path, outtype: str) -> Path:
    """The checkpoint converted by llama.cpp's own converter (cached next to the venvs)."""
    out = WORK / "gguf" / f"{ckpt.name}-{outtype}.gguf"
    stamp = out.with_suffix(".ok")
    src_stamp = (ckpt / "model.safetensors.index.json").stat().st_mtime_ns
    if out.exists() and stamp.exists() and stamp.read_text().strip() == str(src_stamp):
        return out
    conv = LLAMA_SRC / "convert_hf_to_gguf.py"
    if not conv.exists():
        raise FileNotFoundError(f"{conv} missing: run benchmarks/peers/setup_peers.sh llama")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    logf = WORK / f"convert-{outtype}.log"
    with open(logf, "w") as lf:
        r = subprocess.run([str(VENVS / "llama" / "bin" / "python"), str(conv), str(ckpt), "--outtype", outtype,
                            "--outfile", str(out)], stdout=lf, stderr=subprocess.STDOUT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                "PYTHONPATH": str(LLAMA_SRC / "gguf-py")})
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py {outtype} failed (rc {r.returncode}); see {logf}")
    stamp.write_text(str(src_stamp))
    log.info("converted %s -> %s (%.0fs, %.0f MB)", ckpt.name, out.name, time.perf_counter() - t0,
             out.stat().st_size / 1e6)
    return out


# -- peers in their own processes -----------------------------------------------------------------------------
class PeerProcess:
    """A peer_worker.py under a peer venv's python, spoken to over stdin/stdout (JSON lines)."""

    def __init__(self, name: str, engine: str, model: Path, dtype: str, threads: int, extra_env: dict,
                 extra_args: list[str] | None = None, kv_space_gib: int = 4):
        self.name = name
        py = VENVS / ("vllm" if engine == "vllm" else "llama") / "bin" / "python"
        if not py.exists():
            raise FileNotFoundError(f"{py} missing: run benchmarks/peers/setup_peers.sh")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        if engine == "vllm":
            env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(kv_space_gib),
                       VLLM_MLA_DISABLE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        env.update(extra_env)
        self.log_path = WORK / f"worker-{name}.log"
        self.log_file = open(self.log_path, "w")
        cmd = [str(py), str(HERE / "peer_worker.py"), engine, "--model", str(model), "--dtype", dtype,
               "--threads", str(threads)] + (extra_args or [])
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file,
                                     text=True, env=env, cwd=str(WORK))
        self.info = self._read()
        self.start_s = time.perf_counter() - t0
        if not self.info.get("ok"):
            self.close()
            raise RuntimeError(f"{name} failed to start: {self.info.get('error')} (log {self.log_path})")
        log.info("%s ready in %.0fs (pid %d)", name, self.start_s, self.proc.pid)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait(timeout=30)
            return {"ok": False, "error": f"worker exited (rc {rc}); see {self.log_path}"}
        return json.loads(line)

    def call(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        if not r.get("ok"):
            raise RuntimeError(f"{self.name}: {r.get('error')} (log {self.log_path})")
        return r

    def generate(self, prompts, new_tokens, shared_prefix=0) -> dict:
        return self.call(op="generate", prompts=prompts, new_tokens=new_tokens, shared_prefix=shared_prefix)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                pass
        if self.proc.poll() is None:  # only our own child, by its pid
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log_file.close()


def close_all(engines: dict) -> None:
    """Close every engine (best effort: one that failed must not keep the others open)."""
    for e in engines.values():
        try:
            e.close()
        except Exception:  # noqa: BLE001
            pass
    engines.clear()


# -- expertmesh, in this process -------------------------------------------------------------------------------
class ExpertmeshLocal:
    name = "expertmesh"

    def __init__(self, ckpt: Path, dtype: str, kv_tokens: int, int8_lm_head: bool = False, **engine_kw):
        from expertmesh.cluster.engine.engine import Engine, EngineConfig
        from expertmesh.cluster.engine.scheduler import SchedulerConfig

        t0 = time.perf_counter()
        sched = SchedulerConfig(kv_tokens_per_rank=kv_tokens, prefix_cache=True, max_running_requests=64)
        self.engine = Engine(EngineConfig(str(ckpt), dtype=dtype, ep_size=engine_kw.pop("ep_size", 1),
                                          scheduler=sched, int8_lm_head=int8_lm_head), **engine_kw)
        self.start_s = time.perf_counter() - t0
        self.n = 0

    def generate(self, prompts, new_tokens, shared_prefix=0) -> dict:
        from expertmesh.actors.sampling_params import SamplingParams
        from expertmesh.cluster.engine.types import EngineRequest

        self.engine.flush_cache()  # cold: only sharing within this request set counts
        gc.collect()
        self.n += 1
        reqs = [EngineRequest(f"r{self.n}-{i}", list(p),
                              SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
                for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        res = self.engine.run_to_completion(reqs)
        wall = time.perf_counter() - t0
        outs = [res[r.request_id] for r in reqs]
        bad = [o.error for o in outs if o.error]
        if bad:
            raise RuntimeError(f"expertmesh request failed: {bad[0]}")
        toks = [list(o.token_ids) for o in outs]
        return {"wall_s": wall, "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(map(len, toks)),
                "tokens": toks, "cached_tokens": sum(o.cached_tokens or 0 for o in outs)}

    def close(self) -> None:
        self.engine.shutdown()


# -- workloads --------------------------------------------------------------------------------------------------
def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, 120_000) for _ in range(n)]


def workloads(args, rep: int) -> list[dict]:
    """The three workloads of one repeat: fixed prompts for the batches, a fresh prefix for `prefix`."""
    rng = random.Random(args.seed)
    b1 = [_ids(rng, args.prompt_len)]
    b32 = [_ids(rng, args.prompt_len) for _ in range(args.batch)]
    prng = random.Random(args.seed + 1000 + rep)
    prefix = _ids(prng, args.prefix_len)
    px = [prefix + _ids(prng, args.prefix_own) for _ in range(args.prefix_requests)]
    return [
        {"name": "batch1", "title": f"batch 1: {args.prompt_len} prompt + {args.new_tokens} new",
         "prompts": b1, "new_tokens": args.new_tokens, "shared_prefix": 0},
        {"name": "batch32", "title": f"batch {args.batch}: {args.batch} x ({args.prompt_len} + {args.new_tokens} new)",
         "prompts": b32, "new_tokens": args.new_tokens, "shared_prefix": 0},
        {"name": "prefix", "title": f"shared prefix: {args.prefix_requests} x ({args.prefix_len} shared + "
                                    f"{args.prefix_own} own), {args.prefix_new_tokens} new, prefix cache on",
         "prompts": px, "new_tokens": args.prefix_new_tokens, "shared_prefix": args.prefix_len},
    ]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    eq_pos = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))
    total = sum(len(s) for s in a)
    return {"sequences_equal": sum(s == t for s, t in zip(a, b)), "of": len(a),
            "first_token_equal": sum(s[:1] == t[:1] for s, t in zip(a, b)),
            "positions_equal_frac": eq_pos / max(1, total)}


# -- phase 1: peers ---------------------------------------------------------------------------------------------
def start_engines(args, ckpt: Path, data: dict) -> dict:
    engines: dict = {}
    errors = data.setdefault("errors", {})
    for name in args.engines:
        try:
            if name in OURS:
                engines[name] = ExpertmeshLocal(ckpt, args.dtype, kv_tokens=args.kv_tokens,
                                                int8_lm_head=name == "expertmesh-int8")
            elif name == "vllm":
                engines[name] = PeerProcess(name, "vllm", ckpt, args.dtype, args.threads, {},
                                            ["--max-seqs", str(max(64, args.batch, args.prefix_requests))],
                                            kv_space_gib=args.vllm_kv_gib)
            elif name in ("llama", "llama-q8"):
                outtype = {"llama": {"bfloat16": "bf16", "float32": "f32"}[args.dtype], "llama-q8": "q8_0"}[name]
                # On AMX CPUs llama.cpp repacks Q8_0 into its AMX buffer type, and the deepseek2 graph
                # then aborts in the scheduler (ggml-backend.cpp: GGML_ASSERT(*cur_backend_id != -1),
                # llama-cpp-python 0.3.36): Q8_0 runs there without the extra buffer types.
                extra = ["--no-extra-bufts"] if outtype == "q8_0" and "amx_tile" in _cpu_flags() else []
                engines[name] = PeerProcess(name, "llama", gguf_for(ckpt, outtype), args.dtype, args.threads, {}, extra)
        except Exception as exc:
            log.error("%s unavailable: %s", name, exc)
            errors[name] = f"{type(exc).__name__}: {exc}"
    data["engines"] = {n: {"start_s": e.start_s, **getattr(e, "info", {})} for n, e in engines.items()}
    return engines


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def run_peers(args, engines: dict, data: dict) -> None:
    names = list(engines)
    # warm-up (not measured): each engine once on each workload's shape, small
    for w in workloads(args, -1):
        if w["name"] not in args.workloads:
            continue
        prompts = w["prompts"][:4]
        for n in names:
            try:
                engines[n].generate(prompts, 4, w["shared_prefix"])
            except Exception as exc:
                log.error("warm-up %s %s failed: %s", n, w["name"], exc)
    runs: dict = {}
    for rep in range(args.repeats):
        k = rep % len(names)
        order = names[k:] + names[:k]
        for w in workloads(args, rep):
            if w["name"] not in args.workloads:
                continue
            slot = runs.setdefault(w["name"], {"title": w["title"], "by_engine": {n: [] for n in names},
                                               "order": []})
            slot["order"].append(order)
            got = {}
            for n in order:
                time.sleep(args.pause)  # let the previous engine's spinning threads settle
                try:
                    r = engines[n].generate(w["prompts"], w["new_tokens"], w["shared_prefix"])
                except Exception as exc:
                    log.error("rep %d %s %s failed: %s", rep, w["name"], n, exc)
                    slot["by_engine"][n].append({"error": str(exc)})
                    continue
                expect = len(w["prompts"]) * w["new_tokens"]
                r["load_avg_1m_after"] = os.getloadavg()[0]  # how busy the shared machine was
                r["out_tok_s"] = r["output_tokens"] / r["wall_s"]
                r["exact_length"] = r["output_tokens"] == expect
                got[n] = r.pop("tokens")
                slot["by_engine"][n].append(r)
                log.info("rep %d %-8s %-14s %6.2fs %7.1f out tok/s%s", rep, w["name"], LABELS[n], r["wall_s"],
                         r["out_tok_s"], "" if r["exact_length"] else f"  (got {r['output_tokens']} of {expect})")
            if "expertmesh" in got:  # bf16 agreement with ours (informative only; bf16 diverges early)
                slot.setdefault("bf16_agreement_with_expertmesh", []).append(
                    {n: agreement(got["expertmesh"], t) for n, t in got.items() if n != "expertmesh"})
        write_partial(args, data, runs)
    data["peers"] = summarize(runs, names)


def summarize(runs: dict, names: list[str]) -> dict:
    out = {}
    for wname, slot in runs.items():
        be = slot["by_engine"]
        tps = {n: [r.get("out_tok_s") for r in be[n]] for n in names}
        row = {"title": slot["title"], "runs": be, "order": slot["order"], "out_tok_s": tps,
               "out_tok_s_median": {n: median(v) for n, v in tps.items()}, "ratio_per_repeat": {},
               "ratio_median": {}, "bf16_agreement_with_expertmesh": slot.get("bf16_agreement_with_expertmesh")}
        if "expertmesh" in names:
            for n in names:
                if n in OURS:
                    continue
                rs = [(a / b) if a and b else None for a, b in zip(tps["expertmesh"], tps[n])]
                row["ratio_per_repeat"][n] = rs
                row["ratio_median"][n] = median(rs)
        if "expertmesh-int8" in names:  # the int8 mode against llama.cpp's Q8_0 and our own bf16
            for n in ("llama-q8", "expertmesh"):
                if n in names:
                    rs = [(a / b) if a and b else None for a, b in zip(tps["expertmesh-int8"], tps[n])]
                    row["ratio_per_repeat"][f"int8/{n}"] = rs
                    row["ratio_median"][f"int8/{n}"] = median(rs)
        out[wname] = row
    return out


def write_partial(args, data, runs) -> None:
    data["peers_partial"] = runs
    benchlib.write_json(args.out / "peers.json", data)


# -- phase 2: EP2 / EP1 over Ray ----------------------------------------------------------------------------------
def run_ep(args, ckpt: Path, data: dict) -> None:
    from expertmesh.cluster.engine.executor import PlacementSpec
    from expertmesh.cluster.ray_cluster import local_env

    local_env()  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, GLOO_SOCKET_IFNAME=lo: loopback only
    # Ray starts workers at nice 15 by default: they would lose every contest for the cores
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("EXPERTMESH_TORCH_THREADS", "1")
    import ray

    kv = max(args.ep_batches) * (args.prompt_len + args.ep_new_tokens + 64)
    engines = {}
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace="expertmesh-bench-peers")
    ep: dict = {"config": {"prompt_len": args.prompt_len, "new_tokens": args.ep_new_tokens,
                           "batches": args.ep_batches, "repeats": args.ep_repeats, "cpus_per_rank": 1,
                           "torch_threads_per_rank": int(os.environ["EXPERTMESH_TORCH_THREADS"]),
                           "ray_node": None}}
    try:
        for e in (1, 2):
            engines[f"ep{e}"] = ExpertmeshLocal(ckpt, args.dtype, kv_tokens=kv, ep_size=e,
                                                placement=PlacementSpec(cpus_per_rank=1.0),
                                                group_name=f"bench-peers-ep{e}-{os.getpid()}")
        ep["startup_s"] = time.perf_counter() - t0
        ep["config"]["ray_node"] = ray.util.get_node_ip_address()
        rng = random.Random(args.seed + 7)
        prompts = {b: [_ids(rng, args.prompt_len) for _ in range(b)] for b in args.ep_batches}
        for key in engines:  # warm-up
            engines[key].generate(prompts[args.ep_batches[0]][:4], 4)
        rows = {b: {"ep1": [], "ep2": []} for b in args.ep_batches}
        for rep in range(args.ep_repeats):
            for b in args.ep_batches:
                order = ("ep1", "ep2") if rep % 2 == 0 else ("ep2", "ep1")
                for key in order:
                    time.sleep(args.pause)
                    r = engines[key].generate(prompts[b], args.ep_new_tokens)
                    r.pop("tokens")
                    r["load_avg_1m_after"] = os.getloadavg()[0]
                    r["out_tok_s"] = r["output_tokens"] / r["wall_s"]
                    rows[b][key].append(r)
                    log.info("EP rep %d batch %d %s %.2fs %.1f out tok/s", rep, b, key, r["wall_s"], r["out_tok_s"])
        ep["rows"] = {}
        for b, rr in rows.items():
            t1 = [r["out_tok_s"] for r in rr["ep1"]]
            t2 = [r["out_tok_s"] for r in rr["ep2"]]
            ratio = [y / x for x, y in zip(t1, t2)]
            ep["rows"][str(b)] = {"ep1": rr["ep1"], "ep2": rr["ep2"], "ep1_out_tok_s": t1, "ep2_out_tok_s": t2,
                                  "ep1_median": median(t1), "ep2_median": median(t2),
                                  "ep2_over_ep1_per_repeat": ratio, "ep2_over_ep1_median": median(ratio)}
    finally:
        close_all(engines)
        ray.shutdown()
    data["ep"] = ep


# -- phase 3: token exactness in fp32 -------------------------------------------------------------------------------
def run_exact(args, ckpt: Path, data: dict) -> None:
    import torch

    rng = random.Random(args.seed + 99)
    prompt = _ids(rng, args.exact_prompt_len)
    n = args.exact_new_tokens
    got: dict = {}
    errors: dict = {}
    try:
        from expertmesh.cluster.devtools.checkpoints import load_hf_reference_model

        hf = load_hf_reference_model(ckpt).float().eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 1
        with torch.inference_mode():
            out = hf.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None)
        got["transformers"] = out[0, len(prompt):].tolist()
        del hf
    except Exception as exc:
        errors["transformers"] = f"{type(exc).__name__}: {exc}"
    for name in args.engines:
        eng = None
        try:
            if name == "expertmesh":
                eng = ExpertmeshLocal(ckpt, "float32", kv_tokens=4096)
            elif name == "vllm":
                eng = PeerProcess("vllm-fp32", "vllm", ckpt, "float32", args.threads, {}, kv_space_gib=2)
            elif name == "llama":
                eng = PeerProcess("llama-f32", "llama", gguf_for(ckpt, "f32"), "float32", args.threads, {})
            else:
                continue  # Q8_0 is not an fp32 model
            got[name] = eng.generate([prompt], n)["tokens"][0]
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("exactness %s failed: %s", name, exc)
        finally:
            if eng is not None:
                eng.close()
        gc.collect()
    ref = got.get("transformers")
    res = {"prompt_len": len(prompt), "new_tokens": n, "tokens": got, "errors": errors, "vs_transformers": {}}
    for k, v in got.items():
        if ref is None or k == "transformers":
            continue
        first_diff = next((i for i, (a, b) in enumerate(zip(ref, v)) if a != b), None)
        res["vs_transformers"][k] = {"equal": v == ref, "first_divergence": first_diff}
    data["exact_fp32"] = res
    for k, v in res["vs_transformers"].items():
        log.info("fp32 tokens %s vs transformers: %s", k,
                 "EQUAL" if v["equal"] else f"differ from position {v['first_divergence']}")


# -- output -----------------------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    lines = []
    peers = data.get("peers") or {}
    names = [n for n in OURS + PEERS if any(n in r["out_tok_s"] for r in peers.values())]
    if peers:
        others = [n for n in names if n not in OURS]
        lines.append("| workload | " + " | ".join(LABELS[n] for n in names) + " | "
                     + " | ".join(f"ours / {LABELS[n]}" for n in others if "expertmesh" in names) + " |")
        lines.append("|---" * (len(names) + (len(others) if "expertmesh" in names else 0) + 1) + "|")
        for w, r in peers.items():
            cells = [fmt(r["out_tok_s_median"].get(n), 0) for n in names]
            rat = []
            if "expertmesh" in names:
                for n in others:
                    per = ", ".join(fmt(x) for x in r["ratio_per_repeat"].get(n, []))
                    rat.append(f"**{fmt(r['ratio_median'].get(n))}** ({per})")
            lines.append(f"| {r['title']} | " + " | ".join(cells) + " | " + " | ".join(rat) + " |")
        int8 = [k for k in ("int8/llama-q8", "int8/expertmesh") if any(k in r["ratio_median"] for r in peers.values())]
        if int8:
            lines.append("")
            lines.append("| workload (optional int8 lm_head mode) | "
                         + " | ".join(f"int8 head / {LABELS[k[5:]]}" for k in int8) + " |")
            lines.append("|---" * (len(int8) + 1) + "|")
            for r in peers.values():
                lines.append(f"| {r['title']} | " + " | ".join(
                    f"**{fmt(r['ratio_median'].get(k))}** ("
                    + ", ".join(fmt(x) for x in r["ratio_per_repeat"].get(k, [])) + ")" for k in int8) + " |")
        lines.append("")
        lines.append("Output tokens/s, medians over repeats; ratios: median (per repeat, same repeat's pair).")
        if "prefix" in peers:
            hits = {n: median([r.get("cached_tokens") for r in peers["prefix"]["runs"].get(n, []) if "error" not in r])
                    for n in names}
            lines.append("Prompt tokens served from a shared prefix (prefix workload, median): "
                         + ", ".join(f"{LABELS[n]} {fmt(v, 0)}" for n, v in hits.items()))
        loads = [r.get("load_avg_1m_after") for w in peers.values() for rs in w["runs"].values() for r in rs]
        loads = [x for x in loads if x is not None]
        if loads:
            lines.append(f"Machine load (1-min load average after each run, {os.cpu_count()} cores): median "
                         f"{fmt(median(loads), 1)}, max {fmt(max(loads), 1)}.")
    ep = data.get("ep")
    if ep and ep.get("rows"):
        lines.append("")
        lines.append(f"| expertmesh over Ray, {ep['config']['prompt_len']} prompt + {ep['config']['new_tokens']} new | "
                     "EP1 tok/s | EP2 tok/s | EP2 / EP1 |")
        lines.append("|---|---|---|---|")
        for b, r in ep["rows"].items():
            per = ", ".join(fmt(x) for x in r["ep2_over_ep1_per_repeat"])
            lines.append(f"| batch {b} | {fmt(r['ep1_median'], 0)} | {fmt(r['ep2_median'], 0)} | "
                         f"**{fmt(r['ep2_over_ep1_median'])}** ({per}) |")
    ex = data.get("exact_fp32")
    if ex:
        lines.append("")
        xl = {"expertmesh": "expertmesh", "vllm": "vLLM CPU", "llama": "llama.cpp (F32 GGUF)"}
        parts = [f"{xl.get(k, k)}: {'equal' if v['equal'] else 'differs from token ' + str(v['first_divergence'])}"
                 for k, v in ex["vs_transformers"].items()]
        parts += [f"{xl.get(k, k)}: error ({v[:120]})" for k, v in ex["errors"].items()]
        lines.append(f"fp32 greedy tokens ({ex['prompt_len']} prompt + {ex['new_tokens']} new) vs transformers: "
                     + "; ".join(parts))
    if data.get("errors"):
        lines.append("")
        lines.append("Unavailable: " + "; ".join(f"{k}: {v[:200]}" for k, v in data["errors"].items()))
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = data.get("peers") or {}
    ep = (data.get("ep") or {}).get("rows") or {}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    names = [n for n in OURS + PEERS if any(n in r["out_tok_s"] for r in peers.values())]
    ax = axes[0]
    wl = list(peers)
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(wl))],
               [peers[w]["out_tok_s_median"].get(n) or 0 for w in wl], width, label=LABELS[n])
    ax.set_xticks(range(len(wl)), wl)
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title(f"{data['config']['preset']}, {data['config']['dtype']}, {data['config']['threads']} threads")
    ax.legend(fontsize=8)
    ax = axes[1]
    for j, n in enumerate(x for x in names if x not in OURS):
        for k, w in enumerate(wl):
            rs = [r for r in peers[w]["ratio_per_repeat"].get(n, []) if r]
            ax.scatter([k + (j - 1) * 0.15] * len(rs), rs, s=18, color=f"C{j + 1}",
                       label=f"ours / {LABELS[n]}" if k == 0 else None)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(wl)), wl)
    ax.set_ylabel("expertmesh / peer, per repeat")
    ax.set_title("per-repeat ratios (same repeat)")
    ax.legend(fontsize=8)
    ax = axes[2]
    if ep:
        bs = list(ep)
        ax.bar([i - 0.2 for i in range(len(bs))], [ep[b]["ep1_median"] for b in bs], 0.4, label="EP1 (1 rank)")
        ax.bar([i + 0.2 for i in range(len(bs))], [ep[b]["ep2_median"] for b in bs], 0.4, label="EP2 (2 ranks)")
        for i, b in enumerate(bs):
            ax.text(i + 0.2, ep[b]["ep2_median"], f"{ep[b]['ep2_over_ep1_median']:.2f}x", ha="center", va="bottom")
        ax.set_xticks(range(len(bs)), [f"batch {b}" for b in bs])
        ax.set_ylabel("output tokens/s (median)")
        ax.set_title("expertmesh over Ray (1 thread per rank)")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 repeats, shorter EP phase")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (quick: 2)")
    ap.add_argument("--engines", nargs="+", default=[*OURS, *PEERS], choices=[*OURS, *PEERS])
    ap.add_argument("--workloads", nargs="+", default=["batch1", "batch32", "prefix"],
                    choices=["batch1", "batch32", "prefix"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: benchmarks/results/ckpt-<preset>")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefix-requests", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=1000)
    ap.add_argument("--prefix-own", type=int, default=32)
    ap.add_argument("--prefix-new-tokens", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=16384, help="expertmesh KV slots")
    ap.add_argument("--vllm-kv-gib", type=int, default=4)
    ap.add_argument("--ep-batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--ep-new-tokens", type=int, default=None, help="default 64 (quick: 32)")
    ap.add_argument("--ep-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--exact-prompt-len", type=int, default=16)
    ap.add_argument("--exact-new-tokens", type=int, default=24)
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between engines")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-ep", action="store_true")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=benchlib.RESULTS)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.ep_new_tokens = args.ep_new_tokens or (32 if args.quick else 64)
    args.ep_repeats = args.ep_repeats or args.repeats
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("expertmesh", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    benchlib.setup_env(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = (args.checkpoint or benchlib.ensure_checkpoint(args.preset)).resolve()
    data: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "machine": benchlib.machine_info(), "checkpoint": str(ckpt),
                  "notes": ["vLLM runs with VLLM_MLA_DISABLE=1: its CPU MLA kernel supports only a latent width of "
                            "576 (kv_lora_rank 512 + rope 64); our presets have 144 (non-absorbed attention path)",
                            "llama.cpp has no automatic cross-request prefix cache: the shared prefix is decoded "
                            "once and shared by hand with llama_memory_seq_cp (unified KV cache)",
                            "greedy, EOS ignored; output tok/s = output tokens / wall time incl. prefill"]}
    t_start = time.perf_counter()
    if not args.skip_peers:
        engines = start_engines(args, ckpt, data)
        try:
            run_peers(args, engines, data)
        finally:
            close_all(engines)
            gc.collect()
        data.pop("peers_partial", None)
        benchlib.write_json(args.out / "peers.json", data)
    if not args.skip_ep:
        try:
            run_ep(args, ckpt, data)
        except Exception as exc:
            log.exception("EP phase failed")
            data.setdefault("errors", {})["ep"] = f"{type(exc).__name__}: {exc}"
        benchlib.write_json(args.out / "peers.json", data)
    if not args.skip_exact:
        run_exact(args, ckpt, data)
    data["elapsed_s"] = time.perf_counter() - t_start
    md = markdown(data)
    benchlib.write_json(args.out / "peers.json", data)
    (args.out / "peers.md").write_text(md)
    try:
        plot(data, args.out / "peers.png")
    except Exception as exc:
        log.warning("plot failed: %s", exc)
    print(md)
    log.info("wrote %s, %s, %s (%.0fs)", args.out / "peers.json", args.out / "peers.md", args.out / "peers.png",
             data["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
