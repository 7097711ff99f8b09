"""Token sampling for a batch of running requests; runs inside the rank workers.

Pipeline per row (logits upcast to fp32 first):
  penalties (repetition over prompt+output, then frequency and presence over output)
  -> greedy rows: argmax (ties -> lowest id, as torch.argmax)
  -> other rows: / temperature -> top-k -> top-p -> min-p -> draw.

Draws use the exponential race (argmax of p_i / E_i with E_i ~ Exp(1)), which samples exactly
from p. A seeded request draws its noise from a generator seeded by mix(seed, tokens generated so
far), so its tokens do not depend on the other rows of the batch or its position in it; every
filtering step is also applied per row with only that row's parameters (sub-batches by feature,
stable sorts) so the row's probabilities are the same alone or in any batch.

Logprobs, when asked for, are the model's raw distribution: log_softmax of the fp32 logits before
penalties, temperature and filtering (vLLM's default `logprobs_mode="raw_logprobs"`; what OpenAI
reports is the model's log probability of the token, not that of the sampling distribution).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from expertmesh.actors.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, step: int) -> int:
    """Stable 63-bit seed for (request seed, step): splitmix64 finalizer, identical across
    processes and Python versions (unlike hash() of strings)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@dataclass
class SamplingState:
    """One per running request, kept by the rank worker across steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    # Penalty caches, built lazily on the logits' device and updated incrementally from
    # output_token_ids[_counted:], so whoever appends tokens (sampler or not) stays consistent.
    # _seen: bool [V], tokens of prompt + output; _counts: fp32 [V], counts over output only.
    _seen: torch.Tensor | None = field(default=None, init=False, repr=False)
    _counts: torch.Tensor | None = field(default=None, init=False, repr=False)
    _counted: int = field(default=0, init=False, repr=False)

    def penalty_tensors(self, vocab: int, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen mask over prompt+output, output token counts), brought up to date."""
        if self._seen is None or self._seen.device != device or self._seen.numel() != vocab:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self._counted = 0
            if self.prompt_token_ids:
                prompt = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
                self._seen[prompt] = True
        assert self._counts is not None
        new = self.output_token_ids[self._counted:]
        if new:
            idx = torch.tensor(new, dtype=torch.long, device=device)
            self._counts.index_add_(0, idx, torch.ones(len(new), device=device))
            self._seen[idx] = True
            self._counted = len(self.output_token_ids)
        return self._seen, self._counts


