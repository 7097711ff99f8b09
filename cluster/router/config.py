"""The router's settings (the deployment YAML's `router:` section maps onto this)."""
from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from expertmesh.cluster.router.limits import Limits
from expertmesh.cluster.router.policies import CacheAwareConfig

LIMIT_KEYS = ("max_request_bytes", "max_prompt_bytes", "max_prompt_tokens", "max_messages", "max_request_id_chars")


class CacheAwareSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache_threshold: float = Field(0.3, ge=0.0, le=1.0)
    balance_abs_threshold: int = Field(64, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1.0)
    max_tree_tokens: int | None = Field(None, gt=0)

    def to_policy_config(self) -> CacheAwareConfig:
        return CacheAwareConfig(**self.model_dump())


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)  # 0: an ephemeral port
    http_port: int | None = Field(None, ge=0, le=65535)  # OpenAI-compatible HTTP; None: off
    policy: Literal["cache_aware", "least_load", "round_robin"] = "cache_aware"
    cache_aware: CacheAwareSettings = Field(default_factory=CacheAwareSettings)
    # Static replica addresses ("host:port" or "id=host:port"); empty: the Ray ReplicaRegistry of
    # application `app` in Ray namespace `ray_namespace` (only that app's replicas get traffic).
    replicas: list[str] = Field(default_factory=list)
    app: str = Field("expertmesh", min_length=1)
    ray_namespace: str = Field("expertmesh", min_length=1)
    registry_poll_s: float = Field(1.0, gt=0)
    probe_interval_s: float = Field(0.5, gt=0)
    max_attempts: int = Field(3, ge=1)  # replicas tried per request before giving up
    max_resumes: int = Field(3, ge=0)  # replica failures a request survives (resumed elsewhere each time)
    resume_wait_s: float = Field(60.0, ge=0)  # wait this long for a replica after one failed under a request
    request_timeout_s: float | None = Field(None, gt=0)  # default deadline when the client sets none
    auth_token: str | None = None  # bearer token for both APIs; None: auth off
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # set: clients need a certificate (mTLS)
    tokenizer_path: str | None = None  # None: the path the first replica reports
    startup_timeout_s: float = Field(60.0, gt=0)  # wait this long for a first replica
    # Request limits (cluster/router/limits.py); None: derived from the model's context length
    max_request_bytes: int | None = Field(None, gt=0)  # None: 16 bytes per token of context, at least 1 MiB
    max_prompt_bytes: int | None = Field(None, gt=0)  # prompt text before tokenizing; None: max_request_bytes
    max_prompt_tokens: int | None = Field(None, gt=0)  # None (or more): the context length less one
    max_messages: int | None = Field(None, gt=0)  # chat messages per request; None: 4096
    max_request_id_chars: int | None = Field(None, gt=0)  # x-request-id; None: 128

    def limits(self, context_length: int) -> Limits:
        return Limits.resolve(context_length, self.max_request_bytes, self.max_prompt_bytes, self.max_prompt_tokens,
                              self.max_messages, self.max_request_id_chars)

    @model_validator(mode="after")
    def _tls_pair(self) -> "RouterConfig":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @classmethod
    def from_deploy_section(cls, section: Any, **overrides: Any) -> "RouterConfig":
        """From the deployment YAML's `router:` section (cluster/config.py RouterSection): there
        http_port 0 means no HTTP server and the token lives in the environment variable auth.token_env."""
        token = None
        if getattr(section, "auth", None) is not None:
            token = os.environ.get(section.auth.token_env)
            if not token:
                raise ValueError(f"router.auth.token_env: environment variable {section.auth.token_env} is unset or empty")
        tls = getattr(section, "tls", None)
        values: dict[str, Any] = dict(
            host=section.host, grpc_port=section.grpc_port, http_port=section.http_port or None,
            policy=section.policy, auth_token=token,
            cache_aware=CacheAwareSettings(cache_threshold=section.cache_threshold,
                                           balance_abs_threshold=section.balance_abs_threshold,
                                           balance_rel_threshold=section.balance_rel_threshold),
            tls_cert_file=str(tls.cert_file) if tls else None, tls_key_file=str(tls.key_file) if tls else None,
            **{key: getattr(section, key, None) for key in LIMIT_KEYS},
        )
        values.update(overrides)
        return cls(**values)
