"""Embedding models: pair calibration, the InfoNCE Fisher and GAPrune criteria, retrieval evaluation,
and pruned encoders that reload through sentence-transformers."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from graphprune import criteria
from graphprune.calibration.sets import calibration_set
from graphprune.criteria.base import ScoringContext
from graphprune.calibration.pairs import Pair, load_pairs, pairs_from_text, read_pairs, split_of
from graphprune.models.encoders import Pooling, embed, pooling_of, tokenize
from graphprune.evaluate.retrieval import retrieval
from graphprune.errors import CalibrationError, UserError
from graphprune.io.hf import save_pruned
from graphprune.graph import analyze
from graphprune.calibration.gradients import unit_alignment, unit_gradients
from graphprune.models import load_model
from graphprune.backends.memory import all_params
from graphprune.pipeline.run import compress
from graphprune.testing.encoders import save_tiny_sentence_transformer, write_pair_file
from graphprune.testing.fixtures import SAMPLE_TEXT, save_tiny_llama, write_sample_text


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    return save_tiny_sentence_transformer(tmp_path_factory.mktemp("st") / "tiny-st")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"domain": write_pair_file(root / "domain.jsonl", 60, seed=1),
            "general": write_pair_file(root / "general.tsv", 60, seed=2)}


def hand_info_nce(model, tokenizer, batch, temperature=0.05):
    """InfoNCE written out: mean pooling over real tokens, cosine matrix, -log softmax of the diagonal."""
    def sentence(texts):
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        return torch.stack([hidden[i, enc["attention_mask"][i].bool()].mean(0) for i in range(len(texts))])

    q = sentence([p.query for p in batch])
    d = sentence([p.positive for p in batch])
    cos = torch.stack([torch.stack([qi @ dj / (qi.norm() * dj.norm()) for dj in d]) for qi in q]) / temperature
    return torch.stack([torch.logsumexp(cos[i], 0) - cos[i, i] for i in range(len(batch))]).mean()


# ----------------------------------------------------------------------------- pairs
def test_pairs_from_text_take_the_first_sentence_as_query_and_the_rest_as_positive():
    text = ("= Rivers =\n\nThe river rises in the northern hills. It flows south through farmland. "
            "It reaches the sea.\n\nA heading only\n\nOne sentence paragraph without a second one here\n\n"
            "Short. Too short to be a query.\n")
    assert pairs_from_text(text) == [Pair("The river rises in the northern hills.",
                                          "It flows south through farmland. It reaches the sea.")]


def test_jsonl_tsv_and_text_sources(tmp_path):
    jsonl = write_pair_file(tmp_path / "p.jsonl", 10)
    tsv = write_pair_file(tmp_path / "p.tsv", 10)
    assert read_pairs(jsonl) == read_pairs(tsv) and len(read_pairs(jsonl)) == 10
    assert read_pairs(write_sample_text(tmp_path / "t.txt", repeats=1)) == pairs_from_text(SAMPLE_TEXT)
    assert len(read_pairs("default")) > 100  # the embedded excerpt serves as a fallback


def test_calibration_and_evaluation_pairs_never_overlap(tmp_path):
    lines = [json.dumps({"query": f"query {i} about rivers", "positive": f"answer {i} about the sea"})
             for i in range(300)]
    forward = tmp_path / "forward.jsonl"
    forward.write_text("\n".join(lines + lines[:50]) + "\n")  # duplicates must land on one side
    backward = tmp_path / "backward.jsonl"
    backward.write_text("\n".join(reversed(lines)) + "\n")
    calib = set(load_pairs(forward, "calibration"))
    evaluation = set(load_pairs(forward, "evaluation"))
    assert not calib & evaluation
    assert calib | evaluation == set(read_pairs(forward))
    assert 0.1 < len(evaluation) / 300 < 0.3
    # The side of a pair depends on its text only: not on file order, seed or how many are asked for.
    assert set(load_pairs(backward, "evaluation", seed=7)) == evaluation
    assert set(load_pairs(forward, "calibration", limit=20, seed=3)) <= calib
    assert all(split_of(p) == "evaluation" for p in evaluation)
    derived_calib = set(load_pairs("default", "calibration"))
    assert not derived_calib & set(load_pairs("default", "evaluation"))


@pytest.mark.parametrize("name, content, needle", [
    ("empty.jsonl", "", "is empty"),
    ("blank.tsv", "\n\n  \n", "is empty"),
    ("bad.jsonl", '{"query": "a b", "positive": "c d"}\n\n{"query": "x", "positive": \n', "line 3: not valid JSON"),
    ("keys.jsonl", '{"question": "a", "answer": "b"}\n', 'line 1: needs non-empty string fields "query" and "positive"'),
    ("array.jsonl", '["a", "b"]\n', "line 1: expected a JSON object"),
    ("cols.tsv", "a\tb\nonly one field\n", "line 2: expected two non-empty tab-separated fields"),
    ("headings.txt", "= Title =\n\nNo second sentence here at all\n", "no paragraph with two sentences"),
])
def test_bad_pair_files_name_the_problem(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationError, match=needle):
        load_pairs(path, "calibration")


def test_a_pair_file_too_small_for_the_evaluation_side_says_so(tmp_path):
    path = tmp_path / "one.jsonl"
    pair = Pair("query words are here", "positive words are here")
    path.write_text(json.dumps({"query": pair.query, "positive": pair.positive}) + "\n")
    other = "evaluation" if split_of(pair) == "calibration" else "calibration"
    with pytest.raises(CalibrationError, match=f"none on the {other} side"):
        load_pairs(path, other)


# ----------------------------------------------------------------------------- pooling and retrieval
def test_pooling_follows_the_sentence_transformers_config(tmp_path, st_dir):
    assert pooling_of(st_dir) == Pooling("mean", normalize=True)
    assert pooling_of(save_tiny_sentence_transformer(tmp_path / "cls", pooling="cls")).mode == "cls"
    assert pooling_of(None) == Pooling("mean", normalize=False)


def test_retrieval_ranks_each_query_among_all_positives(st_dir, data):
    loaded = load_model(st_dir)
    pairs = load_pairs(data["domain"], "all")[:12]
    result = retrieval(loaded.model, loaded.tokenizer, pairs, pooling_of(st_dir))
    with torch.no_grad():
        q = embed(loaded.model, tokenize(loaded.tokenizer, [p.query for p in pairs], 64), Pooling())
        d = embed(loaded.model, tokenize(loaded.tokenizer, [p.positive for p in pairs], 64), Pooling())
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
    ranks = [1 + int((sims[i] > sims[i, i]).sum()) for i in range(len(pairs))]
    assert result.pairs == 12
    assert list(result.ranks) == ranks  # per query, for paired comparisons between models
    assert result.recall_at_1 == pytest.approx(np.mean([r == 1 for r in ranks]))
    assert result.mrr == pytest.approx(np.mean([1 / r for r in ranks]), abs=1e-9)


def test_encoder_activation_windows_are_framed_like_encoder_inputs(st_dir, data):
    loaded = load_model(st_dir)
    tok = loaded.tokenizer
    calib = calibration_set(loaded.model, tok, data["domain"], encoder=True, pooling=Pooling(), nsamples=5,
                            seqlen=24, seed=0, batch_size=5)
    assert calib.windows.shape == (5, 24)
    # what the tokenizer puts around every text, so the statistics see the [CLS]/[SEP] positions too
    assert (calib.windows[:, 0] == tok.cls_token_id).all() and (calib.windows[:, -1] == tok.sep_token_id).all()
    frame = torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
    assert not torch.isin(calib.windows[:, 1:-1], frame).any()


def test_compensating_a_gradient_criterion_on_an_encoder_says_what_it_measured(st_dir, data):
    result = compress(load_model(st_dir), criterion="fisher", sparsity=0.3, compensate="bias",
                      calib=str(data["domain"]), nsamples=12, seqlen=32, pair_batch=4, progress=False, use_cache=False)
    assert "LayerNorm" in result.report["target_note"] and "docs/benchmarks.md" in result.report["target_note"]
    plain = compress(load_model(st_dir), criterion="magnitude", sparsity=0.3, compensate="bias",
                     calib=str(data["domain"]), nsamples=12, seqlen=32, pair_batch=4, progress=False, use_cache=False)
    assert "LayerNorm" not in (plain.report["target_note"] or "")


# ----------------------------------------------------------------------------- criteria
@pytest.fixture(scope="module")
def float64_encoder(st_dir):
    loaded = load_model(st_dir)
    return loaded.model.double(), loaded.tokenizer


def test_infonce_fisher_equals_a_hand_computed_value(float64_encoder, data):
    model, tokenizer = float64_encoder
    group = next(g for g in analyze(model) if g.kind == "channel" and g.layer == 0)
    calib = calibration_set(model, tokenizer, data["domain"], encoder=True, pooling=Pooling(), nsamples=6,
                            seqlen=32, seed=0, batch_size=3)
    stats = unit_gradients(model, calib.steps, [group]).units
    ctx = ScoringContext(model, None, all_params(model), unit_gradients=stats)
    fisher = criteria.get("fisher").score(group, ctx)

    # Reference: s_b(u) = d/dt L_b(unit u's weights scaled by t) at t = 1, by central differences.
    pairs = load_pairs(data["domain"], "calibration", limit=6, seed=0)
    params = dict(model.named_parameters())
    units = [0, 5, 17]
    expected = []
    eps = 1e-5
    for u in units:
        squares = []
        for batch in (pairs[:3], pairs[3:]):
            losses = []
            for t in (1 + eps, 1 - eps):
                originals = {}
                with torch.no_grad():
                    for s in group.slices:
                        p = params[s.param]
                        index = torch.as_tensor(s.indices[u])
                        originals[s.param] = p.index_select(s.axis, index).clone()
                        p.index_copy_(s.axis, index, originals[s.param] * t)
                    losses.append(float(hand_info_nce(model, tokenizer, batch)))
                    for s in group.slices:
                        params[s.param].index_copy_(s.axis, torch.as_tensor(s.indices[u]), originals[s.param])
            squares.append(((losses[0] - losses[1]) / (2 * eps)) ** 2)
        expected.append(np.mean(squares))
    assert fisher[units] == pytest.approx(expected, rel=1e-5)
    assert np.all(np.asarray(expected) > 0)


def test_unit_alignment_is_the_cosine_of_the_summed_gradients_on_the_unit_weights(float64_encoder, data):
    model, tokenizer = float64_encoder
    group = next(g for g in analyze(model) if g.kind == "channel" and g.layer == 1)
    options = dict(encoder=True, pooling=Pooling(), nsamples=6, seqlen=32, seed=0, batch_size=3)
    domain = unit_gradients(model, calibration_set(model, tokenizer, data["domain"], **options).steps, [group],
                            keep_gradients=True)
    general = unit_gradients(model, calibration_set(model, tokenizer, data["general"], **options).steps, [group],
                             keep_gradients=True)
    alignment = unit_alignment([group], domain.gradient_sums, general.gradient_sums)[group.id]

    params = dict(model.named_parameters())
    names = [s.param for s in group.slices]

    with torch.enable_grad():
        for n in names:
            params[n].requires_grad_(True)
        gd = torch.autograd.grad(sum(hand_info_nce(model, tokenizer, b) for b in _batches(data["domain"])),
                                 [params[n] for n in names])
        gg = torch.autograd.grad(sum(hand_info_nce(model, tokenizer, b) for b in _batches(data["general"])),
                                 [params[n] for n in names])
        for n in names:
            params[n].requires_grad_(False)
    for u in (0, 3, 11):
        a = torch.cat([g.movedim(s.axis, 0)[u].reshape(-1) for g, s in zip(gd, group.slices)])
        b = torch.cat([g.movedim(s.axis, 0)[u].reshape(-1) for g, s in zip(gg, group.slices)])
        assert alignment[u] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-9)
    assert np.all(np.abs(alignment) <= 1.0)


def _batches(source):
    pairs = load_pairs(source, "calibration", limit=6, seed=0)
    return [pairs[:3], pairs[3:]]


def test_gaprune_combines_normalised_fishers_and_alignment_as_documented(float64_encoder):
    model, _ = float64_encoder
    groups = analyze(model)
    channels = [g for g in groups if g.kind == "channel"]
    rng = np.random.default_rng(0)
    domain, general, alignment = {}, {}, {}
    for g in channels:
        domain[g.id] = {"sum": np.zeros(g.units), "sumsq": rng.uniform(0, 4e-6, g.units), "batches": 4}
        general[g.id] = {"sum": np.zeros(g.units), "sumsq": rng.uniform(0, 1e-3, g.units), "batches": 2}
        alignment[g.id] = rng.uniform(-1, 1, g.units)
    ctx = ScoringContext(model, groups, all_params(model), unit_gradients=domain, general_unit_gradients=general,
                         unit_alignment=alignment)
    fd_mean = np.mean(np.concatenate([domain[g.id]["sumsq"] / 4 for g in channels]))
    fg_mean = np.mean(np.concatenate([general[g.id]["sumsq"] / 2 for g in channels]))
    for lam, alpha in ((0.5, 0.5), (-1.0, 0.2), (0.0, 0.0)):
        scorer = criteria.get("gaprune", general_weight=lam, alignment_weight=alpha)
        for g in channels:
            base = domain[g.id]["sumsq"] / 4 / fd_mean + lam * general[g.id]["sumsq"] / 2 / fg_mean
            expected = base + alpha * alignment[g.id] * np.abs(base)
            assert np.allclose(scorer.score(g, ctx), expected, rtol=1e-12)
    report = criteria.get("gaprune").diagnostics(channels, ctx)
    assert report["raw_scales"]["domain_fisher"]["max"] <= 1e-6 < report["raw_scales"]["general_fisher"]["max"]
    # Normalised, every term moves the ranking even though the raw Fishers differ by 1000x.
    assert all(rho < 0.99 for rho in report["rank_correlation_without"].values())


# ----------------------------------------------------------------------------- end to end
def test_pruned_encoder_reloads_through_sentence_transformers_with_identical_embeddings(st_dir, data, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    loaded = load_model(st_dir)
    result = compress(loaded, criterion="gaprune", sparsity=0.3, calib=str(data["domain"]),
                      calib_general=str(data["general"]), nsamples=24, seqlen=32, pair_batch=8, progress=False)
    report = result.report
    assert report["allocation"] == "uniform" and report["uniform_layers"]
    assert abs(report["params"]["achieved_sparsity"] - 0.3) < 0.02
    assert report["calibration"]["loss"] == "infonce" and report["calibration"]["general"]["pairs"] == 24
    assert set(report["criterion_diagnostics"]["raw_scales"]) == {"domain_fisher", "general_fisher", "alignment"}
    out = save_pruned(result.model, tmp_path / "pruned", tokenizer=loaded.tokenizer, report=report,
                      source_dir=loaded.path)

    texts = ["the river rises in the hills", "coal barges moved along the canal", "a weekly fair"]
    with torch.no_grad():
        expected = embed(result.model, tokenize(loaded.tokenizer, texts, 64), pooling_of(st_dir))
    st_model = SentenceTransformer(str(out), device="cpu")
    assert torch.allclose(torch.as_tensor(st_model.encode(texts)), expected, atol=1e-6)
    plain = AutoModel.from_pretrained(out).eval()
    assert plain.config.intermediate_size < loaded.model.config.intermediate_size
    with torch.no_grad():
        assert torch.equal(embed(plain, tokenize(loaded.tokenizer, texts, 64), pooling_of(out)), expected)
    assert load_model(out).kind == "encoder"


def test_gaprune_runs_on_a_decoder_with_the_lm_loss(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "llama")
    domain = write_sample_text(tmp_path / "domain.txt")
    general = tmp_path / "general.txt"
    general.write_text("Numbers and letters in a different order: 12 ab 34 cd. " * 200)
    result = compress(str(model_dir), criterion="gaprune", sparsity=0.3, calib=str(domain),
                      calib_general=str(general), nsamples=8, seqlen=32, progress=False)
    assert result.report["calibration"]["loss"] == "lm"
    assert result.report["calibration"]["general"]["source"] == str(general)
    assert result.report["criterion_diagnostics"]["raw_scales"]["general_fisher"]["max"] > 0


def test_gradient_statistics_are_cached_for_another_sparsity(st_dir, data):
    options = dict(criterion="fisher", calib=str(data["domain"]), nsamples=16, seqlen=32, pair_batch=8,
                   progress=False)
    first = compress(load_model(st_dir), sparsity=0.2, **options)
    second = compress(load_model(st_dir), sparsity=0.4, **options)
    assert (first.report["gradient_cache"], second.report["gradient_cache"]) == ("miss", "hit")


def test_two_set_options_are_checked_before_any_work(st_dir, data):
    with pytest.raises(UserError, match="--calib-general FILE"):
        compress(str(st_dir), criterion="gaprune", sparsity=0.3, calib=str(data["domain"]), progress=False)
    with pytest.raises(UserError, match="not by 'fisher'"):
        compress(str(st_dir), criterion="fisher", sparsity=0.3, calib=str(data["domain"]),
                 calib_general=str(data["general"]), progress=False)


def run(*args):
    return subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_compress_gaprune_then_eval_retrieval(st_dir, data, tmp_path):
    out = tmp_path / "out"
    result = run("compress", st_dir, "--criterion", "gaprune", "--sparsity", "0.25", "--calib", data["domain"],
                 "--calib-general", data["general"], "--nsamples", "16", "--seqlen", "32", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "uniform layers" in result.stdout
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    result = run("eval", out, "--data", data["domain"], "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["split"] == "evaluation" and 0 < metrics["mrr"] <= 1 and 0 <= metrics["recall_at_1"] <= 1
    assert metrics["pairs"] == len(load_pairs(data["domain"], "evaluation"))


@pytest.mark.parametrize("args, needle", [
    (["--criterion", "gaprune"], "compares a domain and a general calibration set"),
    (["--criterion", "fisher", "--calib-general", "GENERAL"], "--calib-general is only used by"),
    (["--criterion", "fisher", "--calib", "BAD"], "line 2: not valid JSON"),
])
def test_cli_bad_encoder_calibration_exits_2_without_output(st_dir, data, tmp_path, args, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a b c d", "positive": "e f g h"}\nnot json\n')
    args = [{"GENERAL": data["general"], "BAD": bad}.get(a, a) for a in args]
    if "--calib" not in args:
        args += ["--calib", data["domain"]]
    out = tmp_path / "out"
    result = run("compress", st_dir, "--sparsity", "0.3", "--nsamples", "8", "--out", out, *args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
