"""The model card of an output: `README.md` with Hugging Face model-card metadata, and a bar chart of
the units every layer kept (`kept_units.png`).

The card says what the model is (base model, how it was made: the command and the recipe), what
pruning did (parameters and FLOPs per token before and after, kept units per layer as a table and a
chart), what graphprune measured on it (`graphprune eval` adds its numbers to the report and rewrites
the card) and how to load it. It is generated from the report and the recipe only, so the same run
gives the same card. A folder output holds `README.md` and `kept_units.png`; a pruned `.onnx` file
gets `NAME.README.md`, `NAME.recipe.yaml` and `NAME.kept_units.png` next to it (`write_onnx_companions`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"
CHART_FILE = "kept_units.png"
KIND_NAMES = {"channel": "channels", "kv-group": "KV groups", "head": "heads", "head_dim": "head dim",
              "hidden": "hidden", "expert": "experts", "expert_channel": "channels per expert"}


# ------------------------------------------------------------------ what the card is built from
def _layer_key(key: str) -> tuple:
    return (0, int(key), "") if str(key).isdigit() else (1, 0, str(key))


def kept_table(report: dict[str, Any]) -> tuple[list[str], list[str], dict[str, dict[str, tuple[int, int | None]]]]:
    """(kinds, layers, kind -> layer -> (kept, before or None)) from the report."""
    kept = report.get("kept_units") or {}
    before = report.get("units_before") or {}
    kinds = [k for k in kept if isinstance(kept[k], dict) and kept[k]]
    cells: dict[str, dict[str, tuple[int, int | None]]] = {}
    layers: set[str] = set()
    for kind in kinds:
        for layer, count in kept[kind].items():
            if isinstance(count, dict):  # per-expert counts: the layer's first
                count = next(iter(count.values()), 0)
            was = (before.get(kind) or {}).get(layer)
            cells.setdefault(kind, {})[str(layer)] = (int(count), int(was) if isinstance(was, int) else None)
            layers.add(str(layer))
    return kinds, sorted(layers, key=_layer_key), cells


def _number(value: float) -> str:
    value = float(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.4g}"


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else "–"


def _base_model(recipe: dict[str, Any] | None) -> str | None:
    source = (recipe or {}).get("source") or {}
    return source.get("repo_id") or source.get("hub_id")


def _library(directory: Path | None, report: dict[str, Any]) -> tuple[str, str | None]:
    """(library_name, pipeline_tag) for the card's metadata."""
    if report.get("frontend") == "onnx":
        return "onnx", None
    if directory is not None and (directory / "modules.json").is_file():
        return "sentence-transformers", "sentence-similarity"
    config = {}
    if directory is not None and (directory / "config.json").is_file():
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "transformers", "text-generation"
    return "transformers", "feature-extraction"


def _front_matter(report: dict[str, Any], recipe: dict[str, Any] | None, library: str, pipeline: str | None) -> str:
    import yaml

    meta: dict[str, Any] = {}
    base = _base_model(recipe)
    if base:
        meta["base_model"] = base
    meta["library_name"] = library
    if pipeline:
        meta["pipeline_tag"] = pipeline
    tags = ["graphprune", "pruned", "structured-pruning"]
    for extra in (report.get("criterion"), (report.get("experts") or {}).get("criterion")):
        if extra and extra not in tags:
            tags.append(str(extra))
    meta["tags"] = tags
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, default_flow_style=False) + "---\n"


def evaluation_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in (report.get("evaluation") or []) if isinstance(row, dict)]


