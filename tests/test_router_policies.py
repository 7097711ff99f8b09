"""Routing policies on their own: which replica each rule picks, on SGLang's pool-less radix tree
(the ApproxPrefixTree) for the cache-aware one."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from expertmesh.cluster.router.config import RouterConfig
from expertmesh.cluster.router.policies import (CacheAwareConfig, CacheAwarePolicy, LeastLoadPolicy,
                                                RoundRobinPolicy, make_policy)


@dataclass
class Rep:
    replica_id: str
    load_score: int = 0
    kv_total_tokens: int = 0


def ids(tenant: int, n: int = 100, tail: int = 0) -> list[int]:
    return [1000 * (tenant + 1) + i for i in range(n)] + [7] * tail


def test_round_robin_cycles_in_id_order():
    pol, reps = RoundRobinPolicy(), [Rep("b"), Rep("a"), Rep("c")]
    assert [pol.select([1], reps).replica_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_picks_lowest_and_rotates_ties():
    pol = LeastLoadPolicy()
    assert pol.select([1], [Rep("a", 5), Rep("b", 2), Rep("c", 9)]).replica_id == "b"
    tied = [Rep("a", 1), Rep("b", 1), Rep("c", 4)]
    assert {pol.select([1], tied).replica_id for _ in range(4)} == {"a", "b"}


def test_cache_aware_follows_prefixes_and_spreads_new_ones():
    pol, reps = CacheAwarePolicy(), [Rep("a"), Rep("b")]
    first = {t: pol.select(ids(t), reps).replica_id for t in range(4)}
    assert sorted(first.values()) == ["a", "a", "b", "b"], "new prefixes go to the emptier tree"
    for t in range(4):  # same tenant, different question: same replica
        assert pol.select(ids(t, tail=20), reps).replica_id == first[t]
    assert pol.decisions == {"cache": 4, "balance": 0, "emptiest": 4}


def test_cache_aware_threshold():
    pol = CacheAwarePolicy(CacheAwareConfig(cache_threshold=0.5))
    reps = [Rep("a"), Rep("b")]
    home = pol.select(ids(0, 40), reps).replica_id
    # 40 of 100 tokens match (0.4 <= 0.5): not enough to follow the cache; goes to the emptier tree.
    other = pol.select(ids(0, 40) + [5] * 60, reps).replica_id
    assert other != home and pol.decisions["emptiest"] == 2


def test_cache_aware_load_override():
    cfg = CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    for (home_load, other_load), follows_cache in [((5, 0), False),  # gap 5 > 4 and 5 > 0 * 1.5: imbalanced
                                                    ((5, 4), True),  # gap 1: balanced
                                                    ((30, 25), True)]:  # gap 5 > 4 but 30 < 25 * 1.5
        pol = CacheAwarePolicy(cfg)
        a, b = Rep("a"), Rep("b")
        home = pol.select(ids(0), [a, b])
        other = b if home is a else a
        home.load_score, other.load_score = home_load, other_load
        chosen = pol.select(ids(0, tail=3), [a, b])
        assert (chosen is home) == follows_cache
        assert pol.decisions["balance"] == (0 if follows_cache else 1)


def test_cache_aware_tree_bounded_by_replica_kv_and_forgets_removed():
    pol = CacheAwarePolicy()
    reps = [Rep("a", kv_total_tokens=250)]
    for t in range(5):
        pol.select(ids(t), reps)
    tree = pol._trees["a"]
    assert tree.size <= 250 and tree.match_len(ids(4)) == 100 and tree.match_len(ids(0)) == 0
    pol.remove_replica("a")
    assert "a" not in pol._trees


def test_make_policy_and_config_validation():
    assert make_policy("round_robin").name == "round_robin"
    assert make_policy("cache_aware").name == "cache_aware"
    with pytest.raises(ValueError, match="policy"):
        make_policy("random")
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(policy="random")
    with pytest.raises(ValueError, match="tls_cert_file"):
        RouterConfig(tls_cert_file="c.pem")
    with pytest.raises(ValueError, match="cache_threshold"):
        RouterConfig(cache_aware={"cache_threshold": 2})
    with pytest.raises(ValueError, match="extra"):
        RouterConfig(grpc_prot=1)
