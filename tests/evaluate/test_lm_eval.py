"""`graphprune eval DIR --tasks ...` through lm-evaluation-harness, offline, on a local task (a small
JSON multiple-choice set and its task YAML, written here) and a per-layer pruned model; the results
go into the output's report and model card."""

import json
import os
import subprocess
import sys

import pytest

import graphprune
from graphprune.testing.fixtures import save_tiny_llama

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the eval and test extras")

TASK_YAML = """task: graphprune_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"Question {i}: where does the river flow?", "answer": i % 2,
             "choices": ["south to the sea", "up into the hills", "into the sky"]} for i in range(6)]
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=folder / "tiny_mc.jsonl"))
    return folder


@pytest.fixture(scope="module")
def per_layer_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_llama(root / "tiny")
    out = root / "pruned"
    result = graphprune.compress(str(model), criterion="magnitude", sparsity=0.3, allocation="global", out=out,
                                 progress=False)
    assert result.report["uniform_layers"] is False  # the per-layer loader is what lm-eval gets
    return out


def test_lm_eval_on_a_local_task_is_recorded_in_the_report_and_card(per_layer_output, task_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    result = subprocess.run([sys.executable, "-m", "graphprune.cli", "eval", str(per_layer_output), "--tasks",
                             "graphprune_tiny_mc", "--include-path", str(task_dir), "--limit", "4", "--json"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)  # --json: stdout is the results only
    accuracy = shown["tasks"]["graphprune_tiny_mc"]["acc"]
    assert 0.0 <= accuracy <= 1.0
    report = json.loads((per_layer_output / "graphprune_report.json").read_text())
    assert report["evaluation"] == [{"kind": "lm-eval", "task": "graphprune_tiny_mc", "metric": "acc",
                                     "value": accuracy, "stderr": report["evaluation"][0]["stderr"],
                                     "settings": "limit 4"}]
    card = (per_layer_output / "README.md").read_text()
    assert f"| lm-eval | graphprune_tiny_mc | acc | {accuracy:.4f}" in card
    assert "None yet" not in card


def test_unknown_task_and_missing_task_folder_are_refused_in_one_line(per_layer_output, task_dir, tmp_path, capsys):
    from graphprune.cli import main as cli

    code = cli.main(["eval", str(per_layer_output), "--tasks", "graphprune_tiny_mx", "--include-path", str(task_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean 'graphprune_tiny_mc'" in err, err
    code = cli.main(["eval", str(per_layer_output), "--tasks", "x", "--include-path", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a directory" in err, err
    code = cli.main(["eval", str(per_layer_output)])
    err = capsys.readouterr().err
    assert code == 2 and "--data FILE" in err and "--tasks TASKS" in err, err


def test_eval_tasks_without_lm_eval_names_the_extra(per_layer_output, capsys, monkeypatch):
    import sys

    from graphprune.cli import main as cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    code = cli.main(["eval", str(per_layer_output), "--tasks", "arc_easy"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'graphprune[eval]'" in err, err
