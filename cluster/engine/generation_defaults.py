"""What an unset sampling field means: the checkpoint's generation_config.json, then the config.

DeepSeek-R1 ships temperature 0.6 / top_p 0.95 and DeepSeek advises against greedy decoding for it
(it repeats); vLLM and SGLang apply a checkpoint's generation_config.json the same way. Only the
sampling fields a client would expect a model to choose are read (temperature, top_p, top_k); the
rest of that file is transformers' business.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from expertmesh.actors.sampling_params import SamplingParams

log = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    source: str = "built-in"  # where the values came from, for logs and status

    @classmethod
    def load(cls, checkpoint: str | Path, overrides: dict | None = None) -> "GenerationDefaults":
        """generation_config.json's values (when the file exists and samples), then `overrides`."""
        values: dict = {}
        source = "built-in"
        path = Path(checkpoint) / "generation_config.json"
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("ignoring %s: %s", path, exc)
                raw = {}
            if raw.get("do_sample", True) is False:
                values["temperature"] = 0.0  # the checkpoint asks for greedy decoding
            for name in FIELDS:
                if isinstance(raw.get(name), (int, float)) and not isinstance(raw.get(name), bool):
                    values[name] = raw[name]
            if values:
                source = str(path)
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
                source = "config" if source == "built-in" else f"{source} + config"
        if "top_k" in values:
            values["top_k"] = int(values["top_k"]) if values["top_k"] > 0 else -1  # HF: 0 = off
        if "temperature" in values:
            values["temperature"] = float(values["temperature"])
        if "top_p" in values:
            values["top_p"] = float(values["top_p"])
        defaults = cls(**values, source=source)
        defaults.apply(SamplingParams()).validate()  # a bad file or override fails here, by name
        return defaults

    def set_fields(self) -> dict:
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}

    def apply(self, params: SamplingParams) -> SamplingParams:
        """`params` with the defaults filled in (for building a request's parameters before its own)."""
        for name, value in self.set_fields().items():
            setattr(params, name, value)
        return params
