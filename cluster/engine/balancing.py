"""Online expert load balancing for an expert-parallel group: when to rebalance, and the plan.

`ExpertBalancer` decides (cluster side); the ranks compute (actors/expert_mover.py). Every
`check_every_steps` steps one step asks the ranks for their cumulative expert counts (they ride
back on that step's outputs: no extra Ray call); the balancer keeps a sliding window of them and
rebalances every `interval_steps` steps, or sooner when the worst layer's balancedness falls below
`balancedness_threshold`. A new layout is staged `layers_per_step` MoE layers per step while the
old one keeps serving, and the last of those steps switches all of them over at once.
`BalancingExecutor` wraps the group's executor to carry those commands on the steps.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from expertmesh.actors.model.placement import layer_placements
from expertmesh.actors.step import PlacementUpdate, StepInput, StepOutput

from . import eplb

log = logging.getLogger(__name__)


@dataclass
class EplbConfig:
    """Expert-parallel load balancing (ignored at ep_size 1, where every expert is local)."""

    enabled: bool = False
    redundant_experts: int = 0  # physical slots beyond n_routed_experts, per MoE layer
    interval_steps: int = 3000  # rebalance at least this often (steps) while there is load
    window_steps: int = 1000  # the load the balancer looks at: about the last this many steps
    check_every_steps: int = 100  # read the ranks' counts this often (capped by interval_steps)
    balancedness_threshold: float = 0.0  # rebalance early when a layer drops below this (0: off)
    layers_per_step: int = 1  # MoE layers staged per step while a new layout moves in
    # apply a new layout only if the worst layer's balancedness gains this: a rebalance moves most
    # copies (measured: 80-120 of 128 at ep 2-4), not worth it for a point or two
    min_gain: float = 0.05

    @property
    def check_every(self) -> int:
        return max(1, min(self.check_every_steps, self.interval_steps))


@dataclass
class EplbStats:
    """What metrics and `status` show."""

    redundant_slots: int = 0
    rebalances: int = 0
    version: int = 0
    last_duration_s: float = 0.0  # first staged step to switch-over, wall time (serving continues)
    last_move_s: float = 0.0  # time the ranks spent moving weights, summed over those steps
    total_move_s: float = 0.0
    moved_experts: int = 0  # (layer, slot) copies that crossed ranks in the last rebalance
    balancedness_before: list[float] = field(default_factory=list)  # per layer, window load, old layout
    balancedness_after: list[float] = field(default_factory=list)  # same load, new layout
    balancedness: list[float] = field(default_factory=list)  # per layer, rows the ranks computed, last window

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


def _sum_ranks(per_rank: list[list[list[int]]]) -> list[list[int]]:
    return [[sum(r[layer][e] for r in per_rank) for e in range(len(per_rank[0][layer]))]
            for layer in range(len(per_rank[0]))]


class ExpertBalancer:
    def __init__(self, config: EplbConfig, n_layers: int, n_experts: int, ep_size: int,
                 num_nodes: int = 1, num_groups: int = 1):
        self.config = config
        self.ep_size, self.n_experts = ep_size, n_experts
        self.num_nodes, self.num_groups = num_nodes, num_groups
        self.placement = [list(p.slot_to_expert) for p in
                          layer_placements(n_layers, n_experts, config.redundant_experts, ep_size)]
        self.stats = EplbStats(redundant_slots=config.redundant_experts * n_layers)
        self.steps = 0
        self.last_rebalance_step = 0
        self._window: deque[tuple[int, list[list[int]]]] = deque()  # (step, summed cumulative load)
        self._rows: tuple[int, list[list[int]]] | None = None  # (step, [rank][layer] computed rows)
        self._plan: list[PlacementUpdate] = []
        self._target: list[list[int]] | None = None
        self._plan_started: float | None = None
        self._move_s = 0.0

    # -- what the executor asks before a step -------------------------------------------------
    def next_update(self) -> PlacementUpdate | None:
        return self._plan[0] if self._plan else None

    def wants_load(self) -> bool:
        nxt = self.next_update()
        return (self.steps + 1) % self.config.check_every == 0 or bool(nxt and nxt.commit)

    # -- what it reports after ----------------------------------------------------------------
    def after_step(self, outputs: list[StepOutput], update: PlacementUpdate | None,
                   started: float | None = None) -> None:
        """`started`: perf_counter() when this step was sent (the first staged step starts the clock)."""
        self.steps += 1
        if update is not None:
            self._plan.pop(0)
            if self._plan_started is None:
                self._plan_started = started if started is not None else time.perf_counter()
            self._move_s += max(o.timings.eplb for o in outputs)
            if update.commit:
                self._switched()
        if outputs and outputs[0].expert_load is not None:
            self._observe(outputs)

    def failed_step(self, update: PlacementUpdate | None) -> None:
        """The group failed in a step carrying `update`. A failed switch-over step still switched every
        rank that survived (the switch precedes the step's collectives) and replaced ranks load the
        live layout, so it counts as done; a failed staging step abandons the plan."""
        if update is not None and update.commit:
            self._plan.pop(0)
            self._switched()
        else:
            self.abort()

    def abort(self) -> None:
        """The group failed mid-plan: drop it (ranks discard what they staged at the next version)."""
        if self._plan:
            log.warning("expert rebalance v%d abandoned: the group failed", self._plan[0].version)
        self._plan, self._target, self._plan_started, self._move_s = [], None, None, 0.0

    def _switched(self) -> None:
        assert self._target is not None and self._plan_started is not None
        self.placement = self._target
        s = self.stats
        s.rebalances += 1
        s.last_duration_s = time.perf_counter() - self._plan_started
        s.last_move_s = self._move_s
        s.total_move_s += self._move_s
        self.last_rebalance_step = self.steps
        log.info("expert placement v%d live: balancedness %s -> %s, %d copies moved, %.1f ms moving over %.2f s",
                 s.version, [round(b, 3) for b in s.balancedness_before], [round(b, 3) for b in s.balancedness_after],
                 s.moved_experts, s.last_move_s * 1e3, s.last_duration_s)
        self._target, self._plan_started, self._move_s = None, None, 0.0

    def _observe(self, outputs: list[StepOutput]) -> None:
        load = _sum_ranks([o.expert_load for o in outputs])
        rows = [list(o.computed_rows or []) for o in outputs]
        if self._rows is not None:
            step0, before = self._rows
            if self.steps > step0:
                self.stats.balancedness = [
                    eplb.balancedness_of([rows[r][layer] - before[r][layer] for r in range(len(rows))])
                    for layer in range(len(rows[0]))]
        self._rows = (self.steps, rows)
        self._window.append((self.steps, load))
        while len(self._window) > 2 and self._window[1][0] <= self.steps - self.config.window_steps:
            self._window.popleft()
        if not self._plan:
            self._maybe_plan()

    def window_load(self) -> list[list[int]]:
        (_, old), (_, new) = self._window[0], self._window[-1]
        if len(self._window) == 1:
            return new
        return [[n - o for n, o in zip(nl, ol)] for nl, ol in zip(new, old)]

    def _maybe_plan(self) -> None:
        c = self.config
        load = self.window_load()
        if not any(map(any, load)):
            return
        current = [eplb.balancedness(l, eplb.split_ranks(p, self.ep_size)) for l, p in zip(load, self.placement)]
        due = self.steps - self.last_rebalance_step >= c.interval_steps
        low = c.balancedness_threshold > 0 and min(current) < c.balancedness_threshold
        if not (due or low):
            return
        self.last_rebalance_step = self.steps  # tried now, whether or not it moves anything
        target = eplb.rebalance(load, self.placement, self.ep_size, self.num_nodes, self.num_groups)
        after = [eplb.balancedness(l, eplb.split_ranks(p, self.ep_size)) for l, p in zip(load, target)]
        changed = [i for i, (a, b) in enumerate(zip(self.placement, target)) if a != b]
        if not changed or min(after) - min(current) < c.min_gain:
            log.debug("rebalance skipped: balancedness %s -> %s", current, after)
            return
        self.stats.version += 1
        v = self.stats.version
        self.stats.balancedness_before, self.stats.balancedness_after = current, after
        self.stats.moved_experts = sum(self._moves(self.placement[i], target[i]) for i in changed)
        per = max(1, c.layers_per_step)
        chunks = [changed[i:i + per] for i in range(0, len(changed), per)]
        # the switch rides alone on the step after the last staged one: it comes before any collective
        # of that step, so if the step fails every surviving rank has switched (see BalancingExecutor)
        self._plan = [PlacementUpdate(v, {i: target[i] for i in chunk}) for chunk in chunks]
        self._plan.append(PlacementUpdate(v, {}, commit=True))
        self._target = target

    def _moves(self, old: list[int], new: list[int]) -> int:
        o, n = eplb.split_ranks(old, self.ep_size), eplb.split_ranks(new, self.ep_size)
        return sum(1 for r in range(self.ep_size) for e in n[r] if e not in o[r])


def nodes_of(describe: list[dict]) -> int:
    """Nodes the group spans when its ranks sit node-major in equal blocks (what the hierarchical
    balancer assumes); 1 otherwise, which makes it balance over all ranks at once."""
    ids = [d.get("node_id", d.get("node", "local")) for d in describe]
    blocks = [ids[0]] if ids else []
    for a, b in zip(ids, ids[1:]):
        if a != b:
            blocks.append(b)
    if len(set(blocks)) != len(blocks) or len(ids) % len(blocks):
        return 1
    size = len(ids) // len(blocks)
    return len(blocks) if all(len(set(ids[i:i + size])) == 1 for i in range(0, len(ids), size)) else 1


class BalancingExecutor:
    """An executor (the Executor protocol) that carries the balancer's commands on each step and
    feeds it the outputs; anything else goes to the wrapped executor."""

    def __init__(self, inner: Any, balancer: ExpertBalancer):
        self.inner = inner
        self.balancer = balancer

    def __getattr__(self, name: str) -> Any:  # failed, rebuild, rebuilding, inject_fault, ...
        return getattr(self.inner, name)

    @property
    def ep_size(self) -> int:
        return self.inner.ep_size

    def step(self, inputs: list[StepInput]) -> list[StepOutput]:
        update = self.balancer.next_update()
        report = self.balancer.wants_load()
        for inp in inputs:
            inp.placement, inp.report_load = update, report
        started = time.perf_counter()
        try:
            outputs = self.inner.step(inputs)
        except Exception:
            self.balancer.failed_step(update)
            self._publish(update)
            raise
        self.balancer.after_step(outputs, update, started)
        self._publish(update)
        return outputs

    def _publish(self, update: PlacementUpdate | None) -> None:
        """After a switch-over, a rank replaced later (in-place rebuild) loads the live layout."""
        if update is not None and update.commit and hasattr(self.inner, "spec"):
            self.inner.spec = replace(self.inner.spec, expert_placement=[list(p) for p in self.balancer.placement])

    def describe(self) -> list[dict]:
        """The wrapped executor's rank info plus each rank's live slots ([MoE layer][slot] → expert)."""
        info = self.inner.describe()
        for d in info:
            d["slot_experts"] = [eplb.split_ranks(p, self.ep_size)[d["rank"]] for p in self.balancer.placement]
        return info

    def eplb_stats(self) -> dict[str, Any]:
        return self.balancer.stats.as_dict()


def redundant_slots(config: EplbConfig, ep_size: int) -> int:
    """Redundant experts in force: only with the balancer on and more than one rank."""
    return config.redundant_experts if config.enabled and ep_size > 1 else 0


def with_balancer(executor: Any, config: EplbConfig, model_config: Any, ep_size: int) -> Any:
    """`executor` wrapped in a BalancingExecutor when EPLB is on and the group has several ranks."""
    if not config.enabled or ep_size == 1:
        if config.enabled:
            log.info("EPLB is a no-op at ep_size 1: every expert is local")
        return executor
    n_layers = sum(1 for i in range(model_config.num_hidden_layers) if model_config.is_moe_layer(i))
    balancer = ExpertBalancer(config, n_layers, model_config.n_routed_experts, ep_size,
                              num_nodes=nodes_of(executor.describe()), num_groups=model_config.n_group or 1)
    return BalancingExecutor(executor, balancer)
