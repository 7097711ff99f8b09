"""The `expertmesh` command line: one subcommand per job, each a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from pathlib import Path

log = logging.getLogger("expertmesh")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids wants comma-separated integers, got {text!r}") from None


# -- make-checkpoint --------------------------------------------------------------------------------
def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from expertmesh.cluster.devtools.checkpoints import make_checkpoint

    path = make_checkpoint(args.dir, preset=args.preset, fp8=args.fp8, seed=args.seed,
                           overrides=dict(args.set or []), gate_skew=args.gate_skew)
    print(json.dumps({"checkpoint": str(path), "preset": args.preset, "fp8": args.fp8, "seed": args.seed}))
    return 0


# -- generate ----------------------------------------------------------------------------------------
def _sampling(args: argparse.Namespace):
    from expertmesh.actors.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=list(args.stop or []), stop_token_ids=list(args.stop_token_ids or []), ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from expertmesh.actors.sampling_params import InvalidRequestError
    from expertmesh.actors.model.placement import PlacementError
    from expertmesh.cluster.engine.balancing import EplbConfig
    from expertmesh.cluster.engine.engine import Engine, EngineConfig
    from expertmesh.cluster.engine.executor import PlacementSpec
    from expertmesh.cluster.engine.scheduler import SchedulerConfig
    from expertmesh.cluster.engine.types import EngineRequest

    if not args.prompt and not args.prompt_ids:
        print("error: give --prompt TEXT or --prompt-ids 1,2,3 (repeatable)", file=sys.stderr)
        return 2
    placement = None
    if args.ep_size > 1 or args.address:
        from expertmesh.cluster.ray_cluster import connect

        connect(args.address, num_cpus=max(2, args.ep_size))
        placement = PlacementSpec(strategy=args.placement, cpus_per_rank=args.cpus_per_rank)
    sched = SchedulerConfig(kv_tokens_per_rank=args.kv_tokens, page_size=args.page_size,
                            prefix_cache=not args.no_prefix_cache)
    if args.device == "cuda" and placement is not None:
        placement.gpus_per_rank = 1
    eplb = EplbConfig(enabled=bool(args.eplb_interval or args.redundant_experts),
                      redundant_experts=args.redundant_experts, interval_steps=args.eplb_interval or 3000,
                      check_every_steps=min(100, args.eplb_interval or 100))
    try:
        engine = Engine(EngineConfig(args.checkpoint, dtype=args.dtype, ep_size=args.ep_size, scheduler=sched,
                                     progress=sys.stderr.isatty(), device=args.device, eplb=eplb,
                                     keep_fp8=not args.dequantize_fp8, int8_lm_head=args.int8_lm_head,
                                     greedy_head_screen=args.greedy_head_screen, decode_graphs=args.decode_graphs),
                        placement=placement)
    except PlacementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        tok = engine.tokenizer
        prompts: list[tuple[str | None, list[int]]] = []
        for text in args.prompt or []:
            if args.chat:
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
                ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
            else:
                ids = tok(text)["input_ids"]
            prompts.append((text, list(ids)))
        prompts += [(None, ids) for ids in args.prompt_ids or []]
        try:
            params = _sampling(args)
            reqs = [EngineRequest(f"cli-{i}-{uuid.uuid4().hex[:6]}", ids, params) for i, (_, ids) in enumerate(prompts)]
            for r in reqs:
                engine.validate(r)
            results = engine.run_to_completion(reqs)
        except InvalidRequestError as exc:
            print(f"error: invalid request: {exc}", file=sys.stderr)
            return 2
        for (text, ids), req in zip(prompts, reqs):
            out = results[req.request_id]
            record = {
                "token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "cached_tokens": out.cached_tokens,
            }
            if out.logprobs:
                record["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in out.logprobs]
            if out.error:
                record["error"] = out.error
            if args.json:
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(out.text)
        if hasattr(engine.executor, "eplb_stats"):
            log.info("expert load balancing: %s", json.dumps(engine.executor.eplb_stats()))
        return 0
    finally:
        engine.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a seeded random DeepSeek-V3 checkpoint (hub layout)")
    mk.add_argument("dir")
    mk.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    mk.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights with 128x128 weight_scale_inv blocks")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--gate-skew", type=float, default=0.0, help="bias the gate so most tokens go to a few experts")
    mk.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE",
                    help="override a config.json key (JSON value), e.g. --set q_lora_rank=null")
    mk.set_defaults(func=cmd_make_checkpoint)

    g = sub.add_parser("generate", help="generate from a checkpoint (one continuous batch)")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--prompt-ids", type=_ids, action="append", help="comma-separated token ids (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the checkpoint's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append")
    g.add_argument("--stop-token-ids", type=_ids, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank (NCCL)")
    g.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (Ray actors)")
    g.add_argument("--dequantize-fp8", action="store_true",
                   help="FP8 checkpoints: dequantize to --dtype at load instead of keeping e4m3 weights resident")
    g.add_argument("--int8-lm-head", action="store_true",
                   help="optional speed mode (CPU): the lm_head in dynamic int8; logits move ~1%%, tokens may differ")
    g.add_argument("--no-greedy-head-screen", dest="greedy_head_screen", action="store_false",
                   help="CPU bf16: drop the lm_head's int8 screen for greedy rows (same tokens; saves 1 byte per head weight)")
    g.add_argument("--decode-graphs", choices=["auto", "off", "fx"], default="auto",
                   help="auto: decode steps replayed from CUDA graphs where the model allows (GPU); fx: recorded "
                        "with torch.fx on any device (a check of the capture, slower on CPU); off: eager")
    g.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")
    g.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    g.add_argument("--cpus-per-rank", type=float, default=0.5)
    g.add_argument("--kv-tokens", type=int, default=8192, help="KV slots per rank")
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--no-prefix-cache", action="store_true")
    g.add_argument("--redundant-experts", type=int, default=0, metavar="R",
                   help="EPLB: R redundant expert slots per MoE layer ((experts + R) %% ep-size == 0)")
    g.add_argument("--eplb-interval", type=int, default=0, metavar="STEPS",
                   help="EPLB: rebalance the experts over the ranks every STEPS steps (0: with --redundant-experts, 3000)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt, in order")
    g.set_defaults(func=cmd_generate)

    _add_optional_commands(sub)
    return p


# Subcommands whose modules parse their own argv (router clients, manifests, the Serve app).
PASSTHROUGH = {
    "chat": ("expertmesh.cluster.router.client_cli", "chat_main", "interactive streaming chat with a router"),
    "client": ("expertmesh.cluster.cli", "client_main", "gRPC client commands: generate"),
    "manifests": ("expertmesh.cluster.kube.manifests", "manifests_main", "render/validate KubeRay manifests"),
    "router": ("expertmesh.cluster.router.main", "router_main", "run a standalone router in front of given replicas"),
    "up": ("expertmesh.cluster.serve.commands", "up_main", "start the Serve application from a config"),
    "status": ("expertmesh.cluster.serve.commands", "status_main", "show replicas, ranks, queues, KV, expert load"),
    "down": ("expertmesh.cluster.serve.commands", "down_main", "stop the Serve application"),
}


def _add_optional_commands(sub) -> None:
    for name, (_, _, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)


def _run_passthrough(name: str, argv: list[str], verbose: bool) -> int:
    import importlib

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module, func, _ = PASSTHROUGH[name]
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def client_main(argv: list[str]) -> int:
    """`expertmesh client generate ...` (the verb leaves room for more client commands)."""
    from expertmesh.cluster.router.client_cli import client_generate_main

    if not argv or argv[0] != "generate":
        print("usage: expertmesh client generate --address HOST:PORT --prompt TEXT [...]", file=sys.stderr)
        return 2
    return client_generate_main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    rest = argv[1:] if verbose else argv
    if rest and rest[0] in PASSTHROUGH:
        return _run_passthrough(rest[0], rest[1:], verbose)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
