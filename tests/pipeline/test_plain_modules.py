"""`graphprune.compress` on plain nn.Modules (no Hugging Face config), issue 25: traced on the caller's
`example_inputs`, pruned through BatchNorm, residual adds and a channel concatenation, and returned as
an ordinary module of the same class whose sizes match its tensors. Hand-built models only (no
torchvision / timm)."""

import copy

import pytest
import torch
from torch import nn

import graphprune
from graphprune.errors import CalibrationError, PruningError, UserError

OPTIONS = dict(sparsity=0.3, progress=False, use_cache=False)


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallCNN(nn.Module):
    """Two residual blocks on one stream, a two-branch concatenation, BatchNorm and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.block1, self.block2 = Residual(16), Residual(16)
        self.left, self.right = nn.Conv2d(16, 24, 1), nn.Conv2d(16, 40, 3, padding=1)
        self.fuse, self.bnf = nn.Conv2d(64, 48, 1), nn.BatchNorm2d(48)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        x = torch.relu(self.bnf(self.fuse(x)))
        return self.head(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 5))

    def forward(self, x):
        return self.net(x)


def _built(cls, seed=0):
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():  # BatchNorm with non-trivial statistics, so slicing them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def cnn():
    return _built(SmallCNN)


@pytest.fixture
def images():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("cls, shape", [(SmallCNN, (2, 3, 8, 8)), (MLP, (4, 20))])
def test_magnitude_without_data_prunes_a_plain_module(cls, shape):
    model = _built(cls)
    x = torch.randn(*shape)
    before, training = _state(model), model.training
    result = graphprune.compress(model, example_inputs=(x,), criterion="magnitude", calib="none", **OPTIONS)
    pruned = result.model
    assert type(pruned) is cls and pruned is not model
    assert pruned(x).shape == model(x).shape
    assert result.report["params"]["achieved_sparsity"] == pytest.approx(0.30, abs=0.02)
    assert result.report["compensate"] == "none" and "reads no data" in result.report["target_note"]
    assert _unchanged(model, before) and model.training == training  # compress never writes to its input
    for m in pruned.modules():  # the size attributes say what the tensors hold
        if isinstance(m, nn.Conv2d):
            assert (m.out_channels, m.in_channels) == tuple(m.weight.shape[:2])
        elif isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)
        elif isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.weight.shape[0] == m.running_mean.shape[0] == m.running_var.shape[0]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_pruned_module_round_trips_through_its_state_dict(cnn, images, tmp_path):
    from safetensors.torch import load_file, save_file

    pruned = graphprune.compress(cnn, example_inputs=images, criterion="magnitude", calib="none", **OPTIONS).model
    expected = pruned(images)
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    save_file(pruned.state_dict(), str(tmp_path / "pruned.safetensors"))
    for state in (torch.load(tmp_path / "pruned.pt", weights_only=True), load_file(str(tmp_path / "pruned.safetensors"))):
        fresh = graphprune.load_module(_built(SmallCNN, seed=7), state)  # other weights: all must be replaced
        assert torch.equal(fresh(images), expected)
        assert [tuple(p.shape) for p in fresh.parameters()] == [tuple(p.shape) for p in pruned.parameters()]


def test_out_writes_weights_an_exported_program_and_the_report(cnn, images, tmp_path):
    out = tmp_path / "pruned"
    result = graphprune.compress(cnn, example_inputs=(images,), criterion="magnitude", calib="none", out=str(out),
                                 **OPTIONS)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.pt2", "graphprune_report.json", "graphprune_recipe.yaml", "README.md"} <= names
    expected = result.model(images)
    assert torch.equal(graphprune.load_module(_built(SmallCNN, seed=3), out)(images), expected)
    program = torch.export.load(str(out / "model.pt2")).module()  # no class needed
    assert torch.allclose(program(images), expected, atol=1e-6)
    assert "graphprune.load_module(SmallCNN(...)" in (out / "README.md").read_text()
    assert "float32[2, 3, 8, 8]" in (out / "graphprune_recipe.yaml").read_text()  # described, not the values


def _loader(n=12, batch=4):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=batch)


@pytest.mark.parametrize("kind", ["tensor", "list", "loader"])
def test_data_criteria_calibrate_on_the_modules_own_inputs(cnn, images, kind):
    data = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    calib = {"tensor": data, "list": list(data.split(4)), "loader": _loader()}[kind]
    before = _state(cnn)
    result = graphprune.compress(cnn, example_inputs=(images,), criterion="wanda-sp", calib=calib, **OPTIONS)
    note = result.report["calibration"]
    assert note["source"].startswith("python:inputs(") and note["samples"] == 12
    assert result.model(images).shape == (2, 10)
    assert result.report["params"]["achieved_sparsity"] > 0.2
    assert "least squares" in result.report["target_note"]  # why there is no lsq default here
    assert _unchanged(cnn, before)


def test_flap_compensates_conv_and_linear_consumers_with_their_mean(cnn, images):
    result = graphprune.compress(cnn, example_inputs=(images,), criterion="flap", calib=_loader(), **OPTIONS)
    assert result.report["compensate"] == "bias" and result.report["compensated_layers"] > 0
    assert torch.isfinite(result.model(images)).all()
    # the same units without compensation: the mean-compensated model is closer to the dense one
    plain = graphprune.compress(cnn, example_inputs=(images,), criterion="flap", calib=_loader(), compensate="none",
                                removed=result.removed, **OPTIONS).model
    x = torch.cat([b[0] for b in _loader()])
    with torch.no_grad():
        dense = cnn(x)
        assert (result.model(x) - dense).pow(2).mean() < (plain(x) - dense).pow(2).mean()


def test_refusals_are_one_line_and_leave_the_module_unchanged(cnn, images):
    before = _state(cnn)
    cases = [
        (dict(criterion="magnitude", calib="none"), UserError, "example_inputs"),
        (dict(example_inputs=[1, 2], criterion="magnitude", calib="none"), UserError, "example_inputs= takes"),
        (dict(example_inputs="x", criterion="magnitude", calib="none"), UserError, "example_inputs= takes"),
        (dict(example_inputs=(images,), criterion="wanda-sp"), CalibrationError, "calib= a tensor"),
        (dict(example_inputs=(images,), criterion="flap", calib="none"), CalibrationError, "calib= a tensor"),
        (dict(example_inputs=(images,), criterion="flap", calib=images, compensate="lsq"), PruningError,
         "plain nn.Module"),
        (dict(example_inputs=(images,), criterion="taylor", calib=images), PruningError, "plain nn.Module"),
    ]
    for options, error, words in cases:
        with pytest.raises(error, match=words) as caught:
            graphprune.compress(cnn, **options, **OPTIONS)
        assert "\n" not in str(caught.value)
        assert _unchanged(cnn, before)


def test_calibration_batches_that_do_not_fit_the_module_are_named(cnn, images):
    with pytest.raises(CalibrationError, match="calibration batch 0 .* does not run through SmallCNN"):
        graphprune.compress(cnn, example_inputs=(images,), criterion="wanda-sp", calib=torch.randn(4, 5, 8, 8),
                            **OPTIONS)


def test_the_default_pipeline_of_a_plain_module(cnn, images):
    assert graphprune.compress(cnn, example_inputs=(images,), **OPTIONS).report["criterion"] == "magnitude"
    result = graphprune.compress(cnn, example_inputs=(images,), calib=_loader(), **OPTIONS)
    assert (result.report["criterion"], result.report["compensate"]) == ("flap", "bias")
