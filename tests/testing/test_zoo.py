"""Tests for the tiny model zoo (graphprune.testing.zoo).

Every family must build deterministically, run, export with
``torch.export.export(..., strict=False)`` on CPU and on the meta device, and the
ground-truth pruning groups of ``expected_structure`` must be exact: permuting the units
of a group consistently in all its members leaves the model output unchanged, while
leaving one member out changes it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from graphprune.testing import zoo
from graphprune.testing.zoo import (
    TINY_FAMILIES,
    ParamSlice,
    build_tiny,
    example_inputs,
    expected_structure,
    permute_units,
    save_tiny,
    tiny_cnn,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Run this module's tiny matmuls on one thread.

    On the 2-core CI machine under load, OpenMP with 2 threads makes a 64x64 linear take
    ~15 ms instead of ~30 us (threads spin while waiting for a busy core): the module
    takes minutes instead of seconds.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FAMILIES = sorted(TINY_FAMILIES)
MOE_FAMILIES = sorted(name for name, spec in TINY_FAMILIES.items() if spec.is_moe)

# With 8 tokens and top-2 routing several of the 8 experts get no token, and permuting
# an idle expert's weights cannot be noticed; 64 tokens reach nearly all of them.
PERMUTATION_SEQ_LEN = 64


def _permutation_overrides(family: str) -> dict:
    """Dense families get larger weights than Hugging Face's default std 0.02 so that
    attention is far from uniform and a wrongly permuted q/k row shows clearly. MoE
    families keep 0.02: with larger weights the layer-1 routing collapses onto a few
    experts, and permuting the weights of an expert that gets no token is invisible."""
    return {} if TINY_FAMILIES[family].is_moe else {"initializer_range": 0.1}


# Members whose omission cannot show in the output, although they belong to the group:
# without RoPE, a key bias adds the same q.b_k to every score of a query, and softmax
# is shift invariant (BERT key.bias, GPT-2's k part of c_attn.bias).
UNOBSERVABLE_MEMBERS = {
    ("bert", "key.bias", 0),
    ("gpt2", "c_attn.bias", zoo.HIDDEN_SIZE),
}


def _outputs(model, inputs) -> list[torch.Tensor]:
    """All tensor outputs of a Hugging Face model call (logits, pooler output, ...)."""
    with torch.no_grad():
        result = model(**inputs)
    return [value for value in result.values() if isinstance(value, torch.Tensor)]


def _assert_outputs_close(actual, expected, *, atol=2e-5, rtol=1e-4):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


def _max_difference(actual, expected) -> float:
    return max(float((a - e).abs().max()) for a, e in zip(actual, expected))


# ---------------------------------------------------------------------------------------
# Build / forward / export
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_and_runs(family):
    model, config = build_tiny(family)
    again, _ = build_tiny(family)
    other_seed, _ = build_tiny(family, seed=1)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for (name, a), (_, b), (_, c) in zip(
        model.state_dict().items(), again.state_dict().items(), other_seed.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(), other_seed.state_dict().values()))

    inputs = example_inputs(config, batch_size=2, seq_len=5)
    outputs = _outputs(model, inputs)
    first = outputs[0]
    expected_width = config.vocab_size if TINY_FAMILIES[family].is_decoder else config.hidden_size
    assert first.shape == (2, 5, expected_width)
    assert all(torch.isfinite(o).all() for o in outputs)
    # Small on purpose: the whole zoo must stay fast.
    assert sum(p.numel() for p in model.parameters()) < 250_000


@pytest.mark.parametrize("family", FAMILIES)
def test_export_on_cpu_matches_eager(family):
    model, config = build_tiny(family)
    inputs = example_inputs(config)
    program = torch.export.export(model, (), inputs, strict=False)
    exported = program.module()(**inputs)
    exported_tensors = [v for v in exported.values() if isinstance(v, torch.Tensor)]
    _assert_outputs_close(exported_tensors, _outputs(model, inputs))
    _assert_parameters_are_placeholders(program, model)


def _assert_parameters_are_placeholders(program, model):
    """Every parameter name, tied aliases included, is a placeholder of the program.

    Tied weights are NOT collapsed: e.g. GPT-2 gets both ``p_transformer_wte_weight``
    (unused) and ``p_lm_head_weight`` (used by both embedding and linear).
    """
    signature = program.graph_signature.inputs_to_parameters
    assert set(signature.values()) == {n for n, _ in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_on_meta_device(family):
    model, config = build_tiny(family, device="meta")
    assert all(p.is_meta for p in model.parameters())
    inputs = example_inputs(config, device="meta")
    program = torch.export.export(model, (), inputs, strict=False)
    _assert_parameters_are_placeholders(program, model)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "aten.linear.default" in targets or "aten.addmm.default" in targets


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_implementations_agree(family):
    """batched_mm (the zoo default) and grouped_mm compute the same as the eager loop."""
    eager, config = build_tiny(family, experts_implementation="eager")
    inputs = example_inputs(config, seq_len=PERMUTATION_SEQ_LEN)
    reference = _outputs(eager, inputs)
    for implementation in ("batched_mm", "grouped_mm"):
        model, _ = build_tiny(family, experts_implementation=implementation)
        assert model.config._experts_implementation == implementation
        _assert_outputs_close(_outputs(model, inputs), reference)


def test_grouped_mm_experts_export():
    """grouped_mm exports, but in fp32 under export (is_torchdynamo_compiling() is True)
    transformers routes it to its opaque custom op instead of aten._grouped_mm."""
    model, config = build_tiny("qwen3_moe", experts_implementation="grouped_mm")
    program = torch.export.export(model, (), example_inputs(config), strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "transformers.grouped_mm_fallback.default" in targets
    assert "aten.histc.default" in targets and "aten.sort.default" in targets


def test_eager_experts_do_not_export():
    """The eager experts loop iterates over `nonzero()` hits: data-dependent control flow."""
    model, config = build_tiny("mixtral", experts_implementation="eager")
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(model, (), example_inputs(config), strict=False)


def test_save_tiny_round_trip(tmp_path):
    model, config = build_tiny("qwen2_moe")
    save_tiny("qwen2_moe", tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    # The experts implementation is not saved in config.json: pass it again (the
    # transformers default, grouped_mm, differs from batched_mm by float rounding).
    loaded = TINY_FAMILIES["qwen2_moe"].model_class.from_pretrained(tmp_path, experts_implementation="batched_mm")
    loaded.eval()
    inputs = example_inputs(config)
    _assert_outputs_close(_outputs(loaded, inputs), _outputs(model, inputs), atol=0, rtol=0)


def test_save_tiny_tied_weights(tmp_path):
    model, config = build_tiny("gpt2")
    save_tiny("gpt2", tmp_path)
    loaded = TINY_FAMILIES["gpt2"].model_class.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    inputs = example_inputs(config)
    _assert_outputs_close(_outputs(loaded, inputs), _outputs(model, inputs), atol=0, rtol=0)


def test_overrides_reach_the_config():
    model, config = build_tiny("llama", num_hidden_layers=3, attn_implementation="eager")
    assert len(model.model.layers) == 3
    assert config._attn_implementation == "eager"
    assert len(expected_structure("llama", num_hidden_layers=3)["layers"]) == 3


# ---------------------------------------------------------------------------------------
# Ground truth (expected_structure)
# ---------------------------------------------------------------------------------------


def _groups(structure):
    """(name, group) for every group that can be permuted on its own. Attention heads are
    left out: query_heads and kv_heads must be permuted together (see _head_permutations)."""
    if "groups" in structure:
        yield from structure["groups"].items()
        return
    yield "hidden", structure["hidden"]
    for i, layer in enumerate(structure["layers"]):
        attention = layer["attention"]
        for key in ("q_lora", "kv_lora"):
            if key in attention:
                yield f"layers.{i}.attention.{key}", attention[key]
        mlp = layer["mlp"]
        if mlp["kind"] == "dense":
            yield f"layers.{i}.ffn", mlp["ffn"]
        else:
            yield f"layers.{i}.experts", mlp["experts"]
            for e, group in enumerate(mlp["expert_ffn"]):
                yield f"layers.{i}.expert_ffn.{e}", group
            if mlp["shared_expert"] is not None:
                yield f"layers.{i}.shared_expert", mlp["shared_expert"]


@pytest.mark.parametrize("family", FAMILIES + ["cnn"])
def test_expected_structure_matches_parameters(family):
    structure = expected_structure(family)
    if family == "cnn":
        state = tiny_cnn().state_dict()
    else:
        model, config = build_tiny(family, device="meta")
        state = model.state_dict()
        assert structure["num_layers"] == len(structure["layers"])
        assert structure["hidden_size"] == structure["hidden"]["size"]
        # Tied aliases are state-dict keys that share storage with their canonical name.
        names = {n for n, _ in model.named_parameters()}
        for alias, canonical in structure["tied_parameters"].items():
            assert alias in state and alias not in names and canonical in names
    all_groups = list(_groups(structure))
    if family != "cnn":
        for layer in structure["layers"]:
            all_groups += [("q", layer["attention"]["query_heads"]), ("kv", layer["attention"]["kv_heads"])]
    for name, group in all_groups:
        for member in group["members"]:
            assert isinstance(member, ParamSlice)
            assert member.param in state, (name, member)
            shape = state[member.param].shape
            last = member.unit_indices(group["size"] - 1)
            assert last.stop <= shape[member.dim], (name, member, tuple(shape))
            if member.expert is not None:
                assert member.expert < shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_structure_sizes(family):
    structure = expected_structure(family)
    for layer in structure["layers"]:
        attention = layer["attention"]
        assert attention["query_heads"]["size"] == attention["num_heads"] == zoo.NUM_HEADS
        assert attention["kv_heads"]["size"] == attention["num_kv_heads"]
        mlp = layer["mlp"]
        if mlp["kind"] == "dense":
            assert mlp["ffn"]["size"] == zoo.INTERMEDIATE_SIZE
        else:
            assert mlp["num_experts"] == zoo.NUM_EXPERTS and mlp["top_k"] == zoo.TOP_K
            assert mlp["expert_intermediate_size"] == zoo.MOE_INTERMEDIATE_SIZE
            model, _ = build_tiny(family, device="meta")
            state = model.state_dict()
            for name, shape in mlp["expert_params"].items():
                assert tuple(state[name].shape) == shape
            assert tuple(state[mlp["router"]].shape) == (zoo.NUM_EXPERTS, zoo.HIDDEN_SIZE)
    kinds = [layer["mlp"]["kind"] for layer in structure["layers"]]
    expected_kinds = {"deepseek_v3": ["dense", "moe"]}.get(
        family, ["moe", "moe"] if TINY_FAMILIES[family].is_moe else ["dense", "dense"]
    )
    assert kinds == expected_kinds
    if family in ("qwen2_moe", "deepseek_v3"):
        assert structure["layers"][-1]["mlp"]["shared_expert"] is not None


def _derangement(size: int, generator: torch.Generator) -> list[int]:
    """A random permutation that moves every unit (an identity part would hide errors)."""
    if size == 1:
        return [0]
    while True:
        permutation = torch.randperm(size, generator=generator).tolist()
        if all(p != i for i, p in enumerate(permutation)):
            return permutation


def _random_permutation(size: int, generator: torch.Generator, blocks: int = 1) -> list[int]:
    """A derangement that keeps units inside ``blocks`` contiguous blocks (DeepSeek's
    expert groups: moving an expert to another group would change the routing)."""
    per_block = size // blocks
    order = _derangement(blocks, generator)
    return [b * per_block + j for b in order for j in _derangement(per_block, generator)]


def _head_permutations(attention, generator):
    """Consistent (query-head, kv-head) permutations: kv heads are shuffled, each query
    head follows its kv head, and query heads are also shuffled inside each kv group."""
    per_kv = attention["queries_per_kv"]
    kv_perm = _derangement(attention["num_kv_heads"], generator)
    query_perm = [kv * per_kv + j for kv in kv_perm for j in _derangement(per_kv, generator)]
    return query_perm, kv_perm


def _permutation_cases(structure, generator):
    """(name, [(group, permutation), ...]) cases whose permutation must not change the output."""
    for name, group in _groups(structure):
        yield name, [(group, _random_permutation(group["size"], generator, group.get("expert_groups", 1)))]
    for i, layer in enumerate(structure.get("layers", [])):
        attention = layer["attention"]
        query_perm, kv_perm = _head_permutations(attention, generator)
        yield f"layers.{i}.heads", [(attention["query_heads"], query_perm), (attention["kv_heads"], kv_perm)]


def _family_model_and_inputs(family):
    if family == "cnn":
        model = tiny_cnn()
        images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

        def run(m):
            with torch.no_grad():
                return [m(images)]

        return model, run
    model, config = build_tiny(family, **_permutation_overrides(family))
    inputs = example_inputs(config, seq_len=PERMUTATION_SEQ_LEN)
    return model, lambda m: _outputs(m, inputs)


@contextlib.contextmanager
def _restored_state(model):
    """Undo in-place weight edits made inside the block (cheaper than deepcopy)."""
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)


def _apply(model, case, structure):
    for group, permutation in case:
        permute_units(model, group, permutation)


def _unpermute_hidden_outputs(outputs, structure, name, case):
    """BERT's last_hidden_state is indexed by the hidden channels: undo the permutation."""
    if name != "hidden" or not structure["hidden"].get("is_model_output"):
        return outputs
    permutation = case[0][1]
    inverse = torch.argsort(torch.tensor(permutation))
    return [outputs[0][..., inverse], *outputs[1:]]


