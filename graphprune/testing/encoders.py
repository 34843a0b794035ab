"""A tiny sentence-transformers folder (BERT encoder, WordPiece tokenizer, mean pooling, Normalize)
and pair files, for tests of the embedding workflow: no download, built in well under a second."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .fixtures import SAMPLE_TEXT

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAIR_WORDS = sorted({w.strip(".,").lower() for w in SAMPLE_TEXT.split() if w.strip(".,").isalpha()})


def tiny_vocab(size: int = 256) -> list[str]:
    """Special tokens, the sample text's words, single characters and their ## continuations."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIAL_TOKENS + list(".,;:!?'\"()-") + [str(d) for d in range(10)] + letters + [f"##{c}" for c in letters]
    vocab += [w for w in PAIR_WORDS if w not in vocab]
    if len(vocab) > size:
        raise ValueError(f"tiny vocabulary needs {len(vocab)} entries, the model has {size}")
    return vocab


def save_tiny_sentence_transformer(directory: Path, *, seed: int = 0, pooling: str = "mean") -> Path:
    """A sentence-transformers folder around the zoo's tiny BERT (model at the root, like
    all-MiniLM-L6-v2), with mean (or `pooling`) pooling and a Normalize module."""
    from transformers import BertTokenizerFast

    from .zoo import build_tiny

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, config = build_tiny("bert", seed=seed)
    model.save_pretrained(directory)
    vocab = {token: index for index, token in enumerate(tiny_vocab(config.vocab_size))}
    BertTokenizerFast(vocab=vocab, do_lower_case=True,
                      model_max_length=config.max_position_embeddings).save_pretrained(directory)
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    modes = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": config.hidden_size, **{key: key == modes[pooling] for key in modes.values()}}))
    return directory


def random_pairs(count: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """(query, positive) pairs of sample-text words; the positive repeats part of its query."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        query = rng.sample(PAIR_WORDS, 5)
        positive = query[:3] + rng.sample(PAIR_WORDS, 6)
        rng.shuffle(positive)
        pairs.append((" ".join(query), " ".join(positive)))
    return pairs


def write_pair_file(path: Path, count: int = 40, *, seed: int = 0) -> Path:
    """`count` pairs as .jsonl or .tsv, by the path's suffix."""
    path = Path(path)
    pairs = random_pairs(count, seed=seed)
    if path.suffix == ".tsv":
        path.write_text("".join(f"{q}\t{p}\n" for q, p in pairs), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in pairs), encoding="utf-8")
    return path
