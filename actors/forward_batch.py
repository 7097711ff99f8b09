"""What one forward step computes on one rank: new tokens of several sequences, packed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


MIN_SHARED_PREFIX = 64  # below this, attending a shared prefix separately costs more than it saves


def shared_prefix_len(ctx: list[torch.Tensor], minimum: int | None = None) -> int:
    """Length of the slot prefix common to every context (each keeps at least its last slot), or 0
    when there is one context or the common prefix is shorter than `minimum` (MIN_SHARED_PREFIX)."""
    minimum = MIN_SHARED_PREFIX if minimum is None else minimum
    if len(ctx) < 2:
        return 0
    limit = min(c.numel() for c in ctx) - 1
    if limit < minimum:
        return 0
    first = ctx[0][:limit]
    same = torch.ones(limit, dtype=torch.bool)
    for c in ctx[1:]:
        same &= c[:limit] == first
    n = limit if bool(same.all()) else int((~same).nonzero()[0])
    return n if n >= minimum else 0


@dataclass
class AttendPlan:
    """Every row of a step as the CPU MLA kernel (mla_attend) takes them: row r of sequence seq[r]
    sees `shared` followed by slots[seq[r], :lens[r]] (a prefill row its context up to itself)."""

    shared: torch.Tensor  # [P] slots every sequence's context starts with (may be empty)
    slots: torch.Tensor  # [B, L] each sequence's context after them, padded with slot 0
    seq: torch.Tensor  # [T]
    lens: torch.Tensor  # [T]


@dataclass
class DecodeRows:
    """A decode step in fixed shapes, as a captured graph reads it (actors/decode_graphs.py): B rows,
    one new token each, every context padded to W slots. Rows past the real ones are padding
    (`valid` False): token 0 at position 0, written to slot 0 (never handed out), attending slot 0."""

    input_ids: torch.Tensor  # [B]
    positions: torch.Tensor  # [B]
    out_slots: torch.Tensor  # [B] KV slot each new token is written to
    slots: torch.Tensor  # [B, W] each row's whole context, the new token's slot included; any slot past it
    lens: torch.Tensor  # [B] context length of each row (1 for padding)
    valid: torch.Tensor  # [B] True for real rows

    def pad(self) -> torch.Tensor:
        """[B, W] True past each row's context."""
        width = self.slots.shape[1]
        return torch.arange(width, device=self.slots.device).unsqueeze(0) >= self.lens.unsqueeze(1)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] new tokens of all sequences, concatenated
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] KV slot each new token is written to
    extend_lens: list[int]  # new tokens per sequence
    ctx_slots: list[torch.Tensor]  # per sequence: slots of its whole context (cached + new), in order
    # the same on the host where ctx_slots live on a GPU (the worker builds both): tables are built
    # from these without a device-to-host copy, and sync, per sequence; None: copied when needed
    ctx_host: list[torch.Tensor] | None = None
    # Built once per step by prepare(), shared by every layer:
    starts: list[int] = field(default_factory=list)  # first row of each sequence in [T]
    decode_seqs: list[int] = field(default_factory=list)  # sequences decoded together (one new token each)
    decode_rows: torch.Tensor | None = None  # their rows in [T]
    decode_slots: torch.Tensor | None = None  # [B, L] context slots after the shared prefix, padded with slot 0
    decode_pad: torch.Tensor | None = None  # [B, L] True where padded
    decode_lens: torch.Tensor | None = None  # [B] unpadded length of each decode_slots row
    # slots every decode sequence's context starts with (a radix-cache hit they all share), attended
    # once for the whole batch instead of gathered per sequence; empty when there is none
    decode_shared: torch.Tensor | None = None  # [P]
    # the same for the sequences prefilled in this step (several requests past one cached prompt):
    # its keys and values are expanded once per layer, not once per sequence
    extend_shared: torch.Tensor | None = None  # [P]
    _attend_plan: AttendPlan | None = field(default=None, repr=False)

    def prepare(self) -> "ForwardBatch":
        device = self.input_ids.device
        self.starts = [0]
        for n in self.extend_lens[:-1]:
            self.starts.append(self.starts[-1] + n)
        decode = [i for i, n in enumerate(self.extend_lens) if n == 1]
        if decode:
            ctx = [self.host_ctx()[i] for i in decode]
            shared = shared_prefix_len(ctx)
            lens = [c.numel() - shared for c in ctx]
            width = max(lens)
            table = torch.zeros(len(decode), width, dtype=torch.long)
            for row, c in enumerate(ctx):
                table[row, : lens[row]] = c[shared:]
            self.decode_seqs = decode
            self.decode_rows = torch.tensor([self.starts[i] for i in decode], dtype=torch.long, device=device)
            self.decode_slots = table.to(device)
            self.decode_lens = torch.tensor(lens, dtype=torch.long)
            self.decode_pad = (torch.arange(width).unsqueeze(0) >= self.decode_lens.unsqueeze(1)).to(device)
            self.decode_lens = self.decode_lens.to(device)
            self.decode_shared = ctx[0][:shared].to(device)
        extend = [self.host_ctx()[i] for i, n in enumerate(self.extend_lens) if n > 1]
        self.extend_shared = extend[0][: shared_prefix_len(extend)].to(device) if extend else None
        return self

    def host_ctx(self) -> list[torch.Tensor]:
        """ctx_slots on the host."""
        if self.ctx_host is None:
            self.ctx_host = [c.cpu() for c in self.ctx_slots]
        return self.ctx_host

    def attend_plan(self) -> AttendPlan:
        """All rows, decode and prefill, for one mla_attend call per layer; built on first use and
        shared by every layer of the step."""
        if self._attend_plan is None and self.decode_seqs and len(self.decode_seqs) == self.num_tokens:
            # pure decode: prepare() built these tables already
            self._attend_plan = AttendPlan(self.decode_shared, self.decode_slots,
                                           torch.arange(self.num_tokens, device=self.input_ids.device),
                                           self.decode_lens)
        if self._attend_plan is None:
            ctx = self.host_ctx()
            shared = shared_prefix_len(ctx)
            own = [c.numel() - shared for c in ctx]
            table = torch.zeros(len(ctx), max(own, default=0), dtype=torch.long)
            for row, c in enumerate(ctx):
                table[row, : own[row]] = c[shared:]
            counts = torch.tensor(self.extend_lens, dtype=torch.long)
            seq = torch.repeat_interleave(torch.arange(len(ctx)), counts)
            # row j of a sequence with n new tokens sees its own context up to its position + 1
            ends = torch.tensor(own, dtype=torch.long)
            first = torch.repeat_interleave(torch.tensor(self.starts, dtype=torch.long), counts)
            lens = ends[seq] - counts[seq] + (torch.arange(seq.numel()) - first) + 1
            device = self.input_ids.device
            self._attend_plan = AttendPlan(ctx[0][:shared].to(device) if ctx else table.new_zeros(0),
                                           table.to(device), seq.to(device), lens.to(device))
        return self._attend_plan

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
