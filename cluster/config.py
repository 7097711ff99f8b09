"""The deployment config: one YAML file that `expertmesh up`, the Serve application and the
Kubernetes renderer all read, so the local and the Kubernetes deployments cannot drift.

Every section is a pydantic model with extra="forbid" and strict types, so a typo'd key or a
string where a number belongs is refused at load time, with the key path and the YAML line in
the message (`configs/demo.yaml:14: autoscaling.min_replicas: ...`), instead of surfacing as a
confusing failure minutes later on a GPU node.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

log = logging.getLogger(__name__)

# Routed experts per checkpoint preset that `generate_if_missing` can build (kept in step with
# cluster/devtools/checkpoints.py), and DeepSeek-V3/R1's own count, for checking ep_size before any
# checkpoint exists.
PRESET_ROUTED_EXPERTS: dict[str, int] = {"tiny": 16, "small": 64}
DEEPSEEK_R1_ROUTED_EXPERTS = 256

# KubeRay's operator refuses RayService names that are not DNS-1035 labels or longer than 47
# characters (it appends a 6-character suffix for the RayCluster and "-serve-svc" for services).
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LEN = 47
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """A config value is invalid; the message names the key path and, when known, the line."""

    def __init__(self, problems: list[tuple[str, int | None, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        lines = []
        for key, line, msg in problems:
            where = source or "<config>"
            if line is not None:
                where = f"{where}:{line}"
            lines.append(f"{where}: {key or '<root>'}: {msg}")
        super().__init__("invalid expertmesh config\n  " + "\n  ".join(lines) if len(lines) > 1 else
                         "invalid expertmesh config: " + lines[0])

    @property
    def keys(self) -> list[str]:
        return [key for key, _, _ in self.problems]


def _field_error(key: str, message: str, value: Any) -> ValidationError:
    """A validation error located at `key` of the model being validated (pydantic nests it)."""
    return ValidationError.from_exception_data(
        "DeployConfig", [InitErrorDetails(type=PydanticCustomError("config", message), loc=(key,), input=value)]
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the config file's folder (passed in the context)."""
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if base is not None and not path.is_absolute():
        path = (Path(base) / path).resolve()
    return path


class GenerateSpec(_Section):
    """Build a seeded random checkpoint of this preset when `model.checkpoint` does not exist."""

    preset: Literal["tiny", "small"] = "tiny"
    seed: int = 0
    fp8: bool = False


class SamplingDefaults(_Section):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)


