"""`graphprune.compress(calib=...)` from Python: a list of texts, a datasets.Dataset (text_column), a
LongTensor [N, T], a DataLoader and a forward loop. Each is calibrated on exactly what it holds: the
calibration windows' digest equals that of the equivalent file or tensor."""

import pytest
import torch

import graphprune
from graphprune.calibration.sets import content_digest
from graphprune.errors import CalibrationError
from graphprune.testing.fixtures import SAMPLE_TEXT, save_tiny_llama

TEXTS = [SAMPLE_TEXT * 3, SAMPLE_TEXT[::-1] * 3, SAMPLE_TEXT.upper() * 3]
OPTIONS = dict(criterion="flap", sparsity=0.3, nsamples=4, seqlen=16, progress=False, use_cache=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(2, 250, (4, 16), generator=torch.Generator().manual_seed(0))


def calibrated(model_dir, calib, **extra):
    return graphprune.compress(model_dir, calib=calib, **OPTIONS, **extra).report["calibration"]


def test_a_list_of_texts_is_cut_like_a_file_of_them(model_dir, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n\n".join(TEXTS), encoding="utf-8")
    note = calibrated(model_dir, TEXTS)
    assert note["source"].startswith("python:texts(3 texts")
    assert note["sha256"] == calibrated(model_dir, str(path))["sha256"]


def test_a_dataset_gives_the_texts_of_its_text_column(model_dir):
    import datasets

    table = datasets.Dataset.from_dict({"id": [1, 2, 3], "content": TEXTS})
    note = calibrated(model_dir, table, text_column="content")
    assert note["source"].startswith("python:dataset(3 rows of column 'content'")
    assert note["sha256"] == calibrated(model_dir, TEXTS)["sha256"]
    with pytest.raises(CalibrationError, match="no column 'body'"):
        calibrated(model_dir, table, text_column="body")


def test_a_long_tensor_is_used_as_the_windows(model_dir, tokens):
    note = calibrated(model_dir, tokens)
    assert note["source"].startswith("python:tokens(4x16 tokens")
    assert note["sha256"] == content_digest(tokens)


def test_a_dataloader_and_a_forward_loop_give_the_same_windows(model_dir, tokens):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(tokens), batch_size=2)
    assert calibrated(model_dir, loader)["sha256"] == content_digest(tokens)
    dict_batches = [{"input_ids": tokens[:2], "attention_mask": torch.ones(2, 16)}, {"input_ids": tokens[2:]}]
    assert calibrated(model_dir, dict_batches)["sha256"] == content_digest(tokens)
    seen = []

    def forward_loop(model):
        for batch in tokens.split(2):
            seen.append(model(input_ids=batch).logits.shape)

    note = calibrated(model_dir, forward_loop)
    assert note["source"].startswith("python:forward-loop(") and note["sha256"] == content_digest(tokens)
    assert seen == [torch.Size([2, 16, 258])] * 2  # the loop ran once, on the model


def test_padding_is_removed_and_rows_of_other_lengths_are_joined_like_text(model_dir, tokens):
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 12:] = 0
    note = calibrated(model_dir, [{"input_ids": tokens, "attention_mask": mask}])
    assert note["sha256"] != content_digest(tokens)  # 16+16+16+12 tokens, cut into 4 windows of 16 at seeded offsets


def test_unusable_python_data_is_refused_in_one_line(model_dir):
    with pytest.raises(CalibrationError, match="token ids"):
        calibrated(model_dir, torch.rand(2, 8))
    with pytest.raises(CalibrationError, match="empty list"):
        calibrated(model_dir, [])
    with pytest.raises(CalibrationError, match="calib= takes"):
        calibrated(model_dir, 3.5)


def test_the_command_line_keeps_its_specs():
    from graphprune.pipeline.options import CompressOptions

    assert CompressOptions(calib=("a b.txt", "c.txt"), target="experts").resolved().calib == ["a b.txt", "c.txt"]
    assert CompressOptions(calib=["news.txt", "wiki.txt"], target="experts").resolved().calib == ["news.txt", "wiki.txt"]
    assert CompressOptions(calib="default").resolved().calib == "default"
