"""The router: the public gRPC API (expertmesh.v1.Generation) and the OpenAI-compatible HTTP API in
front of the engine replicas, which it discovers through a registry and picks with a routing policy.

One role per module: server (gRPC servicer and lifecycle), openai_http, frontend (validation, chat
template, tokens), dispatcher (replica call, retries, reasoning split), reasoning (the <think>
parser), policies (with approx_tree, its view of each replica's prefix cache), replicas, registry
(discovery), offload (tokenizing off the event loop), client and client_cli (auth is cluster/auth.py). It imports nothing of cluster/engine/, torch or SGLang:
the wire to the replica is cluster/wire.py.
"""
