"""Expert criteria on self-generated calibration: `--target experts --calib none` (issue 6, MoE part)."""

import json
import os
import subprocess
import sys

import pytest

import graphprune.calibration.selfgen as selfgen
from graphprune.pipeline.run import compress
from graphprune.testing.fixtures import byte_level_tokenizer
from graphprune.testing.zoo import build_tiny


def prune_experts_without_data(model, criterion, seed, **options):
    return compress(model, target="experts", criterion=criterion, sparsity=0.5, calib="none",
                    tokenizer=byte_level_tokenizer(), nsamples=6, seqlen=24, seed=seed, progress=False,
                    use_cache=False, **options)


@pytest.mark.parametrize("criterion", ["easyep", "reap"])
def test_same_seed_gives_the_same_kept_experts_and_the_generated_text_is_recorded(criterion):
    model, _ = build_tiny("qwen2_moe")
    first, second = (prune_experts_without_data(model, criterion, seed=5) for _ in range(2))
    assert first.report["experts"]["removed_per_layer"] == second.report["experts"]["removed_per_layer"]
    cal = first.report["calibration"]
    assert cal["sources"] == ["none"] and cal["generation"]["method"] == "self-generated"
    assert cal["generation"]["seed"] == 5
    assert cal["generated_text"] == second.report["calibration"]["generated_text"]
    assert len(cal["generated_text"]) == 6 and all(isinstance(t, str) and t for t in cal["generated_text"])


def test_another_seed_generates_other_text():
    model, _ = build_tiny("mixtral")
    texts = [prune_experts_without_data(model, "easyep", seed).report["calibration"]["generated_text"]
             for seed in (0, 1)]
    assert texts[0] != texts[1]


def test_criteria_that_need_no_routing_statistics_never_generate(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("random scores experts without data: nothing may be generated")

    monkeypatch.setattr(selfgen, "generate_calibration", refuse)
    model, _ = build_tiny("mixtral")
    result = prune_experts_without_data(model, "random", seed=0)
    assert result.report["calibration"] is None
    assert result.report["experts"]["experts_removed"] == 8


def test_experts_and_channels_both_calibrate_on_text_the_model_wrote():
    model, _ = build_tiny("qwen3_moe")
    result = compress(model, target="experts,channels", expert_criterion="reap", expert_sparsity=0.25,
                      criterion="flap", sparsity=0.1, compensate="none", allocation="uniform", calib="none",
                      tokenizer=byte_level_tokenizer(), nsamples=6, seqlen=24, seed=2, progress=False,
                      use_cache=False)
    assert result.report["experts"]["calibration"]["generation"]["method"] == "self-generated"
    # the channel stage generates again, from the expert-pruned model it prunes
    assert result.report["calibration"]["generation"]["method"] == "self-generated"
    assert result.report["kept_units"]["expert"] == {"0": 6, "1": 6}


def test_cli_says_the_expert_calibration_was_generated(tmp_path):
    model_dir = tmp_path / "mixtral"
    build_tiny("mixtral")[0].save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRAPHPRUNE_CALIB_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-m", "graphprune", "compress", str(model_dir), "--target", "experts",
                           "--criterion", "easyep", "--sparsity", "0.25", "--calib", "none", "--nsamples", "4",
                           "--seqlen", "24", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "the model generated its own 4x24 tokens" in proc.stdout
    report = json.loads((out / "graphprune_report.json").read_text())
    assert len(report["experts"]["calibration"]["generated_text"]) == 4
    assert report["kept_units"]["expert"] == {"0": 6, "1": 6}
