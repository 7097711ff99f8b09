"""expertmesh: serve DeepSeek-V3/R1-class MoE models on Ray with expert parallelism.

expertmesh.v1 is the public gRPC contract, expertmesh.cluster the control plane (config, engine,
scheduler, router, serving), expertmesh.actors the data plane (model, KV cache, rank workers).
"""

__version__ = "0.1.0"
