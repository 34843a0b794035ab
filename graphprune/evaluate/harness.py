"""lm-evaluation-harness tasks on a loaded model (`graphprune eval DIR --tasks ...`).

The model graphprune loaded (an output with per-layer sizes too, built by `graphprune.load_pruned`)
is handed to lm-eval's `HFLM` as an instance, so lm-eval never reloads it from disk. Tasks come from
lm-eval's registry plus `include_path` (a folder of task YAMLs, e.g. a local multiple-choice set:
`dataset_path: json` with `data_files`). Needs the `eval` extra: `pip install 'graphprune[eval]'`.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger("graphprune")
INSTALL_HINT = "pip install 'graphprune[eval]'"


def require_lm_eval() -> None:
    """A one-line UserError (before any model loads) when lm-evaluation-harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"--tasks runs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in str(text).split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks must be a comma list of task names, got '{text}'")
    return tasks


def check_include_path(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"--include-path {path} is not a directory (it should hold task YAML files)")
    return folder.resolve()


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], *, include_path: str | Path | None = None,
              limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 1,
              seed: int = 0) -> list[dict[str, Any]]:
    """Evaluate `tasks` on `model`; one row per task and metric: {"kind": "lm-eval", "task", "metric",
    "value", "stderr", "settings"}."""
    require_lm_eval()
    quiet = {name: logging.getLogger(name).level for name in ("lm-eval", "lm_eval", "lm_eval.api", "evaluate")}
    for name in quiet:  # lm-eval logs every step at INFO; -v shows them
        logging.getLogger(name).setLevel(logging.DEBUG if log.getEffectiveLevel() <= logging.DEBUG else logging.ERROR)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_path) if include_path else None)
        known = set(manager.all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else (" (give the folder of its YAML with --include-path)"
                                                                   if include_path is None else "")
            raise UserError(f"unknown lm-eval task '{unknown[0]}'{hint}")
        import torch

        import lm_eval.evaluator as evaluator

        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        # lm-eval records the git commit of the current directory by running `git describe`, which prints
        # "fatal: not a git repository" outside one; graphprune's report records its own versions instead
        git_hash = getattr(evaluator, "get_git_commit_hash", None)
        evaluator.get_git_commit_hash = lambda: None
        try:
            with torch.no_grad():
                output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                                 num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                                 numpy_random_seed=seed, torch_random_seed=seed,
                                                 fewshot_random_seed=seed)
        finally:
            if git_hash is not None:
                evaluator.get_git_commit_hash = git_hash
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    if not output or "results" not in output:
        raise UserError("lm-evaluation-harness returned no results")
    settings = ", ".join(s for s in (f"limit {limit}" if limit else "", f"{num_fewshot}-shot" if num_fewshot else "")
                         if s) or "full"
    rows = []
    higher_is_better = output.get("higher_is_better") or {}
    for task in tasks:
        for task_name, metrics in sorted(output["results"].items()):
            if task_name != task and not task_name.startswith(f"{task}_") and metrics.get("alias", "").strip() != task:
                continue
            declared = higher_is_better.get(task_name) or {}  # the task's metrics (not sample_len & co.)
            for key, value in sorted(metrics.items()):
                metric, _, filter_name = key.partition(",")
                if metric.endswith("_stderr") or metric == "alias" or not isinstance(value, (int, float)):
                    continue
                if declared and metric not in declared:
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                rows.append({"kind": "lm-eval", "task": task_name, "metric": metric if filter_name in ("", "none")
                             else f"{metric} ({filter_name})", "value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                             "settings": settings})
    return rows
