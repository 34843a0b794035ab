"""The capability matrix: criterion x backend x compensation, each cell "works" or the one-line reason
the run is refused. Generated from the backends' `Capabilities` and `refusal_of`, the same code that
refuses a run, so it cannot drift from what the command does; `tests/backends/test_capability_matrix.py`
runs every "works" cell on a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import criteria as criteria_registry
from ..criteria.base import ExpertCriterion
from ..passes import compensation as compensation_registry
from .base import available, get


@dataclass(frozen=True)
class Cell:
    criterion: str
    backend: str
    compensate: str
    sequential: bool
    refusal: str | None  # None: the backend runs it

    @property
    def works(self) -> bool:
        return self.refusal is None

    @property
    def compensation_label(self) -> str:
        return self.compensate + (" + sequential" if self.sequential else "")


def compensation_variants() -> list[tuple[str, bool]]:
    """(compensation, sequential) pairs a run can ask for: every compensation, and --sequential on
    those that compensate."""
    out = []
    for name in compensation_registry.available():
        out.append((name, False))
        if name != "none":
            out.append((name, True))
    return out


def cells() -> list[Cell]:
    found = []
    for name in criteria_registry.available():
        scorer = criteria_registry.get(name)
        expert = isinstance(scorer, ExpertCriterion)
        variants = [("none", False)] if expert else compensation_variants()
        for backend in available():
            cls = get(backend)
            for compensate, sequential in variants:
                try:
                    scorer.check_compensation(compensate)
                    refusal = cls.refusal_of(scorer, compensate, sequential=sequential,
                                             target_parts=("experts",) if expert else ())
                except Exception as exc:  # noqa: BLE001 - the criterion's own refusal (obs needs lsq)
                    refusal = str(exc)
                found.append(Cell(name, backend, compensate, sequential, refusal))
    return found


def render_markdown(found: list[Cell] | None = None) -> str:
    """One table per backend (criteria as rows, compensations as columns); a refused cell points to its
    reason, listed under the table."""
    found = found if found is not None else cells()
    variants = compensation_variants()
    labels = [c + (" + sequential" if s else "") for c, s in variants]
    out = []
    for backend in dict.fromkeys(c.backend for c in found):
        reasons: dict[str, int] = {}
        out.append(f"### backend `{backend}`\n")
        out.append("| criterion | " + " | ".join(labels) + " |")
        out.append("|---|" + "---|" * len(labels))
        for name in dict.fromkeys(c.criterion for c in found):
            row = {(c.compensate, c.sequential): c for c in found if c.backend == backend and c.criterion == name}
            entries = []
            for variant in variants:
                cell = row.get(variant)
                if cell is None:
                    entries.append("–")
                elif cell.works:
                    entries.append("works (tested)")
                else:
                    number = reasons.setdefault(cell.refusal, len(reasons) + 1)
                    entries.append(f"refused ({number})")
            out.append(f"| {name} | " + " | ".join(entries) + " |")
        out.append("")
        out += [f"{number}. {reason}" for reason, number in reasons.items()]
        out.append("")
    return "\n".join(out)