@dataclass
class SampledLogprob:
    """Same fields as cluster.engine.types.TokenLogprob (the data plane cannot import it)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n (id, logprob), best first


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[SampledLogprob | None]  # per row; None where params.logprobs == 0


_ARGMAX_BLOCK = 1024


def first_argmax(logits: torch.Tensor, kernel=None) -> torch.Tensor:
    """argmax over the last dim of [R, V] (ties -> lowest id), in two levels: the max of each block
    of 1024 (a plain vectorised reduction), then the first maximum inside the first winning block.
    Index-tracking reductions are not vectorised on CPU: max(dim).indices over a [32, 129280]
    bf16 batch took 2.8 ms here, this ~1.0 ms. Same result, NaN included (amax and max both
    propagate it)."""
    if kernel is not None and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16):
        return kernel.argmax_rows(logits)  # the CPU kernels' one-pass argmax (same answer)
    rows, vocab = logits.shape
    blk = _ARGMAX_BLOCK
    if vocab < 4 * blk or rows == 0:
        return logits.max(dim=-1).indices
    full = vocab // blk * blk
    block_max = logits[:, :full].reshape(rows, -1, blk).amax(dim=-1)
    if full < vocab:
        block_max = torch.cat([block_max, logits[:, full:].amax(dim=-1, keepdim=True)], dim=1)
    block = block_max.max(dim=-1).indices
    # past the end of a short last block, repeat its last element: a later copy of the maximum
    # can never be the first one
    cols = (block[:, None] * blk + torch.arange(blk, device=logits.device)).clamp_(max=vocab - 1)
    return block * blk + logits.gather(1, cols).max(dim=-1).indices


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """In place on fp32 [B, V]. Repetition (HF/vLLM): for tokens seen in prompt+output, positive
    logits are divided by the penalty and non-positive ones multiplied; then OpenAI frequency and
    presence: logit -= frequency * count + presence * (count > 0), counts over output only."""
    vocab = logits.shape[1]
    for row, state in enumerate(states):
        p = state.params
        if not p.needs_penalties:
            continue
        seen, counts = state.penalty_tensors(vocab, logits.device)
        x = logits[row]
        if p.repetition_penalty != 1.0:
            penalized = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x.copy_(torch.where(seen, penalized, x))
        if p.frequency_penalty != 0.0:
            x.sub_(counts * p.frequency_penalty)
        if p.presence_penalty != 0.0:
            x.sub_((counts > 0).to(torch.float32) * p.presence_penalty)


def apply_top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                      ) -> torch.Tensor:
    """Mask [R, V] logits to each row's top-k (ties with the k-th kept), then to the smallest
    nucleus of mass >= top_p (at least one token kept). top_k holds V for "off"; top_p 1.0.

    The reference: a stable full-vocabulary sort per row. apply_top_k_top_p gives the same result
    without it for almost every row and falls back to this one for the rest."""
    vocab = logits.shape[1]
    # Stable sort: tied values keep index order, so the result never depends on the batch.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False, stable=True)
    kth = sorted_logits.gather(1, (vocab - top_k.clamp(1, vocab)).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


# Fast path of apply_top_k_top_p. The reference keeps the token at ascending sorted position j iff
# cum[j] > 1 - top_p, cum being the fp32 cumsum of the fp32 softmax of the sorted row (or j is the
# last position). The fast path computes the same tail masses in float64 from the unsorted row and
# decides a token only when its tail mass is farther than _FAST_REL_TOL (relative) from the
# threshold; the reference's own rounding (mostly the fp32 sum inside its softmax) was measured
# below 1e-6 relative on CPU (tests/test_fast_topp.py checks the margin).
_FAST_REL_TOL = 1e-5
# On CUDA the reference's cumsum is an fp32 scan (CPU accumulates in float64): a looser margin
# there, and the fast path is off by default (a GPU sorts 129k floats in microseconds).
_FAST_REL_TOL_OTHER = 1e-3
_FAST_ABS_TOL = 1e-30
_FAST_BUCKETS = 4096  # value buckets per histogram level
_FAST_LEVELS = 3  # histogram levels before the band is sorted as it is
_FAST_BAND = 2048  # stop refining once at most this many tokens straddle the threshold
_FAST_TOPK = 1024  # top_k up to this: its k-th value by torch.topk, above it by kthvalue
_FAST_UNDERFLOW = -60.0  # top_p 1.0: every finite logit within this of the max has probability > 0
_FAST_MIN_VOCAB = 4096  # below it the sort is cheap
_FAST_DEFAULT = True  # module switch (benchmarks, tests): False sends every row to the reference


def _fast_row(x: torch.Tensor, k: int, thr: float, rel_tol: float) -> torch.Tensor | None:
    """apply_top_k_top_p_sorted of one fp32 row [V], or None where the fast path cannot be sure.
    thr is the reference's fp32 1 - top_p as a float.

    Tokens fall into value buckets (a histogram of their probability mass, float64); buckets whose
    whole mass range lies clearly below the threshold are dropped, those clearly above kept, and
    the tokens of the few buckets in between (the band) are refined the same way, then sorted
    stably as the reference sorts them and decided one by one."""
    vocab = x.numel()
    neg_inf = float("-inf")
    if k < vocab:
        if k <= _FAST_TOPK:
            kth = x.topk(k, sorted=True).values[-1]
        else:
            kth = x.kthvalue(vocab - k + 1).values
        x = x.masked_fill(x < kth, neg_inf)
    m = x.max()
    if not bool(torch.isfinite(m)):
        return None  # NaN or +inf logits: left to the reference
    if thr <= 0.0:  # top_p 1.0: the reference drops only tokens of probability exactly 0
        lowest = torch.where(x > neg_inf, x, m).min()
        return x if bool(lowest - m >= _FAST_UNDERFLOW) else None
    # fp32 as the reference's softmax computes them, clamped clear of the (slow) subnormals:
    # that adds under vocab * 1.6e-38 to the total mass, far below _FAST_ABS_TOL
    ev_all = torch.exp((x - m).clamp_(min=-87.0))
    total = float(ev_all.sum(dtype=torch.float64))
    target = thr * total  # tail masses below are in units of ev (not normalised)
    lo_tol = target * (1.0 - rel_tol) - _FAST_ABS_TOL * total
    hi_tol = target * (1.0 + rel_tol) + _FAST_ABS_TOL * total
    out = torch.full_like(x, neg_inf)
    vals, ev, ids = x, ev_all, None  # ids None: the whole row
    base = 0.0  # mass of the tokens below every token of vals
    nb = _FAST_BUCKETS
    for _ in range(_FAST_LEVELS):
        if vals.numel() <= _FAST_BAND:
            break
        vmax = vals.max()
        vmin = torch.where(vals > neg_inf, vals, vmax).min()
        span = float(vmax - vmin)
        if not span > 0.0:
            break
        # bucket 0 holds the highest values; monotone in the value, so ties share a bucket
        bucket = ((vmax - vals) * (nb / span)).clamp_(0, nb - 1).to(torch.long)
        mass = torch.zeros(nb, dtype=torch.float64, device=x.device)
        mass.index_add_(0, bucket, ev.to(torch.float64))
        upper = mass.flip(0).cumsum(0).flip(0) + base  # mass of the bucket and all below it
        lower = upper - mass  # mass strictly below the bucket
        undecided = ~((upper < lo_tol) | (lower > hi_tol))
        band_buckets = undecided.nonzero().squeeze(1).tolist()
        if not band_buckets:  # cannot happen with exact sums; be safe
            return None
        j0, j1 = band_buckets[0], band_buckets[-1]
        above = bucket < j0  # clearly kept
        if ids is None:
            out = torch.where(above, x, out)
        else:
            kept = ids[above]
            out[kept] = x[kept]
        sel = ((bucket <= j1) & ~above & (vals > neg_inf)).nonzero().squeeze(1)
        base = float(lower[j1])
        vals, ev = vals[sel], ev[sel]
        ids = sel if ids is None else ids[sel]
    if ids is None or vals.numel() > vocab // 4:
        return None  # could not narrow the row down (flat or tied): the full sort is as good
    # The band in the reference's order: ascending, ties by index (ids are increasing here).
    sv, order = torch.sort(vals, stable=True)
    cum = base + ev[order].to(torch.float64).cumsum(0)
    keep = cum > hi_tol
    drop = cum < lo_tol
    if sv.numel() and bool(sv[-1] == m):  # the band holds the row's top token: always kept
        keep[-1] = True
        drop[-1] = False
    if bool((~(keep | drop)).any()):
        return None  # a token's tail mass is within rounding distance of the threshold
    kept = ids[order[keep]]
    out[kept] = x[kept]
    return out


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      fast: bool | None = None) -> torch.Tensor:
    """Mask [R, V] logits to each row's top-k (ties with the k-th kept), then to the smallest
    nucleus of mass >= top_p (at least one token kept). top_k holds V for "off"; top_p 1.0.

    Equals apply_top_k_top_p_sorted bit for bit, without its full-vocabulary sort: per row, the
    k-th value comes from topk/kthvalue, the nucleus boundary from value histograms of float64
    probability mass, and only the few tokens around the boundary are sorted. A row where the
    boundary is within rounding distance of a token's tail mass goes to the reference (batched).
    fast: None (default) uses the fast path on CPU only; True forces it, False the reference."""
    rows, vocab = logits.shape
    cpu = logits.device.type == "cpu"
    if fast is None:
        fast = cpu and _FAST_DEFAULT
    if not fast or rows == 0 or vocab < _FAST_MIN_VOCAB or logits.dtype != torch.float32:
        return apply_top_k_top_p_sorted(logits, top_k, top_p)
    ks = top_k.clamp(1, vocab).tolist()
    thrs = (1.0 - top_p).tolist()  # the reference's threshold, exactly
    rel_tol = _FAST_REL_TOL if cpu else _FAST_REL_TOL_OTHER
    out = torch.empty_like(logits)
    slow: list[int] = []
    for r in range(rows):
        res = _fast_row(logits[r], int(ks[r]), float(thrs[r]), rel_tol)
        if res is None:
            slow.append(r)
        else:
            out[r] = res
    if slow:
        sidx = torch.tensor(slow, device=logits.device)
        out[sidx] = apply_top_k_top_p_sorted(logits[sidx], top_k[sidx], top_p[sidx])
    return out


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's max probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


class Sampler:
    """Stateless apart from the generator for unseeded rows; per-request state is passed in."""

    def __init__(self, seed: int | None = None):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # unseeded rows
        self._seeded: dict[torch.device, torch.Generator] = {}  # re-seeded per seeded row draw
        self.kernel = None  # the CPU kernels' ops (argmax_rows), set by the worker where they are built

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is not None:
                gen.manual_seed(self._seed)
            else:
                gen.seed()
            self._generators[device] = gen
        return gen

    def _seeded_generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._seeded.get(device)
        if gen is None:
            gen = self._seeded[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    @staticmethod
    def plain_greedy(states: list[SamplingState]) -> bool:
        """Every row greedy, with no penalties and no logprobs: its tokens are the logits' argmax
        alone (which the model may find without all the logits: model.greedy_tokens)."""
        return all(st.params.greedy and not st.params.needs_penalties and not st.params.logprobs for st in states)

    @staticmethod
    def take(token_ids: list[int], states: list[SamplingState]) -> SampleResult:
        """A plain-greedy batch's argmax tokens, appended to their states."""
        for state, tok in zip(states, token_ids):
            state.output_token_ids.append(tok)
        return SampleResult(token_ids=token_ids, logprobs=[None] * len(states))

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} states")
        batch = len(states)
        device = logits.device
        if self.plain_greedy(states):
            # the common greedy batch: argmax of the raw logits, no fp32 copy and no row gathers
            return self.take(first_argmax(logits, self.kernel).tolist(), states)
        # A copy, so penalties applied in place never touch the caller's tensor.
        logits = logits.to(torch.float32, copy=True)

        logprobs = self._logprobs_raw(logits, states)  # before anything modifies the logits
        apply_penalties(logits, states)

        chosen = torch.empty(batch, dtype=torch.long, device=device)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        rand = [i for i, s in enumerate(states) if not s.params.greedy]
        if greedy:
            gidx = torch.tensor(greedy, device=device)
            chosen[gidx] = first_argmax(logits[gidx], self.kernel)
        if rand:
            chosen[torch.tensor(rand, device=device)] = self._sample(logits, states, rand)

        token_ids = chosen.tolist()
        for state, tok in zip(states, token_ids):
            state.output_token_ids.append(tok)
        result_logprobs: list[SampledLogprob | None] = [None] * batch
        if logprobs is not None:
            rows, logp = logprobs
            n_max = max(states[r].params.logprobs for r in rows)
            top_vals, top_ids = logp.topk(n_max, dim=-1)
            chosen_lp = logp.gather(1, chosen[torch.tensor(rows, device=device)].unsqueeze(1))
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            chosen_lp = chosen_lp.squeeze(1).tolist()
            for j, r in enumerate(rows):
                n = states[r].params.logprobs
                result_logprobs[r] = SampledLogprob(
                    token_id=token_ids[r], logprob=chosen_lp[j],
                    top=list(zip(top_ids[j][:n], top_vals[j][:n])))
        return SampleResult(token_ids=token_ids, logprobs=result_logprobs)

    @staticmethod
    def _logprobs_raw(logits: torch.Tensor, states: list[SamplingState]
                      ) -> tuple[list[int], torch.Tensor] | None:
        rows = [i for i, s in enumerate(states) if s.params.logprobs > 0]
        if not rows:
            return None
        return rows, logits[torch.tensor(rows, device=logits.device)].log_softmax(dim=-1)

    def _sample(self, logits: torch.Tensor, states: list[SamplingState], rows: list[int]
                ) -> torch.Tensor:
        """Sampled token per row in `rows`; each filtering step runs only on the rows that use it."""
        device = logits.device
        params = [states[r].params for r in rows]
        x = logits[torch.tensor(rows, device=device)]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32,
                                   device=device)
        x.div_(temperature.unsqueeze(1))

        vocab = x.shape[1]
        sub = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        if sub:
            sidx = torch.tensor(sub, device=device)
            top_k = torch.tensor([params[j].top_k if params[j].top_k > 0 else vocab
                                  for j in sub], dtype=torch.long, device=device)
            top_p = torch.tensor([params[j].top_p for j in sub], dtype=torch.float32, device=device)
            x[sidx] = apply_top_k_top_p(x[sidx], top_k, top_p)
        sub = [j for j, p in enumerate(params) if p.min_p > 0.0]
        if sub:
            sidx = torch.tensor(sub, device=device)
            min_p = torch.tensor([params[j].min_p for j in sub], dtype=torch.float32, device=device)
            x[sidx] = apply_min_p(x[sidx], min_p)

        probs = x.softmax(dim=-1)
        # Exponential race; clamp so a zero draw cannot make 0/0 = NaN on a masked token.
        noise = torch.empty_like(probs)
        unseeded = [j for j, p in enumerate(params) if p.seed is None]
        if unseeded:
            uidx = torch.tensor(unseeded, device=device)
            noise[uidx] = torch.empty(len(unseeded), vocab, device=device).exponential_(
                generator=self._generator(device))
        for j, p in enumerate(params):
            if p.seed is not None:
                step = len(states[rows[j]].output_token_ids)
                gen = self._seeded_generator(device, mix_seed(p.seed, step))
                noise[j].exponential_(generator=gen)
        noise.clamp_(min=torch.finfo(torch.float32).tiny)
        return probs.div_(noise).argmax(dim=-1)
