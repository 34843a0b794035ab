"""Small local stand-ins for tests and examples: no download, built in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE_TEXT = (
    "The river rises in the northern hills and flows south through farmland before it reaches the sea. "
    "Its valley was settled early, and the old market towns along its banks still hold a weekly fair. "
    "In the nineteenth century a canal joined the river to the industrial cities of the west, "
    "and coal barges moved along it until the railway took their trade. "
)


def byte_level_tokenizer():
    """A tokenizer with one token per byte (plus <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    for character in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def tiny_llama(*, layers: int = 2, heads: int = 4, kv: int = 2, head_dim: int = 16, hidden: int = 64,
               intermediate: int = 96, vocab: int = 258, seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab, head_dim=head_dim,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(directory: Path, **kwargs) -> Path:
    """A tiny Llama with the byte tokenizer saved as an HF directory (safetensors)."""
    directory = Path(directory)
    tiny_llama(**kwargs).save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def write_sample_text(path: Path, repeats: int = 40) -> Path:
    path = Path(path)
    path.write_text(SAMPLE_TEXT * repeats, encoding="utf-8")
    return path
