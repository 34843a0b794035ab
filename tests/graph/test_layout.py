"""The axis-layout algebra: unification, refinement, conflicts and unit indices."""

import numpy as np

from graphprune.graph.layout import AtomTable, Prod, Sum


def test_view_into_heads_refines_the_flat_axis():
    t = AtomTable()
    flat = t.new(576)
    heads, head_dim = t.new(9), t.new(64)
    t.unify(flat, Prod((heads, head_dim)))
    idx = t.unit_indices(flat)
    assert idx[t.find(heads)].shape == (9, 64)
    assert idx[t.find(heads)][2].tolist() == list(range(128, 192))
    assert idx[t.find(head_dim)][5].tolist() == [h * 64 + 5 for h in range(9)]


def test_gqa_products_find_their_common_refinement():
    t = AtomTable()
    q_heads = Prod((t.new(9), t.new(64)))
    kv, rep, d = t.new(3), t.new(3), t.new(64)
    t.unify(q_heads, Prod((kv, rep, d)))
    leaves = t.leaves(q_heads)
    assert [t.size(x) for x in leaves] == [3, 3, 64]
    assert t.find(leaves[0]) == t.find(kv)


def test_concatenation_splits_the_consumer_axis_at_the_boundaries():
    t = AtomTable()
    a, b = t.new(8), t.new(12)
    consumer = t.new(20)
    t.unify(consumer, Sum((a, b)))
    idx = t.unit_indices(consumer)
    assert idx[t.find(a)].reshape(-1).tolist() == list(range(8))
    assert idx[t.find(b)].reshape(-1).tolist() == list(range(8, 20))


def test_rotary_halves_couple_index_j_with_j_plus_half():
    t = AtomTable()
    d = t.new(64)
    first, second = t.new(32), t.new(32)
    t.unify(d, Sum((first, second)))
    t.unify(d, Sum((second, first)))  # rotate_half: cat(-x2, x1) added to x
    idx = t.unit_indices(d)
    assert len(idx) == 1
    assert next(iter(idx.values()))[3].tolist() == [3, 35]


def test_sum_against_product_with_non_dividing_parts_is_a_conflict():
    t = AtomTable()
    import pytest

    from graphprune.graph.layout import StructureConflict

    with pytest.raises(StructureConflict):
        t.unify(Sum((t.new(8), t.new(12))), Prod((t.new(4), t.new(5))))


def test_pins_survive_refinement_and_union():
    t = AtomTable()
    a, b = t.new(16), t.new(16)
    t.pin(a, "rope")
    t.unify(b, Prod((t.new(4), t.new(4))))
    t.unify(a, b)
    assert all(t.pin_reason(x) == "rope" for x in t.leaves(b))


def test_unit_indices_rows_are_sorted_and_cover_the_axis_once():
    t = AtomTable()
    axis = t.new(24)
    g, r, d = t.new(2), t.new(3), t.new(4)
    t.unify(axis, Prod((g, r, d)))
    for root, rows in t.unit_indices(axis).items():
        assert np.array_equal(np.sort(rows.reshape(-1)), np.arange(24))
        assert all((np.diff(row) > 0).all() for row in rows)
