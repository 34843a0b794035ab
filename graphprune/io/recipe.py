"""`graphprune_recipe.yaml`: writing and reading the recipe of a run (its content is built by
`pipeline.recipe`). A recipe is plain YAML, safe to read (`yaml.safe_load`), one per output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

RECIPE_FILE = "graphprune_recipe.yaml"
_HEADER = ("# graphprune recipe: every option of the run, where the model came from, what the run resolved and the\n"
           "# package versions. Replay it with: graphprune compress --config {name} [--out DIR] [flags that override "
           "it]\n")


def recipe_text(recipe: dict[str, Any], *, name: str = RECIPE_FILE) -> str:
    import yaml

    body = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
    return _HEADER.format(name=name) + body


def write_recipe(path: str | Path, recipe: dict[str, Any]) -> Path:
    from .atomic import write_text

    path = Path(path)
    return write_text(path, recipe_text(recipe, name=path.name))


def find_recipe(path: str | Path) -> Path:
    """The recipe file `path` names: the file itself, or the recipe inside a graphprune output folder, or
    the one next to a pruned .onnx file (`NAME.recipe.yaml`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RECIPE_FILE
    elif path.suffix.lower() == ".onnx":
        path = path.with_name(f"{path.stem}.recipe.yaml")
    return path


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at `path` (see `find_recipe`), or a one-line UserError."""
    import yaml

    given = str(path)
    path = find_recipe(path)
    if not path.is_file():
        raise UserError(f"--config {given}: no recipe at {path}" + ("" if path.exists() else " (it does not exist)"))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--config {given}: cannot read {path}: {getattr(error, 'strerror', None) or error}") \
            from error
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"--config {given}: {path} is not valid YAML{where}") from error
    if not isinstance(recipe, dict):
        raise UserError(f"--config {given}: {path} is not a graphprune recipe (a YAML mapping is expected)")
    return recipe
