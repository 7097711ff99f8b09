"""The control plane: it decides; actors/ computes.

- router/  the public gRPC and OpenAI-compatible HTTP APIs, replica discovery and routing (no torch)
- engine/  one engine replica: scheduler, radix cache, executor over the rank actors, EngineService
- wire.py  the router↔replica wire: every proto ↔ Python conversion, shared by both sides
- serve/   the Ray Serve application (thin shells over router/ and engine/) and up/status/down
- kube/    KubeRay manifests rendered from the config, and their offline validation
- devtools/ the seeded checkpoint generator and a synthetic engine (tests, demo, benchmarks)
- config.py, tokenizer.py, ray_cluster.py, local_head.py, auth.py, telemetry/, cli.py
"""
