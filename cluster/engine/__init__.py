"""One engine replica: the scheduler (admission, batching, radix-cache bookkeeping), the executor
that drives the rank actors step by step, the engine loop, EngineService (its gRPC side of the
router↔replica hop) and ReplicaHost, which wires them with registration and drain."""