class ModelSection(_Section):
    checkpoint: Path = Field(strict=False)
    generate_if_missing: GenerateSpec | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    served_model_name: str | None = Field(None, min_length=1)
    # Expected routed experts: lets ep_size be checked where the checkpoint is not reachable
    # (rendering manifests on a laptop); must match config.json when that exists.
    n_routed_experts: int | None = Field(None, ge=1)
    # FP8 checkpoints: keep the e4m3 weights resident and dequantize per 128x128 block inside
    # the matmul (true), or dequantize to `dtype` at load (false: 2x the weight memory).
    keep_fp8: bool = True
    # Optional speed mode, off by default: the lm_head as a dynamic int8 linear on CPU (fbgemm),
    # half the bytes per token; logits move ~1% relative, so tokens can differ from transformers'.
    int8_lm_head: bool = False
    # CPU, bf16: an int8 copy of the lm_head beside it screens greedy rows' logits at batch 1-2, so
    # only a few are computed from the bf16 weights (same token; ~half the head's bytes read per
    # step). Costs 1 byte per head weight (+0.9 GB for DeepSeek-R1's head); false saves it.
    greedy_head_screen: bool = True
    # GPU decode steps replayed from captured CUDA graphs (actors/decode_graphs.py) where the model's
    # step takes fixed shapes (bf16 dense experts, ep_size 1, sm90 / sm100); elsewhere, and on CPU,
    # steps run eagerly and the reason is logged. false runs them eagerly everywhere.
    decode_graphs: bool = True
    # What an unset temperature / top_p / top_k means; unset keys fall back to the checkpoint's
    # generation_config.json (R1: temperature 0.6, top_p 0.95), then to 1.0 / 1.0 / off.
    sampling_defaults: "SamplingDefaults" = Field(default_factory=lambda: SamplingDefaults())

    @field_validator("checkpoint")
    @classmethod
    def _resolve_checkpoint(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @model_validator(mode="after")
    def _default_name(self) -> "ModelSection":
        if self.served_model_name is None:
            self.served_model_name = self.checkpoint.name or "model"
        return self


class ParallelSection(_Section):
    ep_size: int = Field(1, ge=1)
    accelerator: Literal["cpu", "cuda"] = "cpu"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    cpus_per_rank: float = Field(1.0, gt=0)
    gpus_per_rank: Literal[0, 1] = 0
    # CPUs of the engine (scheduler) process: bundle 0 of the replica's placement group.
    engine_cpus: float = Field(1.0, gt=0)
    # Ray accelerator type each rank needs (e.g. "A100": bundles ask for accelerator_type:A100).
    accelerator_type: str | None = Field(None, min_length=1)
    collective_timeout_s: float = Field(300.0, gt=0)
    # A rank that dies is replaced in place and the group re-formed (the survivors keep weights and
    # KV; running requests resume token-exact); false, or when that fails: the replica is replaced.
    rebuild_in_place: bool = True

    @model_validator(mode="after")
    def _accelerator_matches_gpus(self) -> "ParallelSection":
        if self.accelerator == "cuda" and self.gpus_per_rank != 1:
            raise _field_error("gpus_per_rank", "must be 1 when accelerator is 'cuda'", self.gpus_per_rank)
        if self.accelerator == "cpu" and self.gpus_per_rank != 0:
            raise _field_error("gpus_per_rank", "must be 0 when accelerator is 'cpu'", self.gpus_per_rank)
        return self


class EplbSection(_Section):
    """Online expert load balancing with redundant experts (expert parallelism only: a no-op at
    ep_size 1). See cluster/engine/balancing.py."""

    enabled: bool = False
    # Physical expert slots beyond n_routed_experts per MoE layer; (n_routed_experts + R) must
    # split evenly over ep_size ranks.
    redundant_experts: int = Field(0, ge=0)
    interval_steps: int = Field(3000, ge=1)  # rebalance at least this often (engine steps)
    window_steps: int = Field(1000, ge=1)  # the expert load looked at: about the last this many steps
    check_every_steps: int = Field(100, ge=1)  # how often the ranks' counts are read
    balancedness_threshold: float = Field(0.0, ge=0, le=1)  # rebalance early below this (0: off)
    layers_per_step: int = Field(1, ge=1)  # MoE layers whose weights move per step while staging
    min_gain: float = Field(0.05, ge=-1, le=1)  # apply a new layout only if balancedness gains this


class KVCacheSection(_Section):
    tokens_per_rank: int = Field(16384, ge=1)
    page_size: int = Field(16, ge=1)
    prefix_cache: bool = True

    @model_validator(mode="after")
    def _whole_pages(self) -> "KVCacheSection":
        if self.tokens_per_rank % self.page_size:
            raise _field_error(
                "tokens_per_rank",
                f"must be a multiple of page_size ({self.page_size}); got {self.tokens_per_rank}",
                self.tokens_per_rank,
            )
        return self


class SchedulerSection(_Section):
    max_running_requests: int = Field(64, ge=1)
    max_batch_tokens: int = Field(8192, ge=1)  # per-step token budget of a replica
    chunked_prefill_tokens: int = Field(2048, ge=1)
    max_waiting_requests: int = Field(256, ge=0)  # beyond this: RESOURCE_EXHAUSTED
    # "use": admit by the KV requests hold plus an estimate of their growth, retract (and resume
    # token-exact) when the pool runs short; "lifetime": reserve prompt + max_tokens up front.
    admission: Literal["use", "lifetime"] = "use"
    init_new_token_ratio: float = Field(0.7, ge=0.0, le=1.0)
    min_new_token_ratio: float = Field(0.1, ge=0.0, le=1.0)
    ratio_decay_steps: int = Field(600, ge=1)
    headroom_tokens: int = Field(0, ge=0)  # free KV per rank admission keeps beyond its estimate
    # An unset max_tokens: the rest of the context, at most this (DeepSeek's R1 API allows 32k).
    default_max_tokens: int = Field(32768, ge=1)

    @model_validator(mode="after")
    def _budgets(self) -> "SchedulerSection":
        if self.min_new_token_ratio > self.init_new_token_ratio:
            raise _field_error("min_new_token_ratio", f"must be <= init_new_token_ratio ({self.init_new_token_ratio}); "
                               f"got {self.min_new_token_ratio}", self.min_new_token_ratio)
        if self.chunked_prefill_tokens > self.max_batch_tokens:
            raise _field_error(
                "chunked_prefill_tokens",
                f"must be <= max_batch_tokens ({self.max_batch_tokens}); got {self.chunked_prefill_tokens}",
                self.chunked_prefill_tokens,
            )
        if self.max_batch_tokens < self.max_running_requests:
            raise _field_error(
                "max_batch_tokens",
                f"must be >= max_running_requests ({self.max_running_requests}) so every running "
                f"request can decode a token each step; got {self.max_batch_tokens}",
                self.max_batch_tokens,
            )
        return self


class TLSSpec(_Section):
    cert_file: Path = Field(strict=False)
    key_file: Path = Field(strict=False)

    @field_validator("cert_file", "key_file")
    @classmethod
    def _resolve_files(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)


class AuthSpec(_Section):
    """Bearer-token auth; the token itself stays out of the config, in this environment variable."""

    token_env: str = Field(pattern=ENV_NAME_PATTERN)


class RouterSection(_Section):
    host: str = Field("127.0.0.1", min_length=1)
    grpc_port: int = Field(50051, ge=1, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)  # 0: no HTTP server
    policy: Literal["cache_aware", "least_load", "round_robin"] = "cache_aware"
    cache_threshold: float = Field(0.5, ge=0, le=1)
    balance_abs_threshold: int = Field(32, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1)
    tls: TLSSpec | None = None
    auth: AuthSpec | None = None
    # Request limits (README "Security and ports"); unset: derived from the model's context length
    max_request_bytes: int | None = Field(None, gt=0)
    max_prompt_bytes: int | None = Field(None, gt=0)
    max_prompt_tokens: int | None = Field(None, gt=0)
    max_messages: int | None = Field(None, gt=0)
    max_request_id_chars: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _distinct_ports(self) -> "RouterSection":
        if self.http_port and self.http_port == self.grpc_port:
            raise _field_error("http_port", f"must differ from grpc_port ({self.grpc_port})", self.http_port)
        return self


class AutoscalingSection(_Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)  # default: min_replicas
    target_ongoing_requests: float = Field(16.0, gt=0)
    target_queue_depth: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingSection":
        if self.min_replicas > self.max_replicas:
            raise _field_error(
                "min_replicas", f"must be <= max_replicas ({self.max_replicas}); got {self.min_replicas}", self.min_replicas
            )
        if self.initial_replicas is None:
            self.initial_replicas = self.min_replicas
        elif not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise _field_error(
                "initial_replicas",
                f"must be between min_replicas ({self.min_replicas}) and max_replicas ({self.max_replicas}); "
                f"got {self.initial_replicas}",
                self.initial_replicas,
            )
        if self.look_back_period_s < self.metrics_interval_s:
            raise _field_error(
                "look_back_period_s",
                f"must be >= metrics_interval_s ({self.metrics_interval_s}); got {self.look_back_period_s}",
                self.look_back_period_s,
            )
        return self


class TelemetrySection(_Section):
    service_name: str = Field("expertmesh", min_length=1)
    otlp_endpoint: str | None = Field(None, min_length=1)  # else the standard OTEL_* variables decide
    trace_decode_every: int = Field(16, ge=1)  # one span per N decode steps
    metrics: bool = True


class RaySection(_Section):
    address: str | None = Field(None, min_length=1)  # None: an embedded local cluster on 127.0.0.1
    namespace: str = Field("expertmesh", min_length=1)
    # The embedded cluster's dashboard on 127.0.0.1 (token auth as Ray does it); null: off, 0: any free port
    dashboard_port: int | None = Field(8265, ge=0, le=65535)


class DeployConfig(_Section):
    """One expertmesh deployment."""

    name: str = "expertmesh"
    model: ModelSection
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    eplb: EplbSection = Field(default_factory=EplbSection)
    kv_cache: KVCacheSection = Field(default_factory=KVCacheSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    router: RouterSection = Field(default_factory=RouterSection)
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    ray: RaySection = Field(default_factory=RaySection)

    # Where the config came from, to cite lines in errors raised after loading.
    _source: str | None = PrivateAttr(None)
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not name_is_valid(value):
            raise ValueError(
                f"{value!r} is not a DNS-1035 label of at most {NAME_MAX_LEN} characters (lowercase letters, "
                "digits and '-', starting with a letter): it names the RayService and its Kubernetes services"
            )
        return value

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> "DeployConfig":
        if self.model.int8_lm_head and self.parallel.accelerator != "cpu":
            raise ValidationError.from_exception_data("DeployConfig", [InitErrorDetails(
                type=PydanticCustomError("config", "is a CPU speed mode (fbgemm's int8 linear); leave it false "
                                                   "when parallel.accelerator is 'cuda'"),
                loc=("model", "int8_lm_head"), input=True)])
        return self

    def __eq__(self, other: object) -> bool:
        # Compare the settings only, not where they were loaded from.
        return isinstance(other, DeployConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict; `DeployConfig.model_validate(cfg.to_dict()) == cfg`."""
        return self.model_dump(mode="json")

    def line_of(self, key: str) -> int | None:
        """The YAML line of a dotted key path (or of its nearest present parent)."""
        return _line_for(tuple(key.split(".")), self._lines)


# ---------------------------------------------------------------- YAML with line numbers


def _index_lines(node: yaml.Node, prefix: Loc, out: dict[Loc, int], dups: list[tuple[Loc, int, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            loc = prefix + (key,)
            line = key_node.start_mark.line + 1
            if loc in out:
                dups.append((loc, line, out[loc]))  # YAML would silently keep the last one
            out[loc] = line
            _index_lines(value_node, loc, out, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _index_lines(item, prefix + (i,), out, dups)


def load_yaml_with_lines(text: str, source: str | None = None) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML and return (data, {key path: line}) so errors can cite the line of a key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([("", line, f"not valid YAML: {getattr(exc, 'problem', None) or exc}")], source) from exc
    finally:
        loader.dispose()
    lines: dict[Loc, int] = {(): node.start_mark.line + 1}
    dups: list[tuple[Loc, int, int]] = []
    _index_lines(node, (), lines, dups)
    if dups:
        raise ConfigError([(_dotted(loc), line, f"duplicate key (also on line {first})") for loc, line, first in dups], source)
    return data, lines


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------- loading


def config_from_dict(
    data: Any, source: str | Path | None = None, *, lines: dict[Loc, int] | None = None, check_model: bool = True
) -> DeployConfig:
    """Validate a parsed config. `source` (the config file) anchors relative paths and messages;
    `check_model` also checks ep_size against the checkpoint (or the preset to be generated)."""
    src = str(source) if source is not None else None
    lines = lines or {}
    if not isinstance(data, dict):
        raise ConfigError([("", _line_for((), lines), f"expected a mapping of sections, got {type(data).__name__}")], src)
    base_dir = Path(source).resolve().parent if source is not None else None
    try:
        cfg = DeployConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not part of the config schema; a typo?)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            elif "input" in err and err["type"] != "config":
                msg = f"{msg} (got {err['input']!r})"
            problems.append((_dotted(loc), _line_for(loc, lines), msg))
        raise ConfigError(problems, src) from None
    cfg._source = src
    cfg._lines = dict(lines)
    if check_model:
        n_experts = expected_routed_experts(cfg)
        if n_experts is not None:
            validate_against_model(cfg, n_experts)
    return cfg


def load_config(path: str | Path) -> DeployConfig:
    """Load and validate a YAML config file; raise ConfigError naming the key and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([("", None, f"cannot read config: {exc.strerror or exc}")], str(path)) from exc
    data, lines = load_yaml_with_lines(text, str(path))
    return config_from_dict(data, path, lines=lines)


def _config_json(checkpoint: Path) -> dict[str, Any] | None:
    file = checkpoint / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", file, exc)
        return None


def expected_routed_experts(cfg: DeployConfig) -> int | None:
    """Routed experts of the model this config will serve, from the best source available:
    the checkpoint's config.json, else the preset it will generate, else `model.n_routed_experts`."""
    hf = _config_json(cfg.model.checkpoint)
    if hf is not None and hf.get("n_routed_experts"):
        found = int(hf["n_routed_experts"])
        declared = cfg.model.n_routed_experts
        if declared is not None and declared != found:
            raise ConfigError(
                [("model.n_routed_experts", cfg.line_of("model.n_routed_experts"),
                  f"says {declared} but {cfg.model.checkpoint / 'config.json'} has {found}")],
                cfg._source,
            )
        return found
    if hf is None and cfg.model.generate_if_missing is not None:
        return PRESET_ROUTED_EXPERTS[cfg.model.generate_if_missing.preset]
    return cfg.model.n_routed_experts


def validate_against_model(cfg: DeployConfig, n_routed_experts: int) -> None:
    """Refuse an ep_size that cannot split the model's routed experts evenly across ranks."""
    ep = cfg.parallel.ep_size
    redundant = cfg.eplb.redundant_experts if cfg.eplb.enabled and ep > 1 else 0
    if redundant:
        slots = n_routed_experts + redundant
        if slots % ep:
            fits = [r for r in range(redundant, redundant + ep) if (n_routed_experts + r) % ep == 0]
            raise ConfigError(
                [("eplb.redundant_experts", cfg.line_of("eplb.redundant_experts"),
                  f"{n_routed_experts} routed experts + {redundant} redundant = {slots} slots do not split over "
                  f"ep_size {ep}; (n_routed_experts + redundant_experts) % ep_size must be 0, e.g. {fits[0]}")],
                cfg._source,
            )
        return
    problem = None
    if ep > n_routed_experts:
        problem = f"{ep} is larger than the model's {n_routed_experts} routed experts"
    elif n_routed_experts % ep:
        problem = f"{ep} does not divide the model's {n_routed_experts} routed experts evenly"
    if problem:
        divisors = [d for d in range(1, n_routed_experts + 1) if n_routed_experts % d == 0]
        raise ConfigError(
            [("parallel.ep_size", cfg.line_of("parallel.ep_size"), f"{problem}; choose one of {divisors}")],
            cfg._source,
        )


def name_is_valid(name: str) -> bool:
    """DNS-1035 label of at most NAME_MAX_LEN characters (what KubeRay accepts for a RayService)."""
    return len(name) <= NAME_MAX_LEN and re.fullmatch(NAME_PATTERN, name) is not None
