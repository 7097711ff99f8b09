"""One peer engine (vLLM CPU or llama.cpp) in its own process, driven by bench_peers.py.

Runs under the peer's OWN venv python (benchmarks/peers/.venvs/<peer>/bin/python), never the
project's. It loads the model once, then answers JSON requests, one per line on stdin, with one
JSON line each on the original stdout; everything the libraries print goes to stderr (the driver
keeps it in a log file).

    python peer_worker.py vllm  --model CKPT_DIR   --dtype bfloat16 --threads 2
    python peer_worker.py llama --model FILE.gguf  --threads 2

Requests:
    {"op": "generate", "prompts": [[ids...], ...], "new_tokens": N | [N per prompt] (vLLM), "shared_prefix": 0 | P}
        greedy, EOS ignored (exactly N new tokens per prompt); with shared_prefix = P the first P
        tokens of every prompt are the same and the engine may share them: vLLM through its
        automatic prefix cache (cleared before every request, so only sharing within the request
        counts), llama.cpp by hand (the prefix decoded once in sequence 0, then
        llama_memory_seq_cp to the others)
        -> {"wall_s", "prompt_tokens", "output_tokens", "tokens", "cached_tokens"}
    {"op": "info"} -> versions and settings
    {"op": "quit"}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# the protocol gets the real stdout; library chatter goes to stderr
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr


def reply(obj: dict) -> None:
    _PROTO.write(json.dumps(obj) + "\n")
    _PROTO.flush()


# -- vLLM -----------------------------------------------------------------------------------------------
class VllmPeer:
    def __init__(self, args):
        from vllm import LLM

        self.args = args
        t0 = time.perf_counter()
        self.llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, enable_prefix_caching=True,
                       max_model_len=args.max_model_len, max_num_seqs=args.max_seqs, seed=0,
                       skip_tokenizer_init=False)
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        import torch
        import vllm

        return {"engine": "vllm", "vllm": vllm.__version__, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "load_s": self.load_s,
                "env": {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS",
                                                       "VLLM_CPU_KVCACHE_SPACE", "VLLM_MLA_DISABLE",
                                                       "VLLM_CPU_OMP_THREADS_BIND")}}

    def generate(self, prompts, new_tokens, shared_prefix=0) -> dict:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # new_tokens: one count for all, or one per prompt (a workload whose outputs end at different lengths)
        counts = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
        sp = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True) for n in counts]
        self.llm.reset_prefix_cache()  # cold start: no hits from an earlier request's identical prompts
        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        t0 = time.perf_counter()
        outs = self.llm.generate(inputs, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        toks = [list(o.outputs[0].token_ids) for o in outs]
        cached = sum((getattr(o, "num_cached_tokens", None) or 0) for o in outs)
        return {"wall_s": wall, "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(map(len, toks)),
                "tokens": toks, "cached_tokens": cached}


# -- llama.cpp (llama-cpp-python's low-level bindings) ----------------------------------------------------
class LlamaPeer:
    def __init__(self, args):
        import llama_cpp as L

        self.L = L
        self.args = args
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        if args.no_extra_bufts:
            mp.use_extra_bufts = False
        t0 = time.perf_counter()
        self.model = L.llama_model_load_from_file(args.model.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {args.model}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.load_s = time.perf_counter() - t0
        self.contexts: dict = {}  # (n_seq, n_ctx, unified) -> (ctx, batch, cap)

    def info(self) -> dict:
        import llama_cpp as L

        sysinfo = L.llama_print_system_info()
        return {"engine": "llama.cpp", "llama_cpp_python": L.__version__, "model": self.args.model,
                "n_vocab": self.n_vocab, "load_s": self.load_s, "threads": self.args.threads,
                "system_info": sysinfo.decode() if isinstance(sysinfo, bytes) else str(sysinfo)}

    def _context(self, n_seq: int, n_ctx: int, unified: bool):
        L = self.L
        key = (n_seq, n_ctx, unified)
        if key not in self.contexts:
            # one context alive at a time (memory); contexts are cheap to make for this model
            for ctx, batch, _ in self.contexts.values():
                L.llama_batch_free(batch)
                L.llama_free(ctx)
            self.contexts.clear()
            cp = L.llama_context_default_params()
            cp.n_ctx = n_ctx
            cp.n_batch = self.args.n_batch
            cp.n_ubatch = min(self.args.n_ubatch, self.args.n_batch)
            cp.n_seq_max = n_seq
            cp.n_threads = self.args.threads
            cp.n_threads_batch = self.args.threads
            if hasattr(cp, "kv_unified"):
                cp.kv_unified = unified
            if hasattr(cp, "no_perf"):
                cp.no_perf = True
            ctx = L.llama_init_from_model(self.model, cp)
            if not ctx:
                raise RuntimeError(f"llama_init_from_model failed for {key}")
            cap = self.args.n_batch
            batch = L.llama_batch_init(cap, 0, max(1, n_seq))
            self.contexts[key] = (ctx, batch, cap)
        return self.contexts[key]

    def _decode(self, ctx, batch, cap, items) -> list[int]:
        """items: [(token, pos, seq, want_logits)] in order; decoded in chunks of the batch capacity.
        Returns the greedy next token of every item that wanted logits, in order."""
        import numpy as np

        L = self.L
        out: list[int] = []
        for start in range(0, len(items), cap):
            chunk = items[start:start + cap]
            n_out = 0
            for i, (tok, pos, seq, want) in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if want else 0
                n_out += 1 if want else 0
            batch.n_tokens = len(chunk)
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            if n_out:
                logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(n_out, self.n_vocab))
                out.extend(int(t) for t in logits.argmax(axis=1))
        return out

    def generate(self, prompts, new_tokens, shared_prefix=0) -> dict:
        L = self.L
        n = len(prompts)
        longest = max(map(len, prompts)) + new_tokens
        if shared_prefix:
            # prefix once + every sequence's own tail, in one unified cache (cells of the prefix
            # carry all the sequence ids: shared, not copied)
            need = shared_prefix + sum(len(p) - shared_prefix + new_tokens for p in prompts)
            unified = True
        else:
            need = n * longest
            unified = n == 1 or self.args.kv_unified
        n_ctx = ((need + 255) // 256 + 1) * 256
        if not unified:
            n_ctx = n * (((longest + 255) // 256) * 256)  # per-sequence streams of n_ctx / n_seq cells
        ctx, batch, cap = self._context(n, n_ctx, unified)
        mem = L.llama_get_memory(ctx)
        L.llama_memory_clear(mem, True)
        toks = [[] for _ in range(n)]
        t0 = time.perf_counter()
        if shared_prefix:
            pre = prompts[0][:shared_prefix]
            if any(p[:shared_prefix] != pre for p in prompts):
                raise ValueError("shared_prefix: prompts do not share it")
            # the last prefix token goes with the tails, so that the prefix decode needs no logits
            self._decode(ctx, batch, cap, [(t, i, 0, False) for i, t in enumerate(pre[:-1])])
            for s in range(1, n):
                L.llama_memory_seq_cp(mem, 0, s, -1, -1)
            items = []
            for s, p in enumerate(prompts):
                tail = p[shared_prefix - 1:]
                items += [(t, shared_prefix - 1 + j, s, j == len(tail) - 1) for j, t in enumerate(tail)]
        else:
            items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        nxt = self._decode(ctx, batch, cap, items)
        pos = [len(p) for p in prompts]
        for step in range(new_tokens):
            for s in range(n):
                toks[s].append(nxt[s])
            if step == new_tokens - 1:
                break
            nxt = self._decode(ctx, batch, cap, [(nxt[s], pos[s], s, True) for s in range(n)])
            pos = [x + 1 for x in pos]
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(map(len, toks)),
                "tokens": toks, "cached_tokens": (n - 1) * (shared_prefix - 1) if shared_prefix else 0,
                "n_ctx": n_ctx, "kv_unified": unified}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["vllm", "llama"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="llama.cpp: no extra buffer types (AMX / repacked weights)")
    ap.add_argument("--kv-unified", action="store_true", help="llama.cpp: one unified KV cache for batches too")
    args = ap.parse_args()
    try:
        peer = VllmPeer(args) if args.engine == "vllm" else LlamaPeer(args)
    except Exception as exc:
        traceback.print_exc()
        reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    reply({"ok": True, "ready": True, **peer.info()})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "quit":
                reply({"ok": True})
                break
            if op == "info":
                reply({"ok": True, **peer.info()})
            elif op == "generate":
                reply({"ok": True, **peer.generate(req["prompts"], req["new_tokens"], req.get("shared_prefix", 0))})
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
