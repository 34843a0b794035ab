"""The capability matrix (`graphprune criteria --matrix`) is true: every cell it calls "works" prunes a
tiny model on that backend, and every refused cell is refused by the run itself with the matrix's
reason, before any work."""

from __future__ import annotations

import pytest

from graphprune.backends.matrix import cells, render_markdown
from graphprune.errors import UserError
from graphprune.pipeline.run import compress
from graphprune.testing.fixtures import byte_level_tokenizer, save_tiny_llama, write_sample_text
from graphprune.testing.zoo import save_tiny

CELLS = cells()
SMALL = {"nsamples": 4, "seqlen": 16, "progress": False, "use_cache": False, "sparsity": 0.3}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from graphprune.io.onnx_export import export_onnx
    from graphprune.models import load_model

    root = tmp_path_factory.mktemp("matrix")
    llama = save_tiny_llama(root / "llama", layers=1, intermediate=32)
    moe = save_tiny("mixtral", root / "moe")
    onnx_dir = root / "onnx"
    loaded = load_model(llama)
    export_onnx(loaded.model, onnx_dir, tokenizer=loaded.tokenizer)
    calib = write_sample_text(root / "calib.txt")
    return {"llama": llama, "moe": moe, "onnx": onnx_dir / "model.onnx", "calib": calib, "root": root}


def _run(cell, sources, tmp_path):
    options = dict(SMALL, criterion=cell.criterion, compensate=cell.compensate, sequential=cell.sequential,
                   calib=str(sources["calib"]))
    if cell.criterion == "gaprune":
        options["calib_general"] = str(sources["calib"])
    source = sources["llama"]
    if cell.criterion in ("easyep", "reap", "frequency", "random"):
        # a refused expert criterion is refused for what it needs, before any model is looked at
        source = sources["moe"] if cell.works else source
        options["target"], options["sparsity"] = "experts", 0.5
    if cell.backend == "onnx":
        source = sources["onnx"]
    if cell.backend in ("stream", "onnx"):
        options["out"] = tmp_path / ("out.onnx" if cell.backend == "onnx" else "out")
    options["backend"] = cell.backend
    return compress(str(source), tokenizer=byte_level_tokenizer() if cell.backend == "memory" else None, **options)


@pytest.mark.parametrize("cell", [c for c in CELLS if c.works],
                         ids=lambda c: f"{c.backend}-{c.criterion}-{c.compensation_label.replace(' ', '')}")
def test_a_working_cell_prunes(cell, sources, tmp_path):
    result = _run(cell, sources, tmp_path)
    p = result.report["params"]
    assert p["layers_after"] < p["layers_before"]
    assert result.report["compensate"] == cell.compensate or cell.criterion in ("easyep", "reap", "frequency",
                                                                               "random")


@pytest.mark.parametrize("cell", [c for c in CELLS if not c.works and c.backend != "memory"][:12],
                         ids=lambda c: f"{c.backend}-{c.criterion}-{c.compensation_label.replace(' ', '')}")
def test_a_refused_cell_is_refused_with_the_matrix_reason(cell, sources, tmp_path):
    with pytest.raises(UserError) as refused:
        _run(cell, sources, tmp_path)
    assert cell.refusal in str(refused.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.onnx").exists()


def test_the_matrix_renders_every_backend_and_criterion():
    text = render_markdown(CELLS)
    for backend in {c.backend for c in CELLS}:
        assert f"backend `{backend}`" in text
    for criterion in {c.criterion for c in CELLS}:
        assert f"| {criterion} |" in text
    # streaming and ONNX keep at least what they supported before the one-pipeline redesign
    works = {(c.backend, c.criterion, c.compensate, c.sequential) for c in CELLS if c.works}
    for criterion in ("flap", "wanda-sp", "magnitude", "cfsp"):
        for compensate in ("none", "bias"):
            assert ("stream", criterion, compensate, False) in works
    for criterion in ("flap", "wanda-sp", "magnitude"):
        assert ("onnx", criterion, "bias", False) in works
