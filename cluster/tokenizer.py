"""The checkpoint's tokenizer, loaded the one way the router and the engine both load it.

With a tokenizer.json (every DeepSeek-V3/R1 checkpoint has one) this is transformers'
PreTrainedTokenizerFast over it: the same tokens and chat template as AutoTokenizer, without
AutoTokenizer's import of the model-config machinery, which pulls in torch (the router's RSS went
from ~415 MB to ~170 MB). Other folders fall back to AutoTokenizer. transformers is imported
lazily: it takes seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
