"""Allocators: how many units each group loses for a parameter budget."""

import numpy as np
import pytest

from graphprune.allocation import allocate
from graphprune.errors import PruningError
from graphprune.graph.groups import Group


def group(gid, kind, units, cost, layer):
    return Group(id=gid, kind=kind, units=units, unit_size=1, slices=[], scope=f"layers.{layer}", layer=layer,
                 status="prunable", params_per_unit=cost)


@pytest.fixture
def groups():
    # two layers, each: 3 KV groups of cost 300 and 100 channels of cost 10 (1900 params per layer)
    return [group(f"kv{l}", "kv-group", 3, 300, l) for l in range(2)] + \
           [group(f"ch{l}", "channel", 100, 10, l) for l in range(2)]


def scores_for(groups, seed=0):
    rng = np.random.default_rng(seed)
    return {g.id: rng.random(g.units) for g in groups}


def removed_params(alloc, groups):
    return sum(len(alloc.removed[g.id]) * g.params_per_unit for g in groups)


def test_uniform_floors_heads_and_lets_channels_hit_the_target(groups):
    scores = scores_for(groups)
    alloc = allocate(groups, scores, method="uniform", sparsity=0.2, total_params=3800)
    assert [len(alloc.removed[f"kv{l}"]) for l in range(2)] == [0, 0]  # 0.2 * 3 = 0.6 -> 0
    assert [len(alloc.removed[f"ch{l}"]) for l in range(2)] == [38, 38]
    assert removed_params(alloc, groups) == 760
    # the lowest-scoring units go
    ch = scores["ch0"]
    assert set(alloc.removed["ch0"]) == set(np.argsort(ch)[:38])


def test_global_ranks_all_units_by_comparable_score_and_cost(groups):
    scores = {"kv0": np.array([0.0, 5.0, 5.0]), "kv1": np.array([5.0, 5.0, 5.0]),
              "ch0": np.full(100, 1.0), "ch1": np.full(100, 2.0)}
    alloc = allocate(groups, scores, method="global", sparsity=0.2, total_params=3800, comparable=scores)
    assert alloc.removed["kv0"].tolist() == [0]  # the one weak KV group goes first
    assert len(alloc.removed["ch0"]) == 46 and len(alloc.removed["ch1"]) == 0
    assert abs(removed_params(alloc, groups) - 760) <= 10


def test_global_never_removes_the_last_unit_and_says_so():
    gs = [group("a", "channel", 4, 10, 0), group("b", "channel", 100, 10, 1)]
    scores = {"a": np.zeros(4), "b": np.ones(100)}
    alloc = allocate(gs, scores, method="global", sparsity=0.5, total_params=1040, comparable=scores)
    assert len(alloc.removed["a"]) == 3 and "a" in alloc.floored


def test_round_to_keeps_channel_counts_a_multiple(groups):
    alloc = allocate(groups, scores_for(groups), method="uniform", sparsity=0.2, total_params=3800, round_to=8)
    assert all((100 - len(alloc.removed[f"ch{l}"])) % 8 == 0 for l in range(2))


def test_a_budget_larger_than_what_can_go_is_refused(groups):
    with pytest.raises(PruningError, match="lower --sparsity"):
        allocate(groups, scores_for(groups), method="global", sparsity=0.99, total_params=3800)


def test_cfsp_prunes_blocks_that_change_their_input_less_harder():
    gs = [group(f"ch{l}", "channel", 100, 10, l) for l in range(2)]
    alloc = allocate(gs, scores_for(gs), method="cfsp", sparsity=0.3, total_params=2000,
                     block_importance={0: 10.0, 1: 1.0})
    assert len(alloc.removed["ch1"]) > len(alloc.removed["ch0"])
    assert abs(removed_params(alloc, gs) - 600) <= 20
