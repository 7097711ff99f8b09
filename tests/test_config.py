"""The deployment config refuses bad values with the key path and the YAML line, and the example
configs load."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from expertmesh.cluster.config import (
    ConfigError,
    DeployConfig,
    config_from_dict,
    load_config,
    load_yaml_with_lines,
    validate_against_model,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "configs").glob("*.yaml"))

BASE = """\
name: demo
model:
  checkpoint: ./ckpt/tiny
  generate_if_missing: {preset: tiny, seed: 0}
parallel:
  ep_size: 2
autoscaling:
  min_replicas: 1
  max_replicas: 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def refused(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.checkpoint == (tmp_path / "ckpt" / "tiny").resolve()
    assert cfg.model.served_model_name == "tiny"
    assert cfg.autoscaling.initial_replicas == 1
    assert cfg.router.host == "127.0.0.1" and cfg.router.grpc_port == 50051


def test_typo_key_names_key_and_line(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE.replace("  max_replicas: 2", "  max_replicas: 2\n  upscale_dealy_s: 3"))
    assert err.keys == ["autoscaling.upscale_dealy_s"]
    assert "cfg.yaml:10: autoscaling.upscale_dealy_s" in str(err)
    assert "unknown key" in str(err)


def test_typo_section_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE + "routr:\n  grpc_port: 1\n")
    assert err.keys == ["routr"] and ":10:" in str(err)


def test_wrong_type_names_key_and_line(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE.replace("ep_size: 2", "ep_size: two"))
    assert err.keys == ["parallel.ep_size"]
    assert "cfg.yaml:6: parallel.ep_size" in str(err) and "'two'" in str(err)


def test_quoted_number_is_a_wrong_type(tmp_path: Path) -> None:
    # strict types: "2" is not silently accepted where an integer belongs
    err = refused(tmp_path, BASE.replace("ep_size: 2", 'ep_size: "2"'))
    assert err.keys == ["parallel.ep_size"]


def test_ep_size_larger_than_experts(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE.replace("ep_size: 2", "ep_size: 32"))
    assert err.keys == ["parallel.ep_size"]
    assert "cfg.yaml:6" in str(err) and "larger than the model's 16 routed experts" in str(err)


def test_ep_size_not_dividing_experts(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE.replace("ep_size: 2", "ep_size: 3"))
    assert "does not divide the model's 16 routed experts" in str(err)


def test_ep_size_checked_against_existing_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt" / "tiny"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"n_routed_experts": 6}))
    err = refused(tmp_path, BASE.replace("ep_size: 2", "ep_size: 4"))
    assert "6 routed experts" in str(err) and err.keys == ["parallel.ep_size"]
    assert load_config(write(tmp_path, BASE.replace("ep_size: 2", "ep_size: 3"))).parallel.ep_size == 3


def test_ep_size_checked_against_declared_experts(tmp_path: Path) -> None:
    text = "model:\n  checkpoint: /nowhere/DeepSeek-R1\n  n_routed_experts: 256\nparallel:\n  ep_size: 48\n"
    err = refused(tmp_path, text)
    assert err.keys == ["parallel.ep_size"] and ":5:" in str(err)


def test_validate_against_model_helper(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE.replace("ep_size: 2", "ep_size: 8")))
    validate_against_model(cfg, 256)
    with pytest.raises(ConfigError, match="parallel.ep_size"):
        validate_against_model(cfg, 4)


def test_min_replicas_above_max(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE.replace("min_replicas: 1", "min_replicas: 3"))
    assert err.keys == ["autoscaling.min_replicas"]
    assert "cfg.yaml:8: autoscaling.min_replicas: must be <= max_replicas (2)" in str(err)


