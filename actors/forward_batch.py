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
    # Built once per step by prepare(), shared by every layer:
    starts: list[int] = field(default_factory=list)  # first row of each sequence in [T]
    decode_seqs: list[int] = field(default_factory=list)  # sequences decoded together (one new token each)
    decode_rows: torch.Tensor | None = None  # their rows in [T]
    decode_slots: torch.Tensor | None = None  # [B, L] context slots, padded with slot 0
    decode_pad: torch.Tensor | None = None  # [B, L] True where padded

    def prepare(self) -> "ForwardBatch":
        device = self.input_ids.device
        self.starts = [0]
        for n in self.extend_lens[:-1]:
            self.starts.append(self.starts[-1] + n)
        decode = [i for i, n in enumerate(self.extend_lens) if n == 1]
        if decode:
            lens = [self.ctx_slots[i].numel() for i in decode]
            width = max(lens)
            table = torch.zeros(len(decode), width, dtype=torch.long)
            for row, i in enumerate(decode):
                table[row, : lens[row]] = self.ctx_slots[i].cpu()
            self.decode_seqs = decode
            self.decode_rows = torch.tensor([self.starts[i] for i in decode], dtype=torch.long, device=device)
            self.decode_slots = table.to(device)
            self.decode_pad = (torch.arange(width).unsqueeze(0) >= torch.tensor(lens).unsqueeze(1)).to(device)
        return self

    @property
    def num_seqs(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "ForwardBatch":
        z = torch.zeros(0, dtype=torch.long, device=device)
        return ForwardBatch(z, z, z, [], []).prepare()

    def last_token_index(self) -> torch.Tensor:
        """Index in [T] of each sequence's last new token (whose logits are sampled)."""
        ends = torch.tensor(self.extend_lens, dtype=torch.long).cumsum(0) - 1
        return ends.to(self.input_ids.device)
