"""Shared pytest fixtures.

Checkpoints: seeded random DeepSeek-V3 checkpoints written once per session (see
expertmesh.cluster.devtools.checkpoints.make_checkpoint). Treat them as read-only: a test that damages a
checkpoint clones it first (hard links for shards — unlink, never rewrite a linked file in place).
"""
from __future__ import annotations

from pathlib import Path

import pytest

# ---- checkpoints (cluster/devtools/checkpoints.py) ---------------------------------------------------

TINY_FP8_OVERRIDES = {"hidden_size": 192, "moe_intermediate_size": 160}  # partial 128x128 blocks


def _make_ckpt(factory: pytest.TempPathFactory, name: str, **kwargs) -> Path:
    from expertmesh.cluster.devtools.checkpoints import make_checkpoint

    return make_checkpoint(factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny preset, bf16, seed 0: 3 layers (layer 0 dense), 16 experts top-4, hidden 64."""
    return _make_ckpt(tmp_path_factory, "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny, FP8 e4m3 + 128x128 scale_inv, hidden 192 / moe_intermediate 160 (partial edge blocks).
    transformers' own FP8 loading mis-dequantizes these: use load_hf_reference_model."""
    return _make_ckpt(tmp_path_factory, "tiny_fp8", preset="tiny", fp8=True, seed=0, overrides=TINY_FP8_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_fp8_aligned_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny, FP8, default dims (every weight one block): transformers can load it natively and it
    holds the same seed-0 weights as tiny_ckpt up to fp8 rounding."""
    return _make_ckpt(tmp_path_factory, "tiny_fp8_aligned", preset="tiny", fp8=True, seed=0)


@pytest.fixture(scope="session")
def tiny_noqlora_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny with q_lora_rank null: attention uses q_proj instead of q_a_proj/q_b_proj."""
    return _make_ckpt(tmp_path_factory, "tiny_noqlora", preset="tiny", seed=0, overrides={"q_lora_rank": None})


@pytest.fixture(scope="session")
def tiny_skewed_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny with an unbalanced gate: correction bias +1.0 on experts 0, 1, 2 (all in EP shard 0),
    so every token picks them for 3 of its 4 slots."""
    return _make_ckpt(tmp_path_factory, "tiny_skewed", preset="tiny", seed=0, gate_skew=1.0)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small preset (benchmarks), bf16: ~0.46 GB, ~6 s to write; only built when a test asks."""
    return _make_ckpt(tmp_path_factory, "small", preset="small", seed=0)


# ---- markers -----------------------------------------------------------------------------------

SLOW_FIXTURES = {"ray_cluster"}  # a test that needs Ray is slow by definition
# whole modules that start subprocesses or run the engine against transformers, seconds per test
SLOW_MODULES = {"test_main_job", "test_router_main", "test_import_boundaries", "test_engine",
                "test_model_reference", "test_router_cache"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` on every test that uses the session's Ray cluster or lives in a SLOW_MODULES file,
    so `pytest -m "not slow"` is the fast loop; CI runs everything."""
    for item in items:
        module = getattr(item, "module", None)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or (
                module is not None and module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)


# ---- Ray: one cluster per test session ----------------------------------------------------------

@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A 3-node Ray cluster on 127.0.0.1 (ray.cluster_utils.Cluster): a head with 3 CPUs and two
    workers with 1 CPU and fake GPUs `{"A100": 2}` each. Every Ray test shares it (ray.init costs
    seconds; one cluster per session keeps the suite inside its budget)."""
    import os

    from expertmesh.cluster.ray_cluster import local_env

    local_env()
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach Prometheus within ~1 s
    import tempfile

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="em-ray-", dir="/tmp"))  # short: socket paths
    import ray

    cluster = _start_cluster()
    ray.init(address=cluster.address, namespace="expertmesh")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _start_cluster(attempts: int = 3):
    """The session's cluster. Ray gives a raylet 30 s to register with the GCS (a constant in
    ray._private.node); on a loaded 2-core machine that has run out (CI saw every Ray test of a run
    error with "The current node timed out during startup"), so a start that times out is cleaned up
    (only the processes this one started: our children) and tried again."""
    import logging

    import psutil
    from ray.cluster_utils import Cluster

    for attempt in range(1, attempts + 1):
        before = {c.pid for c in psutil.Process().children(recursive=True)}
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
            for _ in range(2):
                cluster.add_node(num_cpus=1, resources={"A100": 2})
            cluster.wait_for_nodes()
            return cluster
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            logging.getLogger(__name__).warning("Ray cluster start %d timed out; trying again", attempt)
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    child.kill()
            psutil.wait_procs([c for c in psutil.Process().children(recursive=True) if c.pid not in before], timeout=10)
