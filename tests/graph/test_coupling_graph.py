"""The coupling graph (issue 20, item 5): a networkx graph whose nodes are axis atoms and whose edges are
the couplings the dimension rules made; the dependency groups are its connected components.

* on every zoo family its components are exactly the union-find classes, and every group is the
  component of its class (so the groups are the ones the union-find gave: ground truth is checked
  member by member in test_zoo_groups.py);
* `graphprune inspect --graph FILE.graphml` writes it; networkx reads it back with the same nodes and
  edges, each group one component, the path between two members naming the ops that couple them;
* `Graph.consumers` is an index kept by `add_op`.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import pytest
import torch

from graphprune.cli.main import main
from graphprune.graph import analyze
from graphprune.graph.ir import Graph, Op, Tensor
from graphprune.graph.report import write_graphml
from graphprune.testing.zoo import TINY_FAMILIES, build_tiny, example_inputs, expected_structure, save_tiny, tiny_cnn

FAMILIES = sorted(TINY_FAMILIES) + ["cnn"]
_CACHE: dict = {}


def analysed(family: str):
    if family not in _CACHE:
        if family == "cnn":
            _CACHE[family] = analyze(tiny_cnn(), (torch.randn(*expected_structure("cnn")["input_shape"]),))
        else:
            model, config = build_tiny(family)
            _CACHE[family] = analyze(model, example_inputs(config))
    return _CACHE[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_components_are_the_union_find_classes_and_the_groups(family):
    groups = analysed(family)
    atoms = groups.propagation.atoms
    graph = atoms.coupling
    assert graph.number_of_nodes() == len(atoms._parent)
    classes: dict[int, set[int]] = defaultdict(set)
    for atom in range(len(atoms._parent)):
        classes[atoms.find(atom)].add(atom)
    components = {frozenset(c) for c in nx.connected_components(graph)}
    assert components == {frozenset(c) for c in classes.values()}
    # every group is the component of its class; a per-expert class gives one group per expert
    by_component: dict[frozenset, list] = defaultdict(list)
    for g in groups:
        assert g.atoms == frozenset(classes[atoms.find(g.root)])
        by_component[g.atoms].append(g)
    assert all(len(gs) == 1 or all(s.expert is not None for g in gs for s in g.slices) for gs in by_component.values())
    # and every component of leaf atoms that a read parameter axis resolves to is a group
    read = {t for op in groups.graph.ops.values() for t in op.inputs if t is not None}
    touched = {atoms.find(leaf) for t in groups.graph.parameters() if t.name in read
               for layout in groups.propagation.L(t.name) for leaf in atoms.leaves(layout) if atoms.size(leaf) > 1}
    assert {atoms.find(next(iter(c))) for c in by_component} == touched
    # edges say which op coupled two atoms, and by which rule
    for _, _, data in graph.edges(data=True):
        assert data["op"] in groups.graph.ops and data["rule"] == groups.graph.ops[data["op"]].op


def _llama():
    model, config = build_tiny("llama")
    return analyze(model, example_inputs(config))


def test_graphml_round_trip_shows_why_two_parameters_are_coupled(tmp_path):
    groups = _llama()
    path = write_graphml(groups, tmp_path / "llama.graphml")
    back = nx.read_graphml(path)
    live = groups.propagation.atoms.coupling
    assert back.number_of_nodes() == live.number_of_nodes()
    assert back.number_of_edges() == live.number_of_edges()
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary file left
    ffn = next(g for g in groups if g.kind == "channel" and g.layer == 0)
    members = [n for n, d in back.nodes(data=True) if ffn.id in str(d.get("group", "")).split(",")]
    assert len(members) == len(ffn.atoms)
    assert nx.is_connected(back.subgraph(members))
    assert all(back.nodes[n]["group_kind"] == "channel" and back.nodes[n]["status"] == "prunable" for n in members)
    # why gate_proj's rows and up_proj's rows are one group: the path between them names the ops
    scope = "model.layers.0.mlp"
    gate = next(n for n, d in back.nodes(data=True) if d.get("param") == f"{scope}.gate_proj.weight" and d["axis"] == 0)
    up = next(n for n, d in back.nodes(data=True) if d.get("param") == f"{scope}.up_proj.weight" and d["axis"] == 0)
    path_nodes = nx.shortest_path(back, gate, up)
    rules = {back.edges[a, b]["rule"] for a, b in zip(path_nodes, path_nodes[1:])}
    assert {"linear", "elementwise"} <= rules
    assert all(back.edges[a, b]["location"] and back.edges[a, b]["source_op"]
               for a, b in zip(path_nodes, path_nodes[1:]))
    # the head group: q_proj's rows are refined into (heads, head_dim); the refinement is an attribute
    q = next(n for n, d in back.nodes(data=True) if d.get("param") == "model.layers.0.self_attn.q_proj.weight"
             and d["axis"] == 0)
    refined = [d["refined"] for n, d in back.nodes(data=True)
               if d.get("class") == back.nodes[q]["class"] and "refined" in d]
    assert refined and refined[0].startswith("Prod(")


def test_inspect_writes_the_graph_and_refuses_a_bad_path_in_one_line(tmp_path, capsys):
    model_dir = save_tiny("llama", tmp_path / "tiny")
    out = tmp_path / "g.graphml"
    # -v: where the graph went is a stage line (stderr shows only warnings and errors when not a terminal)
    assert main(["inspect", model_dir, "--graph", str(out), "--json", "-v"]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and nx.read_graphml(out).number_of_nodes() > 0
    assert captured.out.lstrip().startswith("{")  # stdout stays the JSON
    assert "coupling graph" in captured.err
    assert main(["inspect", model_dir, "--graph", str(tmp_path / "missing" / "g.graphml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing" in err


def test_consumers_are_indexed_in_add_order():
    g = Graph("m", "test")
    for name in ("x", "w", "y", "z", "u"):
        g.add_tensor(Tensor(name, (2,)))
    g.add_op(Op("a", "elementwise", ["x", "x"], ["y"]))
    g.add_op(Op("b", "elementwise", ["y", "w"], ["z"]))
    g.add_op(Op("c", "elementwise", ["x", None, "z"], ["u"]))
    assert [op.name for op in g.consumers("x")] == ["a", "c"]
    assert [op.name for op in g.consumers("y")] == ["b"]
    assert g.consumers("u") == [] and g.consumers("nothing") == []


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_consumers_index_equals_a_scan(family):
    graph = analysed(family).graph
    for name in graph.tensors:
        assert graph.consumers(name) == [op for op in graph.ops.values() if name in op.inputs]