def card_text(report: dict[str, Any], recipe: dict[str, Any] | None = None, *, directory: Path | None = None,
              chart: str | None = CHART_FILE, onnx_file: str | None = None, repo_id: str | None = None) -> str:
    """The card's Markdown (see the module docstring). It depends on the report and the recipe only
    (never on where the output was written), so the same model gets the same card."""
    library, pipeline = _library(directory, report)
    p, f = report.get("params") or {}, report.get("flops_per_token") or {}
    source = (recipe or {}).get("source") or {}
    base = _base_model(recipe)
    model = report.get("model", "the model")
    title = repo_id or f"{base or model}, pruned by graphprune"
    lines = [_front_matter(report, recipe, library, pipeline), f"# {title}", ""]
    how = f"criterion `{report.get('criterion')}`, allocation `{report.get('allocation')}`, compensation " \
          f"`{report.get('compensate')}`"
    if report.get("experts"):
        e = report["experts"]
        how = f"routed experts by `{e.get('criterion')}` ({e.get('experts_removed')} of {e.get('experts_before')} " \
              f"removed)" + (f"; {how}" if report.get("target") != "experts" else "")
    achieved = p.get("achieved_sparsity")
    lines += [f"A structurally pruned version of **{base or model}**, made with "
              f"[graphprune](https://pypi.org/project/graphprune/) (version {report.get('graphprune_version')}): "
              f"{how}. It removed "
              f"{achieved:.1%} of the layer parameters (asked {report.get('requested_sparsity')})." if achieved is not None
              else f"A structurally pruned version of **{base or model}**, made with graphprune.", ""]

    lines += ["## Base model", ""]
    if source.get("kind") == "hub":
        lines.append(f"[{source['repo_id']}](https://huggingface.co/{source['repo_id']}) at commit "
                     f"`{source.get('commit')}` (revision `{source.get('revision')}`).")
    elif source.get("kind") == "alias":
        lines.append(f"`{source.get('model')}` (graphprune's bundled copy" +
                     (f" of [{base}](https://huggingface.co/{base})" if base else "") + ").")
    elif source.get("model"):
        lines.append(f"`{source['model']}`.")
    else:
        lines.append(f"`{model}` (an in-memory model).")
    if source.get("sha256"):
        lines.append(f"Content sha256 of its files: `{source['sha256']}`.")
    lines.append("")

    lines += ["## How it was made", ""]
    if (recipe or {}).get("command"):
        lines += ["The equivalent command:", "", "```", recipe["command"], "```", ""]
    recipe_name = f"{Path(onnx_file).stem}.recipe.yaml" if onnx_file else "graphprune_recipe.yaml"
    lines += [f"Every option, the source and the package versions are in `{recipe_name}`; "
              f"`graphprune compress --config {recipe_name} --out DIR` replays it and gives the same model files. "
              f"Target `{report.get('target')}`, seed {report.get('seed')}.", ""]
    calibration = report.get("calibration")
    if isinstance(calibration, dict) and calibration.get("source") is not None:
        lines += [f"Calibration: `{calibration.get('source')}`, {calibration.get('nsamples')} samples of "
                  f"{calibration.get('seqlen')} tokens" + (f" (sha256 `{calibration['sha256'][:16]}`…)"
                                                           if calibration.get("sha256") else "") + ".", ""]

    lines += ["## Size", "", "| | before | after | change |", "|---|---:|---:|---:|"]
    if p:
        lines.append(f"| parameters | {p.get('before', 0):,} | {p.get('after', 0):,} | "
                     f"{_change(p.get('before', 0), p.get('after', 0))} |")
        lines.append(f"| layer parameters | {p.get('layers_before', 0):,} | {p.get('layers_after', 0):,} | "
                     f"{_change(p.get('layers_before', 0), p.get('layers_after', 0))} |")
    if f:
        lines.append(f"| FLOPs per token | {_number(f.get('before', 0))} | {_number(f.get('after', 0))} | "
                     f"{_change(f.get('before', 0), f.get('after', 0))} |")
    lines.append("")

    kinds, layers, cells = kept_table(report)
    if kinds:
        lines += ["## Kept units per layer", "",
                  "| layer | " + " | ".join(KIND_NAMES.get(k, k) for k in kinds) + " |",
                  "|---|" + "---:|" * len(kinds)]
        for layer in layers:
            row = []
            for kind in kinds:
                kept, before = cells.get(kind, {}).get(layer, (None, None))
                row.append("–" if kept is None else f"{kept} / {before}" if before is not None else str(kept))
            lines.append(f"| {layer} | " + " | ".join(row) + " |")
        lines.append("")
        if chart:
            lines += [f"![Units kept per layer]({chart})", ""]
        if report.get("uniform_layers") is False and not report.get("module"):
            lines += ["Layers keep different sizes: the config carries `graphprune_layer_overrides`.", ""]

    rows = evaluation_rows(report)
    lines += ["## Evaluation", ""]
    if rows:
        lines += ["Measured by `graphprune eval` on this model:", "",
                  "| evaluation | data or task | metric | value | settings |", "|---|---|---|---:|---|"]
        for row in rows:
            value = row.get("value")
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            if isinstance(row.get("stderr"), float):
                shown += f" ± {row['stderr']:.4f}"
            lines.append(f"| {row.get('kind')} | {row.get('data') or row.get('task')} | {row.get('metric')} | {shown} | "
                         f"{row.get('settings', '')} |")
    else:
        lines.append("None yet: `graphprune eval DIR --data FILE` (perplexity or retrieval) or "
                     "`graphprune eval DIR --tasks TASKS` (lm-evaluation-harness) adds its numbers here.")
    lines.append("")

    lines += ["## How to load", ""]
    where = repo_id or (f"path/to/{onnx_file}" if onnx_file else "path/to/this/folder")
    if onnx_file:
        lines += ["```python", "import onnxruntime", f'session = onnxruntime.InferenceSession("{where}")', "```", "",
                  "Inputs `input_ids`, `attention_mask`; prefill only (no KV cache)."]
    elif report.get("module"):  # a plain nn.Module: no config, so its class (or the exported program) rebuilds it
        module = report["module"]
        name = str(module.get("class", "MyModule")).rsplit(".", 1)[-1]
        lines += ["```python", "import graphprune, torch",
                  f'model = graphprune.load_module({name}(...), "{where}")  # a fresh {name}, resized and loaded']
        if "model.pt2" in module.get("files", []):
            lines += [f'model = torch.export.load("{where}/model.pt2").module()  # or: without the class']
        lines += ["```", "", f"`{module.get('class')}` built as for the dense model; `load_module` gives every "
                  f"layer its pruned size and loads `model.safetensors`."]
    elif library == "sentence-transformers":
        lines += ["```python", "from sentence_transformers import SentenceTransformer",
                  f'model = SentenceTransformer("{where}")', "```"]
    elif report.get("uniform_layers") is False:
        lines += ["```python", "import graphprune  # pip install graphprune",
                  f'model = graphprune.load_pruned("{where}")  # per-layer sizes', "```", "",
                  "Plain `from_pretrained` cannot build layers of different sizes from one config; "
                  "`graphprune.load_pruned` runs transformers' own loading on a per-layer subclass."]
    else:
        auto = "AutoModelForCausalLM" if pipeline == "text-generation" else "AutoModel"
        lines += ["```python", f"from transformers import {auto}, AutoTokenizer",
                  f'model = {auto}.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
                  "```"]
    notes = []
    if report.get("floored_groups"):
        notes.append(f"{len(report['floored_groups'])} group(s) kept their last unit (floor).")
    if report.get("blocked_groups"):
        notes.append(f"{len(report['blocked_groups'])} group(s) were left unpruned: an op has no dimension rule.")
    if report.get("target_note"):
        notes.append(str(report["target_note"]))
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines += ["", "The full report is in " + ("`graphprune_report.json`." if not onnx_file else
                                               "the ONNX file's `graphprune_report` metadata.")]
    return "\n".join(line for line in lines if line is not None).rstrip() + "\n"


