"""Plugins by entry point (graphprune.plugins): a criterion and an allocation from an installed package
are listed, used by compress and named in the report; a plugin that does not import is one user error
naming it; a plugin never replaces a built-in of the same name. The package is a real distribution on
sys.path (a `*.dist-info` folder with entry_points.txt), found by importlib.metadata as pip's would be."""

from __future__ import annotations

import sys
import textwrap

import pytest

from graphprune import allocation, criteria
from graphprune.errors import UserError
from graphprune.pipeline.run import compress
from graphprune.testing.zoo import save_tiny

PLUGIN = '''
import numpy as np

from graphprune import allocation
from graphprune.criteria.base import Criterion


class LastUnitsFirst(Criterion):
    """Scores a unit by its index: the last units of every group go first."""

    name = "demo-last-first"

    def score(self, group, ctx):
        return np.arange(group.units, dtype=np.float64)[::-1].copy()


def demo_uniform(groups, scores, comparable, target, floor, round_to, block_importance):
    """The built-in uniform allocation, under another name."""
    plan = allocation.get("uniform").run(groups, scores, comparable, target, floor, round_to, block_importance)
    plan.notes.append("allocated by the demo plugin")
    return plan
'''


def _install(root, entry_points: str) -> None:
    (root / "graphprune_demo_plugin.py").write_text(PLUGIN)
    info = root / "graphprune_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: graphprune-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def registries(monkeypatch):
    """Registries as they are now, restored afterwards (a plugin must not leak into other tests)."""
    criteria.available(), allocation.available()  # the built-ins are in before the copy is taken
    monkeypatch.setattr(criteria, "_REGISTRY", dict(criteria._REGISTRY))
    monkeypatch.setattr(allocation, "_REGISTRY", dict(allocation._REGISTRY))
    sys.modules.pop("graphprune_demo_plugin", None)  # each test imports its own copy
    yield
    sys.modules.pop("graphprune_demo_plugin", None)


def test_a_plugin_criterion_is_listed_and_used(tmp_path, monkeypatch, registries):
    _install(tmp_path, """
        [graphprune.criteria]
        demo-last-first = graphprune_demo_plugin:LastUnitsFirst
        magnitude = graphprune_demo_plugin:LastUnitsFirst
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "demo-last-first" in criteria.available()
    assert type(criteria.get("magnitude")).__module__ == "graphprune.criteria.magnitude"  # built-in wins

    result = compress(save_tiny("llama", tmp_path / "tiny"), criterion="demo-last-first", sparsity=0.3,
                      calib="none", target="channels", allocation="uniform", progress=False)
    assert result.report["criterion"] == "demo-last-first"
    for group_id, removed in result.removed.items():  # the plugin's ranking decided: the last channels went
        if len(removed):
            units = next(g.units for g in result.groups if g.id == group_id)
            assert list(removed) == list(range(units - len(removed), units))


def test_a_plugin_allocation_is_listed_and_used(tmp_path, monkeypatch, registries):
    _install(tmp_path, """
        [graphprune.allocations]
        demo-uniform = graphprune_demo_plugin:demo_uniform
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "demo-uniform" in allocation.available()

    options = dict(criterion="magnitude", sparsity=0.3, calib="none", target="channels", progress=False)
    tiny = save_tiny("llama", tmp_path / "tiny")
    plugin = compress(tiny, allocation="demo-uniform", **options)
    builtin = compress(tiny, allocation="uniform", **options)
    assert plugin.report["allocation"] == "demo-uniform"
    assert {g: list(r) for g, r in plugin.removed.items()} == {g: list(r) for g, r in builtin.removed.items()}


@pytest.mark.parametrize("group, line, needle", [
    ("criteria", "broken = no_such_module_anywhere:Score",
     "criterion plugin 'broken' (no_such_module_anywhere:Score) failed to load: No module named"),
    ("allocations", "broken = graphprune_demo_plugin:PLUGIN_CONSTANT",
     "allocation plugin 'broken' (graphprune_demo_plugin:PLUGIN_CONSTANT) failed to load: expected an Allocator"),
])
def test_a_broken_plugin_is_one_user_error_naming_it(tmp_path, monkeypatch, registries, group, line, needle):
    _install(tmp_path, f"""
        [graphprune.{group}]
        {line}
    """)
    (tmp_path / "graphprune_demo_plugin.py").write_text(PLUGIN + "\nPLUGIN_CONSTANT = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = criteria if group == "criteria" else allocation
    for _ in range(2):  # every use names it, until it is fixed or uninstalled
        with pytest.raises(UserError) as info:
            registry.available()
        assert needle in str(info.value) and "\n" not in str(info.value)
