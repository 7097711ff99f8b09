"""Command-line clients: `expertmesh chat` (interactive, streaming) and `expertmesh client generate`.

Both take argv and return an exit code; cluster/cli.py wires them as subcommands. Errors print
the gRPC status code and message on stderr and exit 1. The token comes from --token or the
EXPERTMESH_TOKEN environment variable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence, TextIO

import grpc

from expertmesh.cluster.router.client import Completion, GenerationClient

DIM, RESET = "\x1b[2m", "\x1b[0m"


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="router host:port (default %(default)s)")
    p.add_argument("--token", default=None, help="bearer token (default: $EXPERTMESH_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca-file", default=None, help="PEM root certificates for TLS (implies --tls)")
    p.add_argument("--timeout", type=float, default=None, help="deadline per request, seconds")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _client(args: argparse.Namespace) -> GenerationClient:
    roots = Path(args.ca_file).read_bytes() if args.ca_file else None
    return GenerationClient(args.address, token=args.token, tls=args.tls, root_certificates=roots, timeout=args.timeout)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop)


def _fail(exc: grpc.RpcError, err: TextIO) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=err)
    return 1


def client_generate_main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`expertmesh client generate --prompt TEXT [--max-tokens N] [--json]`."""
    out, err = out or sys.stdout, err or sys.stderr
    p = argparse.ArgumentParser(prog="expertmesh client generate", description="Stream one completion.")
    _connection_args(p)
    _sampling_args(p, max_tokens=None)
    p.add_argument("--prompt", required=True, help="prompt text (with --chat: the user message)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a chat message (chat template)")
    p.add_argument("--system", default=None, help="system message, with --chat")
    p.add_argument("--separate-reasoning", action="store_true", help="split <think> reasoning (raw prompts)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.add_argument("--request-id", default=None)
    args = p.parse_args(argv)
    result = Completion()
    try:
        with _client(args) as client:
            if args.chat:
                messages = ([{"role": "system", "content": args.system}] if args.system else [])
                messages.append({"role": "user", "content": args.prompt})
                stream = client.chat(messages, request_id=args.request_id, **_sampling(args))
            else:
                stream = client.generate(args.prompt, separate_reasoning=args.separate_reasoning,
                                         request_id=args.request_id, **_sampling(args))
            for m in stream:
                result.add(m)
                if not args.json:
                    if m.reasoning:
                        out.write(_dim(m.reasoning, out))
                    out.write(m.text)
                    out.flush()
    except grpc.RpcError as exc:
        return _fail(exc, err)
    if args.json:
        json.dump(vars(result), out, ensure_ascii=False)
    out.write("\n")
    return 0


def _dim(text: str, out: TextIO) -> str:
    return f"{DIM}{text}{RESET}" if getattr(out, "isatty", lambda: False)() else text


def chat_main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """`expertmesh chat`: a conversation on the terminal. Reasoning prints dimmed (or, when not a
    terminal, between [reasoning] and [/reasoning]); /reset clears the history, /exit or EOF quits,
    Ctrl-C stops the current answer."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    p = argparse.ArgumentParser(prog="expertmesh chat", description="Chat with the served model.")
    _connection_args(p)
    _sampling_args(p, max_tokens=1024)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--hide-reasoning", action="store_true")
    args = p.parse_args(argv)
    tty = getattr(out, "isatty", lambda: False)()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    with _client(args) as client:
        while True:
            if tty:
                out.write("> ")
                out.flush()
            line = stdin.readline()
            if not line:
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            answer, in_reasoning = [], False
            try:
                for m in client.chat(history, **_sampling(args)):
                    if m.reasoning and not args.hide_reasoning:
                        if not in_reasoning:
                            out.write(DIM if tty else "[reasoning] ")
                            in_reasoning = True
                        out.write(m.reasoning)
                    if m.text:
                        if in_reasoning:
                            out.write(RESET + "\n" if tty else " [/reasoning]\n")
                            in_reasoning = False
                        out.write(m.text)
                        answer.append(m.text)
                    out.flush()
            except KeyboardInterrupt:
                out.write("\n[stopped]")
            except grpc.RpcError as exc:
                history.pop()
                _fail(exc, err)
                continue
            if in_reasoning:
                out.write(RESET if tty else " [/reasoning]")
            out.write("\n")
            out.flush()
            history.append({"role": "assistant", "content": "".join(answer)})