def test_initial_replicas_outside_range(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE + "  initial_replicas: 5\n")
    assert err.keys == ["autoscaling.initial_replicas"] and ":10:" in str(err)


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"parallel": {"accelerator": "cuda"}}, "parallel.gpus_per_rank"),
        ({"parallel": {"placement_strategy": "pack"}}, "parallel.placement_strategy"),
        ({"kv_cache": {"tokens_per_rank": 1000, "page_size": 64}}, "kv_cache.tokens_per_rank"),
        ({"scheduler": {"chunked_prefill_tokens": 10_000}}, "scheduler.chunked_prefill_tokens"),
        ({"router": {"http_port": 50051}}, "router.http_port"),
        ({"router": {"policy": "random"}}, "router.policy"),
        ({"router": {"auth": {"token_env": "not a name"}}}, "router.auth.token_env"),
        ({"name": "Expert_Mesh"}, "name"),
        ({"name": "x" * 48}, "name"),
        ({"model": {"checkpoint": "c", "dtype": "float16"}}, "model.dtype"),
        ({"model": {"checkpoint": "c", "generate_if_missing": {"preset": "huge"}}}, "model.generate_if_missing.preset"),
    ],
)
def test_bad_values_name_their_key(patch: dict, key: str) -> None:
    data = {"model": {"checkpoint": "c"}}
    for section, values in patch.items():
        data[section] = values if not isinstance(values, dict) else {**data.get(section, {}), **values}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.keys == [key], str(info.value)


def test_missing_model_section() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"name": "x"})
    assert info.value.keys == ["model"] and "required" in str(info.value)


def test_several_problems_reported_together(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE.replace("ep_size: 2", "ep_size: x").replace("name: demo", "name: Demo"))
    assert set(err.keys) == {"name", "parallel.ep_size"}


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE + "router: [unclosed\n")
    assert "not valid YAML" in str(err) and "cfg.yaml:" in str(err)


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, BASE + "  max_replicas: 4\n")
    assert err.keys == ["autoscaling.max_replicas"] and "cfg.yaml:10" in str(err) and "line 9" in str(err)


def test_yaml_line_index() -> None:
    _, lines = load_yaml_with_lines("a:\n  b: 1\n  c:\n    - x\n    - y: 2\n")
    assert lines[("a", "b")] == 2 and lines[("a", "c", 1)] == 5 and lines[("a", "c", 1, "y")] == 5


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    again = DeployConfig.model_validate(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_load_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    assert DeployConfig.model_validate(cfg.to_dict()) == cfg


def test_example_configs_present() -> None:
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "deepseek-r1-a100.yaml", "multinode-cpu.yaml"}


def test_demo_checkpoint_resolves_inside_repo() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.checkpoint == REPO / "checkpoints" / "tiny"
    assert cfg.router.host == "127.0.0.1" and cfg.ray.address is None


def test_r1_memory_arithmetic_matches_config() -> None:
    """The KV budget written in the R1 config's comments matches its tokens_per_rank."""
    cfg = load_config(REPO / "configs" / "deepseek-r1-a100.yaml")
    kv_bytes_per_token = (512 + 64) * 2 * 61
    assert kv_bytes_per_token == 70_272
    kv_gib = cfg.kv_cache.tokens_per_rank * kv_bytes_per_token / 2**30
    assert 29.5 < kv_gib < 30.5
    assert 256 % cfg.parallel.ep_size == 0 and cfg.parallel.ep_size == 32


def test_preset_expert_counts_match_the_generator() -> None:
    """config.py keeps its own copy (no torch import to load a config); it must not drift."""
    from expertmesh.cluster.devtools.checkpoints import PRESETS
    from expertmesh.cluster.config import PRESET_ROUTED_EXPERTS

    assert PRESET_ROUTED_EXPERTS == {name: p["n_routed_experts"] for name, p in PRESETS.items()}


def test_grafana_dashboard_plots_every_metric():
    import json
    from pathlib import Path

    from expertmesh.cluster.telemetry.metrics import METRIC_NAMES, RETRACTION_METRIC_NAMES, ROUTER_METRIC_NAMES

    dash = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    missing = [m for m in METRIC_NAMES + ROUTER_METRIC_NAMES + RETRACTION_METRIC_NAMES if f"ray_{m}" not in exprs]
    assert not missing, missing
