"""Plugins by entry point: the one loader behind every registry (criteria, allocations, compensations,
backends). A package adds to a registry by declaring, in its pyproject.toml,

    [project.entry-points."graphprune.criteria"]
    my-score = "my_package.scores:MyScore"

(groups `graphprune.criteria`, `graphprune.allocations`, `graphprune.compensations`,
`graphprune.backends`). A built-in name always wins over a plugin of the same name."""

from __future__ import annotations

from collections.abc import Callable, Container
from importlib import metadata
from typing import Any

from .errors import UserError


def load_entry_points(group: str, kind: str, known: Container[str], add: Callable[[str, Any], Any]) -> None:
    """`add(name, loaded object)` for each entry point of `group` whose name is not in `known` yet. A
    plugin that fails to import or to register is one user error naming it; an environment whose
    entry points cannot be read at all hides only the plugins, never the built-ins."""
    try:
        entries = metadata.entry_points(group=group)
    except Exception:  # noqa: BLE001 - a broken environment must not hide the built-ins
        return
    for entry in entries:
        if entry.name in known:
            continue
        try:
            add(entry.name, entry.load())
        except Exception as exc:  # noqa: BLE001 - whatever the plugin raised, name the plugin
            raise UserError(f"{kind} plugin '{entry.name}' ({entry.value}) failed to load: {exc}") from exc
