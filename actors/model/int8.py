"""An optional speed mode, off by default: the lm_head as a dynamic int8 linear on CPU (fbgemm).

At batch 1 the lm_head is a third of a decode step here: vocab x hidden bf16 weights read once per
token at the machine's memory bandwidth. Held as int8 (one scale per vocabulary row) it reads half
the bytes, and fbgemm's VNNI kernels multiply in int8 with int32 accumulation, which also helps
the compute-bound head of a large batch. fbgemm quantizes each call's activations to 8 bits as
well, as llama.cpp's Q8_0 does for its dot products; torch's weight-only int8 kernel
(`_weight_int8pack_mm`) measured slower than the oneDNN-packed bf16 head on this CPU, so this is
W8A8. oneDNN's quantized linear (`onednn.qlinear_pointwise`, u8 x s8) was measured too: as fast
at batch 1, 1.6x slower than fbgemm at batch 32. torch 2.13 marks the quantized-tensor API that
fbgemm's prepack takes as deprecated; `int8_available` says when it is gone. Logits move by about 1% (relative): tokens can differ from transformers', which is why it is
a named mode (`model.int8_lm_head`) and not a default.

fbgemm picks one activation range per call. Each row is scaled to max |x| = 1 and a row holding
1 and -1 is appended, so every call quantizes over the same range: a row's logits do not depend on
which other rows share its batch (greedy tokens are the same alone and batched).
"""
from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def int8_available(device: torch.device | str = "cpu") -> bool:
    """True where the dynamic int8 linear exists: CPU, with fbgemm (or its x86 wrapper) built in."""
    engines = torch.backends.quantized.supported_engines
    return (torch.device(device).type == "cpu" and ("fbgemm" in engines or "x86" in engines)
            and hasattr(torch, "quantize_per_channel") and hasattr(torch.ops.quantized, "linear_dynamic"))


@functools.lru_cache(maxsize=1)
def _has_vnni() -> bool:
    """AVX512-VNNI / AVX-VNNI accumulate u8 x s8 products straight into int32. Without them fbgemm
    sums pairs in int16, which can saturate at full 8-bit range, so activations get 7 bits there
    (`reduce_range`, what torch's dynamic quantization does by default)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


class Int8Linear(nn.Module):
    """A bias-free linear held as fbgemm-packed int8 weights with a per-output-row scale; returns
    fp32 (the logits the sampler reads)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if not int8_available(weight.device):
            raise ValueError("model.int8_lm_head is a CPU speed mode (fbgemm); this build or device has no "
                             "dynamic int8 linear: leave it off")
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated (see module doc)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.reduce_range = not _has_vnni()
        anchor = torch.zeros(1, self.in_features)
        anchor[0, 0], anchor[0, -1] = 1.0, -1.0
        self.register_buffer("anchor", anchor, persistent=False)

    @property
    def weight_bytes(self) -> int:
        """int8 weights plus their fp32 row scales (what the packed copy holds, to within offsets)."""
        return self.out_features * (self.in_features + 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, self.in_features).float()
        row_max = xf.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        y = torch.ops.quantized.linear_dynamic(torch.cat([xf / row_max, self.anchor]), self.packed,
                                               self.reduce_range)
        return (y[:-1] * row_max).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (fbgemm, dynamic)"