# ------------------------------------------------------------------ the chart
def write_chart(path: Path, report: dict[str, Any], *, title: str = "") -> bool:
    """A bar chart of the units each layer kept (and had), one panel per kind; False when the report
    has no per-layer units to draw. It depends on the kept units only: the same result, the same bytes."""
    kinds, layers, cells = kept_table(report)
    if not kinds:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    width = max(6.0, min(24.0, 0.3 * len(layers) + 2.5))
    figure = Figure(figsize=(width, 2.3 * len(kinds) + 0.6), dpi=100)
    axes = figure.subplots(len(kinds), 1, squeeze=False)[:, 0]
    for ax, kind in zip(axes, kinds):
        present = [layer for layer in layers if layer in cells.get(kind, {})]
        kept = [cells[kind][layer][0] for layer in present]
        before = [cells[kind][layer][1] for layer in present]
        positions = list(range(len(present)))
        if all(b is not None for b in before):
            ax.bar(positions, before, color="#d0d7e1", label="before", width=0.8)
        ax.bar(positions, kept, color="#3b6fb6", label="kept", width=0.8)
        ax.set_ylabel(KIND_NAMES.get(kind, kind))
        ax.set_xticks(positions)
        ax.set_xticklabels(present, fontsize=7 if len(present) > 24 else 9)
        ax.set_xlim(-0.6, len(present) - 0.4)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].set_xlabel("layer")
    figure.suptitle(title or "Units kept per layer", fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(handles) > 1:  # one legend for every panel, above them
        figure.legend(handles, labels, loc="upper right", ncol=2, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    from .atomic import atomic_file

    # no Software/version text chunk: the same report gives the same bytes
    atomic_file(path, lambda tmp: figure.savefig(tmp, format="png", metadata={"Software": None}))
    return True


# ------------------------------------------------------------------ writing
def write_card(directory: str | Path, report: dict[str, Any], recipe: dict[str, Any] | None = None, *,
               repo_id: str | None = None) -> Path:
    """README.md (and kept_units.png) in an output folder."""
    from .atomic import write_text

    directory = Path(directory)
    chart = CHART_FILE if write_chart(directory / CHART_FILE, report) else None
    path = directory / CARD_FILE
    write_text(path, card_text(report, recipe, directory=directory, chart=chart, repo_id=repo_id))
    return path


def companion_paths(onnx_path: str | Path) -> dict[str, Path]:
    onnx_path = Path(onnx_path)
    stem = onnx_path.stem
    return {"card": onnx_path.with_name(f"{stem}.README.md"), "recipe": onnx_path.with_name(f"{stem}.recipe.yaml"),
            "chart": onnx_path.with_name(f"{stem}.kept_units.png")}


def write_onnx_companions(onnx_path: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    """The card, recipe and chart of a pruned .onnx file, next to it (NAME.README.md, NAME.recipe.yaml,
    NAME.kept_units.png)."""
    from .atomic import write_text
    from .recipe import write_recipe

    onnx_path = Path(onnx_path)
    paths = companion_paths(onnx_path)
    recipe = report.get("recipe")
    if recipe:
        write_recipe(paths["recipe"], recipe)
    chart = paths["chart"].name if write_chart(paths["chart"], report) else None
    write_text(paths["card"], card_text(report, recipe, chart=chart, onnx_file=onnx_path.name))
    return paths
