"""Self-generated calibration (`--calib none`): the model writes its own calibration text.

For users without data (or who may not share it). Each sample starts where the model saw its
pretraining documents start: after BOS for models that need it in every window (Gemma), otherwise after
the vocabulary's end-of-document token (`<|endoftext|>` and its kin), which is the context that
precedes a fresh document; that token is context only and not part of the window. Without either, a
sample starts from one word of a short list of common English sentence openers. The model continues by
sampling (temperature, nucleus top-p) until the window is full; end-of-sequence is suppressed so every
window has exactly `seqlen` tokens. A fixed seed makes the text, and so the kept units, reproducible; the
text is returned so the run report can record it.

Why the document start and not a word or a chat prompt: an instruction-tuned model asked for nothing
after its chat BOS writes chat turns and code, and a sentence opener still leaves the model free to drift
there; after the end-of-document token it writes from its pretraining distribution, the closest it has
to generic text. (SmolLM2-135M-Instruct, FLAP 20%, seed 0, top-p 0.95, wiki.test PPL: 42.8 from openers,
40.5 after `<|endoftext|>`; 39.5 untruncated, the default; 36.6 calibrated on wiki.train.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CalibrationError
from .text import bos_token_id
from ..progress import in_stage

OPENERS = ("The", "In", "A", "It", "This", "When", "After", "One", "He", "She", "They", "We", "There", "As",
           "According", "During", "Although", "If", "Many", "Some")
# tokens that separate pretraining documents, most specific first ("</s>" is also many models' EOS)
DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>")
DEFAULT_TEMPERATURE = 1.0
# No nucleus truncation: plain sampling at temperature 1 draws from the model's own distribution, tail
# included. Truncating the tail (top-p 0.95) makes the text blander than real text and cost FLAP 20%
# 1.1 PPL (SmolLM2-135M, wiki.test: 40.55 at top-p 0.95, 39.46 / 39.32 / 39.38 at seeds 0 / 1 / 2
# untruncated, 36.57 calibrated on wiki.train); temperature 1.2 or 0.8 was worse still.
DEFAULT_TOP_P = 1.0


@dataclass
class GeneratedCalibration:
    batches: torch.Tensor  # [nsamples, seqlen] token ids
    texts: list[str]
    settings: dict[str, Any]


@dataclass(frozen=True)
class GenerationStart:
    """What each sample is generated after: `context` ids, of which the first `kept` stay in the window;
    `openers` when a random sentence opener follows (no document token known)."""
    context: tuple[int, ...]
    kept: int
    openers: tuple[tuple[int, ...], ...] = ()
    description: str = ""


def generation_start(tokenizer: Any, *, add_bos: bool) -> GenerationStart:
    if add_bos:
        return GenerationStart((bos_token_id(tokenizer),), 1,
                               description=f"BOS {tokenizer.bos_token!r}, kept in each window")
    vocab = tokenizer.get_vocab()
    for token in DOCUMENT_SEPARATORS:
        if token in vocab:
            return GenerationStart((int(vocab[token]),), 0,
                                   description=f"after end-of-document {token!r}, not kept in the window")
    openers = tuple(tuple(ids[:1]) for ids in (tokenizer(w, add_special_tokens=False)["input_ids"] for w in OPENERS)
                    if ids)
    if not openers:
        raise CalibrationError("the tokenizer has no end-of-document token and encodes none of the sentence "
                               "openers used to start generation")
    return GenerationStart((), 0, openers, description="a random sentence opener")


def generate_calibration(model: torch.nn.Module, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int = 0,
                         add_bos: bool = False, temperature: float = DEFAULT_TEMPERATURE,
                         top_p: float = DEFAULT_TOP_P, batch_size: int = 32,
                         progress: bool = True) -> GeneratedCalibration:
    if not hasattr(model, "generate") or not getattr(model.config, "is_decoder", True) \
            or getattr(model.config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "distilbert"):
        raise CalibrationError(f"{type(model).__name__} cannot generate text, so --calib none has nothing to "
                               f"calibrate on: give a calibration file, or use a weight-only criterion")
    start = generation_start(tokenizer, add_bos=add_bos)
    new_tokens = seqlen - start.kept - (1 if start.openers else 0)
    if new_tokens < 1:
        raise CalibrationError(f"--seqlen {seqlen} leaves no room for generated tokens")
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos if eos is not None else 0
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prompts = ([start.context + start.openers[i] for i in torch.randint(len(start.openers), (nsamples,)).tolist()]
                   if start.openers else [start.context] * nsamples)
        steps = range(0, nsamples, batch_size)
        for begin in tqdm(steps, desc="generating calibration", unit="batch", disable=not progress, leave=False):
            ids = torch.tensor(prompts[begin:begin + batch_size], dtype=torch.long,
                               device=next(model.parameters()).device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=temperature, top_p=top_p, top_k=0,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=pad, use_cache=True)
            rows.append(out[:, len(start.context) - start.kept:].cpu())  # context beyond the kept BOS is dropped
    batches = torch.cat(rows)
    if batches.shape != (nsamples, seqlen):
        raise CalibrationError(f"generation produced {tuple(batches.shape)} tokens, expected {(nsamples, seqlen)}")
    texts = tokenizer.batch_decode(batches, skip_special_tokens=False)
    settings = {"method": "self-generated", "temperature": temperature, "top_p": top_p, "seed": seed,
                "start": start.description, "bos": start.kept > 0}
    if start.openers:
        settings["openers"] = list(OPENERS)
    return GeneratedCalibration(batches, texts, settings)


def cached_generation(key: str, generate, *, shape: tuple[int, int] | None = None) -> GeneratedCalibration:
    """`generate()` once per key: the token ids (safetensors) and texts/settings (JSON) are kept in the
    calibration cache, so re-pruning at another sparsity does not sample again. The ids entry carries
    the checksum of the ids and the sha256 of the JSON file; an entry that does not verify, or whose
    ids are not `shape` or whose texts do not match them, is regenerated after a one-line warning."""
    import hashlib
    import json

    from .cache import cache_dir, discard, read_cache_entry_with_metadata, write_cache_entry, write_cache_tensors

    directory = cache_dir()
    ids_path, meta_path = directory / f"{key}.safetensors", directory / f"{key}.json"
    if ids_path.exists():
        entry = read_cache_entry_with_metadata(key)
        if entry is not None:
            (tensors, metadata), why = entry, None
            try:
                meta_bytes = meta_path.read_bytes()
                if hashlib.sha256(meta_bytes).hexdigest() != metadata.get("json_sha256"):
                    why = f"{meta_path.name} does not match its checksum"
                else:
                    meta = json.loads(meta_bytes.decode("utf-8"))
                    ids, texts, settings = tensors["ids"], meta["texts"], meta["settings"]
                    if shape is not None and tuple(ids.shape) != tuple(shape):
                        why = f"its token ids have shape {tuple(ids.shape)}, expected {tuple(shape)}"
                    elif not isinstance(texts, list) or len(texts) != ids.shape[0] or not isinstance(settings, dict):
                        why = f"{meta_path.name} does not describe its token ids"
                    else:
                        return GeneratedCalibration(ids, texts, settings)
            except FileNotFoundError:
                why = f"{meta_path.name} is missing"
            except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
                why = f"{type(error).__name__}: {error}"
            discard(key, why)
    result = generate()
    meta_text = json.dumps({"texts": result.texts, "settings": result.settings})
    # JSON first, then the ids that vouch for it: an entry counts only when the ids verify
    write_cache_entry(meta_path.name, lambda tmp: tmp.write_bytes(meta_text.encode("utf-8")))
    write_cache_tensors(key, {"ids": result.batches},
                        metadata={"json_sha256": hashlib.sha256(meta_text.encode("utf-8")).hexdigest()})
    return result


@in_stage("calibrate")
def self_generated(model: torch.nn.Module, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int,
                   use_cache: bool = True, progress: bool = True) -> GeneratedCalibration:
    """`--calib none`: the calibration `model` writes itself, cached per (weights, sizes, seed)."""
    from .cache import cache_key, tokenizer_fingerprint, weights_fingerprint
    from .text import needs_bos

    def generate():
        return generate_calibration(model, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                    add_bos=needs_bos(model), progress=progress)

    if not use_cache:
        return generate()
    return cached_generation(cache_key("selfgen-v4", weights_fingerprint(model), tokenizer_fingerprint(tokenizer),
                                       nsamples, seqlen, seed, DEFAULT_TEMPERATURE, DEFAULT_TOP_P), generate,
                             shape=(nsamples, seqlen))
