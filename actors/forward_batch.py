"""What one forward step computes on one rank: new tokens of several sequences, packed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] new tokens of all sequences, concatenated
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] KV slot each new token is written to
    extend_lens: list[int]  # new tokens per sequence
    ctx_slots: list[torch.Tensor]  # per sequence: slots of its whole context (cached + new), in order
    decode_groups: list[list[int]] = field(default_factory=list)  # filled by prepare()

    @property
    def num_seqs(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @staticmethod
    def empty() -> "ForwardBatch":
        z = torch.zeros(0, dtype=torch.long)
        return ForwardBatch(z, z, z, [], [])

    def last_token_index(self) -> torch.Tensor:
        """Index in [T] of each sequence's last new token (whose logits are sampled)."""
        ends = torch.tensor(self.extend_lens, dtype=torch.long).cumsum(0) - 1
        return ends
