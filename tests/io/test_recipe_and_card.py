"""Every output carries its recipe (graphprune_recipe.yaml, replayed by `compress --config`) and its
model card (README.md with HF metadata and kept_units.png): uniform, per-layer, encoder and ONNX
outputs; bad recipes and --push-to-hub offline are refused in one line before any work."""

import json

import pytest
import yaml

from graphprune.cli import main as cli

MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_recipe_replay_gives_byte_identical_model_files(model_dir, calib, tmp_path, capsys):
    first, again, changed = tmp_path / "first", tmp_path / "again", tmp_path / "changed"
    code, out, err = run(capsys, "-q", "compress", model_dir, "--criterion", "flap", "--sparsity", "0.3", "--calib",
                         calib, "--nsamples", "4", "--seqlen", "16", "--out", first)
    assert code == 0, err
    recipe = yaml.safe_load((first / "graphprune_recipe.yaml").read_text())
    assert recipe["source"] == {"kind": "path", "model": str(model_dir.resolve()), "sha256": recipe["source"]["sha256"]}
    assert recipe["options"]["criterion"] == "flap" and recipe["options"]["calib"] == str(calib.resolve())
    assert recipe["run"]["compensate"] == "lsq" and recipe["run"]["allocation"] == "global"  # resolved by the driver
    assert {"torch", "transformers", "graphprune", "python"} <= set(recipe["packages"])
    assert recipe["command"] == (f"graphprune compress {model_dir.resolve()} --criterion flap --sparsity 0.3 "
                                 f"--calib {calib.resolve()} --nsamples 4 --seqlen 16 --out DIR")
    assert "out" not in recipe["options"] and "force" not in recipe["options"]  # where it went is not a recipe
    code, out, err = run(capsys, "compress", "--config", first / "graphprune_recipe.yaml", "--out", again, "-q")
    assert code == 0, err
    for name in MODEL_FILES:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    # the recipe and the card do not depend on where the output went either
    for name in ("graphprune_recipe.yaml", "README.md", "kept_units.png", "graphprune_report.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    # a flag next to --config overrides the recipe's value; the folder itself is accepted as --config
    code, out, err = run(capsys, "compress", "--config", first, "--sparsity", "0.5", "--out", changed, "-q")
    assert code == 0, err
    assert json.loads((changed / "graphprune_report.json").read_text())["requested_sparsity"] == 0.5
    assert yaml.safe_load((changed / "graphprune_recipe.yaml").read_text())["options"]["nsamples"] == 4
    code, out, err = run(capsys, "compress", "--config", first)
    assert code == 2 and "--out is required" in err and "a recipe never says where" in err, err


def test_uniform_output_card(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "uniform"
    code, _, err = run(capsys, "-q", "compress", model_dir, "--criterion", "flap", "--sparsity", "0.3", "--calib",
                       calib, "--nsamples", "4", "--seqlen", "16", "--allocation", "uniform", "--out", out)
    assert code == 0, err
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"graphprune", "pruned", "structured-pruning", "flap"} <= set(meta["tags"])
    report = json.loads((out / "graphprune_report.json").read_text())
    p = report["params"]
    assert f"| parameters | {p['before']:,} | {p['after']:,} |" in card
    assert "| FLOPs per token |" in card and "## Kept units per layer" in card
    channels = report["kept_units"]["channel"]["0"]
    assert "| 0 | " in card and f"{channels} / 96" in card  # kept / before, per layer
    assert "![Units kept per layer](kept_units.png)" in card
    assert (out / "kept_units.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AutoModelForCausalLM.from_pretrained" in card and "graphprune compress --config" in card
    assert "None yet" in card  # no evaluation measured yet
    assert "recipe" not in report  # the recipe has its own file


def test_per_layer_output_card_says_how_to_load(model_dir, tmp_path, capsys):
    out = tmp_path / "per-layer"
    code, _, err = run(capsys, "-q", "compress", model_dir, "--criterion", "magnitude", "--sparsity", "0.3",
                       "--allocation", "global", "--out", out)
    assert code == 0, err
    assert json.loads((out / "graphprune_report.json").read_text())["uniform_layers"] is False
    card = (out / "README.md").read_text()
    assert "graphprune.load_pruned" in card and "graphprune_layer_overrides" in card
    assert "AutoModelForCausalLM.from_pretrained" not in card


def test_encoder_output_card(tmp_path):
    import graphprune
    from graphprune.testing.encoders import save_tiny_sentence_transformer, write_pair_file

    st = save_tiny_sentence_transformer(tmp_path / "st")
    pairs = write_pair_file(tmp_path / "pairs.jsonl", 40)
    out = tmp_path / "encoder"
    graphprune.compress(str(st), criterion="flap", sparsity=0.3, calib=str(pairs), nsamples=8, seqlen=16, out=out,
                        progress=False)
    meta = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "SentenceTransformer(" in (out / "README.md").read_text()
    assert yaml.safe_load((out / "graphprune_recipe.yaml").read_text())["options"]["calib"] == str(pairs.resolve())


def test_onnx_output_has_card_and_recipe_beside_it(model_dir, tmp_path):
    import graphprune
    from graphprune.io.onnx_export import export_onnx

    export_onnx(graphprune.load_model(str(model_dir)).model, tmp_path / "dense", tokenizer=None)
    out = tmp_path / "small.onnx"
    result = graphprune.compress(str(tmp_path / "dense" / "model.onnx"), criterion="magnitude", sparsity=0.3,
                                 out=out, progress=False)
    card = (tmp_path / "small.README.md").read_text()
    assert front_matter(card)["library_name"] == "onnx" and "onnxruntime.InferenceSession" in card
    assert "small.recipe.yaml" in card and "## Kept units per layer" in card
    recipe = yaml.safe_load((tmp_path / "small.recipe.yaml").read_text())
    assert recipe["run"]["backend"] == "onnx" and recipe["command"].endswith("--criterion magnitude --sparsity 0.3 "
                                                                             "--out DIR")
    assert (tmp_path / "small.kept_units.png").is_file()
    assert result.report["recipe"] == recipe


BAD_CONFIGS = [
    ("missing", None, "does not exist"),
    ("not yaml", "a: [b\n", "not valid YAML"),
    ("not a recipe", "criterion: flap\n", "not a graphprune recipe"),
    ("unknown option", "graphprune_recipe: 1\nsource: {model: x}\noptions: {sparsity: 0.3, sparsty: 1}\n",
     "does not know: sparsty"),
    ("in-memory source", "graphprune_recipe: 1\nsource: {kind: object, model: null, class: Net}\noptions: {}\n",
     "in-memory Net"),
    ("python calibration", "graphprune_recipe: 1\nsource: {model: /x}\noptions: {calib: {python: texts, sha256: ab}}\n",
     "give it with --calib"),
]


@pytest.mark.parametrize("label,content,needle", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_is_refused_in_one_line(label, content, needle, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    if content is not None:
        recipe.write_text(content)
    code, out, err = run(capsys, "compress", "--config", recipe, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_push_to_hub_is_refused_offline_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "compress", model_dir, "--out", tmp_path / "out", "--push-to-hub", "me/pruned")
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE" in err, err
    code, out, err = run(capsys, "compress", model_dir, "--out", tmp_path / "out", "--push-to-hub", "not a repo")
    assert code == 2 and "not a Hub repository id" in err, err
    assert not (tmp_path / "out").exists()


def test_push_uploads_the_folder_with_a_card_that_loads_from_the_repo(model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    import graphprune
    from graphprune.io.hub import push_output

    out = tmp_path / "out"
    result = graphprune.compress(str(model_dir), criterion="magnitude", sparsity=0.3, allocation="uniform", out=out,
                                 progress=False)
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hf.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    assert push_output(out, "me/tiny-pruned", private=True, report=result.report) == "https://hf.co/me/tiny-pruned"
    assert calls[0] == ("create", "me/tiny-pruned", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1] == ("upload", "me/tiny-pruned", str(out))
    assert 'from_pretrained("me/tiny-pruned")' in (out / "README.md").read_text()


def test_onnx_without_onnxruntime_names_the_extras(monkeypatch):
    import sys

    from graphprune.errors import UserError
    from graphprune.io.onnx_files import session

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'graphprune\[cpu\]' \(or 'graphprune\[gpu\]'"):
        session(b"")