@pytest.mark.parametrize("family", FAMILIES + ["cnn"])
def test_expected_groups_are_permutation_invariant(family):
    structure = expected_structure(family)
    model, run = _family_model_and_inputs(family)
    reference = run(model)
    generator = torch.Generator().manual_seed(1)
    for name, case in _permutation_cases(structure, generator):
        with _restored_state(model):
            _apply(model, case, structure)
            outputs = _unpermute_hidden_outputs(run(model), structure, name, case)
        difference = _max_difference(outputs, reference)
        assert difference < 2e-5, f"{family} {name}: permuting the group changed the output by {difference}"


@pytest.mark.parametrize("family", FAMILIES + ["cnn"])
def test_permutation_check_detects_incomplete_groups(family):
    """Leaving any single member out of a group's permutation must change the output,
    i.e. no listed member is superfluous and the invariance test above has teeth."""
    structure = expected_structure(family)
    model, run = _family_model_and_inputs(family)
    routed = _routed_experts(model, run)
    reference = run(model)
    generator = torch.Generator().manual_seed(2)
    for name, case in _permutation_cases(structure, generator):
        for position, (group, permutation) in enumerate(case):
            first = group["members"][0]
            if group["kind"] == "ffn" and first.expert is not None:
                # Permuting an expert that gets no token is invisible. The expert FFN groups
                # of a layer are built alike: two routed experts per layer are enough.
                if first.expert not in routed[first.param][:2]:
                    continue
            for dropped in range(len(group["members"])):
                member = group["members"][dropped]
                if any(family == f and member.param.endswith(suffix) and member.offset == offset
                       for f, suffix, offset in UNOBSERVABLE_MEMBERS):
                    continue
                members = group["members"][:dropped] + group["members"][dropped + 1 :]
                partial = list(case)
                partial[position] = ({**group, "members": members}, permutation)
                with _restored_state(model):
                    _apply(model, partial, structure)
                    outputs = _unpermute_hidden_outputs(run(model), structure, name, partial)
                difference = _max_difference(outputs, reference)
                assert difference > 1e-4, f"{family} {name}: {member} looks superfluous ({difference})"


def _routed_experts(model, run) -> dict[str, list[int]]:
    """gate_up_proj name -> experts that get at least one token in ``run(model)``.

    Every zoo MoE router (``<layer>.mlp.gate``) returns (logits, weights, indices).
    """
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(module, "top_k"):
            def record(module, inputs, output, name=name):
                counts[name] = torch.bincount(output[2].flatten(), minlength=module.num_experts)

            handles.append(module.register_forward_hook(record))
    run(model)
    for handle in handles:
        handle.remove()
    return {
        f"{name[: -len('gate')]}experts.gate_up_proj": [e for e, count in enumerate(hits.tolist()) if count > 0]
        for name, hits in counts.items()
    }


# ---------------------------------------------------------------------------------------
# Tiny CNN
# ---------------------------------------------------------------------------------------


def test_tiny_cnn_runs_and_exports():
    model = tiny_cnn()
    assert not model.training
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, zoo.CNN_CLASSES)
    torch.testing.assert_close(tiny_cnn()(images), logits)
    program = torch.export.export(model, (images,), strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"aten.conv2d.default", "aten.cat.default", "aten.add.Tensor", "aten.linear.default"} <= targets
    torch.testing.assert_close(program.module()(images), logits)
