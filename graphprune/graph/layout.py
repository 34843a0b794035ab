"""Axis layouts: how the indices of one tensor axis decompose into prunable units.

Every axis of every tensor in the graph is described by a *layout*: a tree whose leaves are
*atoms* (an index range of some size) combined by

* ``Prod(parts)`` – mixed radix, major part first: a ``[576]`` axis viewed as ``[9, 64]`` is
  ``Prod(heads, head_dim)``;
* ``Sum(parts)``  – concatenation: a fused ``qkv`` axis is ``Sum(q, k, v)``.

Atoms live in a union-find. A dimension rule *unifies* two layouts when the same index of both
must be removed together (the rows of ``gate_proj`` and of ``up_proj``, an elementwise product).
Unifying an atom with a composite layout *refines* the atom's class: from then on every axis that
mentions that class sees the finer structure. Two composite layouts are unified by their common
refinement (merging the boundaries of their parts). When no common refinement exists (say
``Sum(192, 384)`` against ``Prod(3, 192)``) the atoms involved are *pinned*: they can never be
pruned, and the reason is kept for the report. Pinning is the conservative answer: it can only
lose an opportunity, never prune wrongly.

After propagation, each class of leaf atoms is one dependency group: unit ``u`` of the group is
index ``u`` of those atoms, wherever they occur.

**The coupling graph.** Every atom is a node of `AtomTable.coupling` (a `networkx.Graph`), and
every union a dimension rule makes is an edge between the two atoms it coupled, with the op, its
source op type and location and the rule (`AtomTable.context`, set by the rule driver). Its
connected components are the classes, and the dependency groups are the components of leaf
atoms (`graph.groups.build_groups`). A node says which tensor axis it is (``tensor``, ``axis``,
``param``), which atom it is a part of (``part_of``: a refinement split it off) or which op
created it (``op``); a refined class carries its refinement (``refined``, on the node that was its
root then). Refinement is structure, not coupling: a ``576`` axis refined into ``Prod(9, 64)``
is not the same channels as either part, so it is an attribute, never an edge.

The union-find stays because the rules need "which class is this atom in now" after every union
(to expand refinements and to pin classes) thousands of times during propagation; recomputing
components for that would be quadratic. Both hold the same partition: every `_union` adds exactly
one edge between the two classes it merges (`tests/graph/test_coupling_graph.py` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import networkx as nx
import numpy as np


@dataclass(frozen=True)
class Prod:
    parts: tuple

    def __repr__(self) -> str:
        return "Prod(" + ", ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True)
class Sum:
    parts: tuple

    def __repr__(self) -> str:
        return "Sum(" + ", ".join(map(repr, self.parts)) + ")"


Layout = Union[int, Prod, Sum]  # an int is an atom id


class StructureConflict(Exception):
    """Two layouts have no common refinement (internal: turned into pins by the caller)."""


class AtomTable:
    """Union-find over atoms, with refinements and pins attached to class roots."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._refinement: dict[int, Layout] = {}
        self._pins: dict[int, str] = {}
        self.coupling = nx.Graph()  # atoms and the unions the rules made (see the module docstring)
        # What is coupling now: edge attributes of the unions made (op, source_op, location, rule) and
        # node attributes of atoms made without a tensor axis ({"op": ...}). Set by the rule driver.
        self.context: dict[str, Any] = {}
        self.origin: dict[str, Any] = {}

    # ---------------------------------------------------------------- atoms
    def new(self, size: int, pin: str | None = None, about: dict[str, Any] | None = None) -> int:
        """A fresh atom of `size` indices; `about` says what it is (node attributes of the coupling
        graph; the current op when not given)."""
        atom = len(self._parent)
        self._parent.append(atom)
        self._size.append(int(size))
        self.coupling.add_node(atom, size=int(size), **(about if about is not None else self.origin))
        if pin:
            self._pins[atom] = pin
        return atom

    def classes(self) -> list[set[int]]:
        """The connected components of the coupling graph (each one class of atoms)."""
        return list(nx.connected_components(self.coupling))

    def find(self, atom: int) -> int:
        root = atom
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[atom] != root:  # path compression
            self._parent[atom], atom = root, self._parent[atom]
        return root

    def size(self, layout: Layout) -> int:
        if isinstance(layout, int):
            return self._size[layout]
        sizes = [self.size(p) for p in layout.parts]
        if isinstance(layout, Prod):
            return int(np.prod(sizes, dtype=np.int64)) if sizes else 1
        return int(sum(sizes))

    def pin_reason(self, atom: int) -> str | None:
        return self._pins.get(self.find(atom))

    # ------------------------------------------------------------ normalise
    def prod(self, parts) -> Layout:
        """A product with unit factors dropped and nested products flattened."""
        flat: list[Layout] = []
        for part in parts:
            if isinstance(part, Prod):
                flat.extend(part.parts)
            elif self.size(part) != 1:
                flat.append(part)
        flat = [p for p in flat if self.size(p) != 1]
        if not flat:
            return self.new(1)
        return flat[0] if len(flat) == 1 else Prod(tuple(flat))

    def sum(self, parts) -> Layout:
        flat: list[Layout] = []
        for part in parts:
            if isinstance(part, Sum):
                flat.extend(part.parts)
            elif self.size(part) != 0:
                flat.append(part)
        return flat[0] if len(flat) == 1 else Sum(tuple(flat))

    def expand(self, layout: Layout) -> Layout:
        """Replace a top-level atom by its class's refinement (repeatedly)."""
        while isinstance(layout, int):
            root = self.find(layout)
            refined = self._refinement.get(root)
            if refined is None:
                return root
            layout = refined
        return layout

    def resolve(self, layout: Layout) -> Layout:
        """The fully refined tree of `layout`, leaves being class roots."""
        layout = self.expand(layout)
        if isinstance(layout, int):
            return layout
        parts = tuple(self.resolve(p) for p in layout.parts)
        return self.prod(parts) if isinstance(layout, Prod) else self.sum(parts)

    def leaves(self, layout: Layout) -> list[int]:
        layout = self.resolve(layout)
        if isinstance(layout, int):
            return [layout]
        out: list[int] = []
        for part in layout.parts:
            out.extend(self.leaves(part))
        return out

    # ----------------------------------------------------------------- pins
    def pin(self, layout: Layout, reason: str) -> None:
        for leaf in self.leaves(layout):
            self._pins.setdefault(leaf, reason)

    # ---------------------------------------------------------- refinement
    def _refine(self, atom: int, layout: Layout) -> None:
        root = self.find(atom)
        assert root not in self._refinement
        self._refinement[root] = layout
        self.coupling.nodes[root]["refined"] = repr(layout)
        reason = self._pins.get(root)
        if reason:
            self.pin(layout, reason)

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self._size[ra] != self._size[rb]:
            raise StructureConflict(f"atom sizes differ: {self._size[ra]} vs {self._size[rb]}")
        self._parent[rb] = ra
        self.coupling.add_edge(a, b, **self.context)
        reason_a, reason_b = self._pins.pop(ra, None), self._pins.pop(rb, None)
        if reason_a or reason_b:
            self._pins[ra] = reason_a or reason_b

    def _split_atom_prod(self, atom: int, major: int) -> tuple[int, int]:
        """Refine `atom` (size n) into Prod(new(major), new(n // major))."""
        n = self.size(atom)
        a1, a2 = self.new(major, about={"part_of": atom, "part": "major"}), \
            self.new(n // major, about={"part_of": atom, "part": "minor"})
        self._refine(atom, Prod((a1, a2)))
        return a1, a2

    def _split_atom_sum(self, atom: int, head: int) -> tuple[int, int]:
        """Refine `atom` (size n) into Sum(new(head), new(n - head))."""
        n = self.size(atom)
        a1, a2 = self.new(head, about={"part_of": atom, "part": "head"}), \
            self.new(n - head, about={"part_of": atom, "part": "tail"})
        self._refine(atom, Sum((a1, a2)))
        return a1, a2

    # --------------------------------------------------------------- unify
    def unify(self, x: Layout, y: Layout) -> None:
        """Couple index i of `x` with index i of `y` for every i.

        Raises StructureConflict when the two have no common refinement; the caller pins.
        """
        given_x, given_y = x, y
        x, y = self.expand(x), self.expand(y)
        if self.size(x) != self.size(y):
            raise StructureConflict(f"sizes differ: {self.size(x)} vs {self.size(y)}")
        if self.size(x) <= 1:
            return
        if isinstance(x, int) and isinstance(y, int):
            # the edge joins the atoms the rule named (same classes as their roots x and y)
            self._union(given_x if isinstance(given_x, int) else x, given_y if isinstance(given_y, int) else y)
        elif isinstance(x, int):
            self._refine(x, y)
        elif isinstance(y, int):
            self._refine(y, x)
        elif isinstance(x, Prod) and isinstance(y, Prod):
            self._unify_products(x, y)
        else:
            self._unify_sums(x, y)

    def _factors(self, layout: Layout) -> list[Layout]:
        """Major-to-minor factors of a layout, expanding atoms refined into products."""
        layout = self.expand(layout)
        if isinstance(layout, Prod):
            out: list[Layout] = []
            for part in layout.parts:
                out.extend(self._factors(part))
            return [f for f in out if self.size(f) != 1]
        return [layout] if self.size(layout) != 1 else []

    def _unify_products(self, x: Layout, y: Layout) -> None:
        fx, fy = self._factors(x), self._factors(y)
        i = j = 0
        while i < len(fx) and j < len(fy):
            a, b = self.expand(fx[i]), self.expand(fy[j])
            sa, sb = self.size(a), self.size(b)
            if sa == sb:
                self.unify(a, b)
                i, j = i + 1, j + 1
            elif sa > sb and sa % sb == 0 and isinstance(a, int):
                major, rest = self._split_atom_prod(a, sb)
                self.unify(major, b)
                fx[i] = rest
                j += 1
            elif sb > sa and sb % sa == 0 and isinstance(b, int):
                major, rest = self._split_atom_prod(b, sa)
                self.unify(a, major)
                fy[j] = rest
                i += 1
            else:
                # A sum cannot be cut into a product, nor can non-dividing factors align.
                raise StructureConflict(f"no common product refinement of {sa} and {sb}")
        if i != len(fx) or j != len(fy):
            raise StructureConflict("products of different length")

    def _summands(self, layout: Layout) -> list[Layout]:
        """Concatenated parts of a layout; a product whose major factor is a sum distributes."""
        layout = self.expand(layout)
        if isinstance(layout, Sum):
            out: list[Layout] = []
            for part in layout.parts:
                out.extend(self._summands(part))
            return out
        if isinstance(layout, Prod):
            factors = self._factors(layout)
            if factors:
                head = self.expand(factors[0])
                if isinstance(head, Sum):
                    rest = factors[1:]
                    out = []
                    for part in head.parts:
                        out.extend(self._summands(self.prod((part, *rest))))
                    return out
        return [layout]

    def _cut(self, layout: Layout, head: int) -> tuple[Layout, Layout]:
        """Split a summand into (first `head` indices, the rest), refining as needed."""
        layout = self.expand(layout)
        if isinstance(layout, int):
            return self._split_atom_sum(layout, head)
        if isinstance(layout, Prod):
            factors = self._factors(layout)
            major = self.expand(factors[0])
            inner = self.size(self.prod(factors[1:])) if len(factors) > 1 else 1
            if isinstance(major, int) and head % inner == 0:
                m1, m2 = self._split_atom_sum(major, head // inner)
                rest = factors[1:]
                return self.prod((m1, *rest)), self.prod((m2, *rest))
        raise StructureConflict(f"cannot cut a {self.size(layout)}-wide part at {head}")

    def _unify_sums(self, x: Layout, y: Layout) -> None:
        px, py = self._summands(x), self._summands(y)
        i = j = 0
        while i < len(px) and j < len(py):
            a, b = px[i], py[j]
            sa, sb = self.size(a), self.size(b)
            if sa == sb:
                self.unify(a, b)
                i, j = i + 1, j + 1
            elif sa > sb:
                first, rest = self._cut(a, sb)
                self.unify(first, b)
                px[i] = rest
                j += 1
            else:
                first, rest = self._cut(b, sa)
                self.unify(a, first)
                py[j] = rest
                i += 1
        if i != len(px) or j != len(py):
            raise StructureConflict("concatenations of different total size")

    # ------------------------------------------------------- unit indices
    def unit_indices(self, layout: Layout, only: set[int] | None = None) -> dict[int, np.ndarray]:
        """For each leaf class in `layout`: an array [units, width] of the flat axis indices of each
        unit (sorted). A class that occurs several times in the axis (both halves of a rotary
        head_dim, say) collects all its occurrences in one row. `only` restricts the classes.
        """
        layout = self.resolve(layout)
        n = self.size(layout)
        coords: dict[int, list[np.ndarray]] = {}
        flat = np.arange(n, dtype=np.int64)
        self._coordinates(layout, flat, np.ones(n, dtype=bool), coords)
        out: dict[int, np.ndarray] = {}
        for root, arrays in coords.items():
            if only is not None and root not in only:
                continue
            units = self.size(root)
            blocks = []
            for coord in arrays:
                valid = coord >= 0
                order = np.argsort(coord[valid], kind="stable")
                # every leaf occurrence tiles its region evenly, so rows have equal width
                blocks.append(flat[valid][order].reshape(units, -1))
            out[root] = np.sort(np.concatenate(blocks, axis=1), axis=1)
        return out

    def _coordinates(self, layout: Layout, local: np.ndarray, mask: np.ndarray, coords: dict) -> None:
        """Fill coords[root] with, per flat index, the coordinate of that leaf (or -1)."""
        if isinstance(layout, int):
            arr = np.where(mask, local, -1)
            coords.setdefault(layout, []).append(arr)
            return
        sizes = [self.size(p) for p in layout.parts]
        if isinstance(layout, Prod):
            stride = int(np.prod(sizes, dtype=np.int64))
            for part, size in zip(layout.parts, sizes):
                stride //= size
                self._coordinates(part, (local // stride) % size, mask, coords)
        else:
            offset = 0
            for part, size in zip(layout.parts, sizes):
                inside = mask & (local >= offset) & (local < offset + size)
                self._coordinates(part, local - offset, inside, coords)
                offset += size
