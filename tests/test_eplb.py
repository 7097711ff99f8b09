"""Issue 15: the expert load balancer as pure functions, the slot layout, the weight-move plan,
and the balancer's schedule (no Ray, no process group)."""
from __future__ import annotations

import random

import pytest
import torch

from expertmesh.actors.expert_mover import source_rank, transfers
from expertmesh.actors.model.experts import ExpertWeights
from expertmesh.actors.model.placement import LayerPlacement, PlacementError, check_slots, layer_placements
from expertmesh.actors.step import StepOutput
from expertmesh.cluster.engine import eplb
from expertmesh.cluster.engine.balancing import EplbConfig, ExpertBalancer, nodes_of


def test_balanced_packing_equal_counts_and_greedy_order():
    w = [9, 1, 8, 2, 7, 3, 6, 4]
    pack = eplb.balanced_packing(w, 2)
    assert sorted(pack.count(p) for p in range(2)) == [4, 4]
    loads = [sum(x for x, p in zip(w, pack) if p == q) for q in range(2)]
    assert loads == [20, 20]
    with pytest.raises(ValueError):
        eplb.balanced_packing([1, 2, 3], 2)


def test_replicate_gives_slots_to_the_heaviest_per_copy():
    slots, copies = eplb.replicate([10, 1, 6, 1], 7)
    assert slots[:4] == [0, 1, 2, 3]
    assert copies == [3, 1, 2, 1]  # 10 → 5 → (6) → 3.33: expert 0 twice, expert 2 once
    assert sorted(slots[4:]) == [0, 0, 2]


def test_place_layer_skewed_load_reaches_balance_with_redundancy():
    load = [100, 100, 100, 40] + [5] * 12  # three hot experts, as the skewed checkpoint routes
    flat = eplb.split_ranks(list(range(16)), 4)
    assert eplb.balancedness(load, flat) == pytest.approx((400 / 4) / 340)
    r0 = eplb.place_layer(load, 16, 4)
    r4 = eplb.place_layer(load, 20, 4)
    assert all(len(r) == 5 for r in r4) and [e for r in r4 for e in r].count(0) >= 2
    assert eplb.balancedness(load, r0) == pytest.approx(100 / 115)  # packing alone: the hot experts still weigh
    assert eplb.balancedness(load, r4) >= 0.95
    assert {e for r in r4 for e in r} == set(range(16))  # every expert keeps a slot


