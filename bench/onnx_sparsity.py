"""Issue 20 (item 6) benchmark: ONNX files written by `torch.onnx.export` itself (weights called
``onnx::MatMul_123`` / ``val_42``, not after their layers) pruned with `graphprune compress --sparsity 0.3`,
the layer parameters counted on the files: before (the input .onnx) and after (the written .onnx).

    python -m bench.onnx_sparsity                                   # SmolLM2, TorchScript
    python -m bench.onnx_sparsity --models smollm2-135m,minilm-l6 --exporters torchscript,dynamo

Which initializers are layer parameters comes from the input file's graph (`graph.blocks`); the
"after" column sums the same initializers of the output file. The report's own number (read from
the output's ``graphprune_report`` metadata) is printed next to it. Writes
bench/results/onnx_sparsity.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, markdown_table

COLUMNS = [("model", "model"), ("exporter", "exporter"), ("layer params before", "layers_before"),
           ("after (file)", "layers_after"), ("achieved (file)", "achieved"), ("report says", "reported"),
           ("file MB before", "mb_before"), ("file MB after", "mb_after"), ("prune s", "seconds")]


def initializer_sizes(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}


def file_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return round((path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2**20, 2)


def one(alias: str, exporter: str, work: Path, sparsity: float) -> dict:
    import onnx

    from graphprune.graph.blocks import layer_parameters
    from graphprune.graph.trace_onnx import analyze_onnx
    from graphprune.models import load_model
    from graphprune.testing.raw_onnx import export_raw

    path = work / f"{alias}-{exporter}.onnx"
    out = work / f"{alias}-{exporter}-pruned.onnx"
    model = load_model(alias).model
    started = time.perf_counter()
    export_raw(model, path, dynamo=exporter == "dynamo")
    exported = time.perf_counter() - started
    del model
    before = initializer_sizes(path)
    layers = layer_parameters(analyze_onnx(str(path)))
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "graphprune", "compress", str(path), "--criterion", "magnitude",
                          "--sparsity", str(sparsity), "--out", str(out), "--force"],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    row = {"model": alias, "exporter": exporter, "export_s": round(exported, 1), "seconds": round(seconds, 1),
           "raw_names": sum(1 for n in layers if n.startswith(("onnx::", "val_"))), "layer_tensors": len(layers),
           "layers_before": sum(before[n] for n in layers), "mb_before": file_mb(path)}
    if run.returncode != 0:
        row["error"] = (run.stderr.strip().splitlines() or ["?"])[-1]
        return row
    after = initializer_sizes(out)
    row["layers_after"] = sum(after.get(n, 0) for n in layers)
    row["achieved"] = round(1 - row["layers_after"] / row["layers_before"], 4)
    row["mb_after"] = file_mb(out)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    report = json.loads(meta.get("graphprune_report", "{}"))
    row["reported"] = round(report.get("params", {}).get("achieved_sparsity", float("nan")), 4)
    row["report_params"] = report.get("params")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--exporters", default="torchscript")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--work", default=None, help="folder for the .onnx files (default: a temporary one)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for alias in args.models.split(","):
            for exporter in args.exporters.split(","):
                row = one(alias.strip(), exporter.strip(), work, args.sparsity)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(markdown_table(rows, COLUMNS))
    for row in rows:
        if "error" in row:
            print(f"{row['model']} / {row['exporter']}: {row['error']}")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "onnx_sparsity.json").write_text(json.dumps({"sparsity": args.sparsity, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
