"""transformers' DeepseekV3ForCausalLM as the token reference (fp32, eager attention, greedy)."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

# Mixed lengths (1 to ~120 tokens), BOS-led and not, some sharing prefixes.
PROMPTS: list[list[int]] = [
    [0],
    [0, 5, 6, 7, 8, 9, 10, 11],
    [0, 100, 200, 300],
    list(range(20, 60)),
    [0] + [1000 + 37 * i for i in range(120)],
    [0, 128798, 44, 90210, 3],
    [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200],
    [5, 17, 93, 4001, 77777, 129000, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
]


@functools.lru_cache(maxsize=8)
def _model(path: str):
    from expertmesh.cluster.devtools.checkpoints import load_hf_reference_model

    return load_hf_reference_model(path)


def hf_greedy(ckpt: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt alone (no EOS stop: min_new_tokens = max)."""
    model = _model(str(ckpt))
    outs = []
    for p in prompts:
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None)
        outs.append(seq[0, len(p):].tolist())
    return outs


def hf_logits(ckpt: Path, prompt: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Last-position logits of a prefill in `dtype` (fp32 reference weights cast)."""
    import copy

    m = copy.deepcopy(_model(str(ckpt))).to(dtype)  # a copy: casting the cached model would round its weights
    for module in m.modules():  # the reference keeps its router in fp32 (_keep_in_fp32_modules_strict)
        if type(module).__name__ == "DeepseekV3TopkRouter":
            module.float()
    with torch.no_grad():
        return m(torch.tensor([prompt])).logits[0, -1].float()