def test_hierarchical_keeps_groups_within_nodes():
    rng = random.Random(1)
    load = [rng.randint(1, 50) for _ in range(32)]
    ranks = eplb.place_layer(load, 40, 8, num_nodes=2, num_groups=8)
    assert [len(r) for r in ranks] == [5] * 8
    node_of_expert = {}
    for rank, experts in enumerate(ranks):
        for e in experts:
            node_of_expert.setdefault(e // 4, set()).add(rank // 4)  # group of 4 experts
    assert all(len(nodes) == 1 for nodes in node_of_expert.values())  # a group lives on one node
    assert eplb.balancedness(load, ranks) > 0.85
    # groups that do not split over the nodes: falls back to one global placement
    flat = eplb.place_layer(load, 40, 8, num_nodes=3, num_groups=8)
    assert flat == eplb.place_layer(load, 40, 8)


def test_keep_in_place_renumbers_ranks_to_move_less():
    old = [[0, 1], [2, 3], [4, 5]]
    new = [[4, 5], [0, 7], [2, 3]]
    assert eplb.keep_in_place(new, old) == [[0, 7], [2, 3], [4, 5]]


def test_rebalance_keeps_layers_without_load_and_every_expert():
    cur = [list(range(16)) + [0, 1, 2, 3]] * 2
    loads = [[0] * 16, [50, 50, 50, 10] + [2] * 12]
    out = eplb.rebalance(loads, cur, 4)
    assert out[0] == cur[0]
    assert len(out[1]) == 20 and set(out[1]) == set(range(16))


def test_slot_rule_and_placement_checks():
    check_slots(16, 4, 4)
    with pytest.raises(PlacementError, match=r"use redundant experts = 2"):
        check_slots(16, 1, 3)
    with pytest.raises(PlacementError, match="no slot"):
        LayerPlacement((0, 0, 1, 2), 2, 4)
    p = layer_placements(2, 16, 0, 4)[0]
    assert p.is_identity and p.rank_experts(1) == [4, 5, 6, 7]
    q = layer_placements(1, 16, 4, 4)[0]
    assert q.per_rank == 5 and q.copies()[:5] == [2, 2, 2, 2, 1]


def test_move_plan_is_consistent_and_prefers_local_copies():
    old = LayerPlacement(tuple(range(8)), 2, 8)
    new = LayerPlacement((0, 0, 1, 2, 3, 4, 5, 6, 7, 0), 2, 8)  # rank 0: 0 0 1 2 3; rank 1: 4 5 6 7 0
    assert source_rank(old, 0, 0) == 0 and source_rank(old, 0, 1) == 0
    assert transfers(old, new, 0, 1) == [0]  # rank 1 needs expert 0 from rank 0
    assert transfers(old, new, 1, 0) == []  # rank 0 already holds 0..3
    assert transfers(old, new, 0, 0) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_slot_roundtrip_through_packing(dtype):
    w = ExpertWeights(0, 3, 64, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        w.w13.copy_(torch.randn_like(w.w13))
        w.w2.copy_(torch.randn_like(w.w2))
    w13, w2 = w.w13.to(dtype), w.w2.to(dtype)
    w = ExpertWeights(0, 3, 64, 32)
    w.w13, w.w2 = torch.nn.Parameter(w13, requires_grad=False), torch.nn.Parameter(w2, requires_grad=False)
    rows = torch.stack([w.dense_slot(i) for i in range(3)])
    packed = w.prepack()
    assert torch.equal(torch.stack([w.dense_slot(i) for i in range(3)]), rows)  # unpacked == original
    # slot 0 received as raw bytes (as the mover sends it), slot 1 kept from the old slot 0
    wire = rows[2].view(torch.uint8).clone()
    again = ExpertWeights.assemble(w, [2, 0], [wire.view(dtype), 0])
    assert (again.packed is not None) == packed
    x = torch.randn(5, 64).to(dtype)
    assert torch.equal(again.grouped_ffn(x, [5, 0]), w.grouped_ffn(x, [0, 0, 5]))
    assert torch.equal(again.grouped_ffn(x, [0, 5]), w.grouped_ffn(x, [5, 0, 0]))


def _outputs(load_per_rank, rows_per_rank):
    return [StepOutput(rank=r, expert_load=load_per_rank[r], computed_rows=rows_per_rank[r])
            for r in range(len(load_per_rank))]


def test_balancer_schedule_stages_layer_by_layer_then_switches_once():
    cfg = EplbConfig(enabled=True, redundant_experts=4, interval_steps=4, check_every_steps=2, window_steps=8)
    b = ExpertBalancer(cfg, n_layers=2, n_experts=16, ep_size=4)
    cum = [[0] * 16, [0] * 16]
    seen = []
    for step in range(12):
        upd = b.next_update()
        seen.append(None if upd is None else (sorted(upd.stage), upd.commit))
        report = b.wants_load()
        for layer in range(2):
            for e, n in enumerate([40, 40, 40, 10] + [2] * 12):
                cum[layer][e] += n
        outs = _outputs([[row[:] for row in cum]] + [[[0] * 16] * 2] * 3, [[step, step]] * 4) if report else [StepOutput(rank=0)]
        b.after_step(outs, upd)
    staged = [s for s in seen if s]
    assert staged[:3] == [([0], False), ([1], False), ([], True)]  # a layer per step, then the switch alone
    assert b.stats.rebalances >= 1 and min(b.stats.balancedness_after) >= 0.95
    assert min(b.stats.balancedness_before) < 0.9


def test_nodes_of_counts_node_major_blocks():
    assert nodes_of([{"node_id": "a"}, {"node_id": "a"}, {"node_id": "b"}, {"node_id": "b"}]) == 2
    assert nodes_of([{"node_id": "a"}, {"node_id": "b"}, {"node_id": "a"}, {"node_id": "b"}]) == 1
    assert nodes_of([{"node": "local"}]) == 1


CONFIG = """\
name: demo
model:
  checkpoint: ./ckpt/tiny
  generate_if_missing: {preset: tiny, seed: 0}
parallel:
  ep_size: EP
eplb:
  enabled: true
  redundant_experts: R
  interval_steps: 50
"""


def test_config_section_and_the_slot_rule(tmp_path):
    from expertmesh.cluster.config import ConfigError, load_config
    from expertmesh.cluster.serve.replica import engine_config_from

    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.replace("EP", "3").replace("R", "2"))  # 16 + 2 slots over 3 ranks
    cfg = load_config(path)
    assert cfg.eplb.redundant_experts == 2 and cfg.eplb.interval_steps == 50
    eng = engine_config_from(cfg)
    assert eng.eplb.enabled and eng.eplb.redundant_experts == 2 and eng.eplb.interval_steps == 50
    path.write_text(CONFIG.replace("EP", "4").replace("R", "2"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.keys == ["eplb.redundant_experts"] and "e.g. 4" in str(info.value)
    assert "cfg.yaml:9" in str(info.value)


def test_grafana_plots_the_eplb_metrics():
    import json
    from pathlib import Path

    from expertmesh.cluster.telemetry.metrics import EPLB_METRIC_NAMES

    dash = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert not [m for m in EPLB_METRIC_NAMES if f"ray_{m}" not in exprs]


def test_status_line_shows_the_balancer():
    from expertmesh.cluster.serve.commands import eplb_line
    from expertmesh.cluster.engine.balancing import EplbStats

    s = EplbStats(redundant_slots=8, rebalances=3, last_duration_s=0.05, last_move_s=0.012, moved_experts=20,
                  balancedness_before=[0.61, 0.57], balancedness_after=[0.99, 0.98], balancedness=[0.95, 0.93])
    line = eplb_line(s.as_dict())
    assert "8 redundant slots, 3 rebalance(s)" in line and "[0.61, 0.57] -> [0.99, 0.98]" in line
    assert "[0.95, 0.93]" in line and "12.0 ms moving" in line


def test_generate_flags():
    from expertmesh.cluster.cli import build_parser

    args = build_parser().parse_args(["generate", "--checkpoint", "c", "--prompt-ids", "1,2", "--ep-size", "4",
                                      "--redundant-experts", "4", "--eplb-interval", "50"])
    assert (args.redundant_experts, args.eplb_interval) == (4, 50)


def test_a_failed_switch_step_counts_as_switched_a_failed_stage_step_abandons():
    cfg = EplbConfig(enabled=True, redundant_experts=4, interval_steps=2, check_every_steps=2, window_steps=8)
    load = [[[40, 40, 40, 10] + [2] * 12]]
    for fail_on_commit in (True, False):
        b = ExpertBalancer(cfg, n_layers=1, n_experts=16, ep_size=4)
        b.after_step([StepOutput(rank=0)], None)
        b.after_step(_outputs(load + [[[0] * 16]] * 3, [[0]] * 4), None)
        stage = b.next_update()
        assert stage is not None and not stage.commit
        old = [list(p) for p in b.placement]
        if fail_on_commit:
            b.after_step([StepOutput(rank=0)], stage)
            commit = b.next_update()
            assert commit.commit and not commit.stage
            b.failed_step(commit)
            assert b.placement != old and b.stats.rebalances == 1
        else:
            b.failed_step(stage)
            assert b.placement == old and b.next_update() is None and b.stats.rebalances == 0


def test_eplb_is_a_no_op_at_ep_size_1():
    from types import SimpleNamespace

    from expertmesh.cluster.engine.balancing import redundant_slots, with_balancer

    executor = object()
    cfg = EplbConfig(enabled=True, redundant_experts=4)
    model = SimpleNamespace(num_hidden_layers=3, is_moe_layer=lambda i: i > 0, n_routed_experts=16, n_group=4)
    assert with_balancer(executor, cfg, model, 1) is executor and redundant_slots(cfg, 1) == 0
    assert with_balancer(executor, EplbConfig(redundant_experts=4), model, 2) is executor  # off
    assert redundant_slots(EplbConfig(redundant_experts=4), 2) == 0
