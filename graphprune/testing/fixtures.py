"""Small local stand-ins for tests and examples: no download, built in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def write_tiny_gguf(path: Path, *, hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
                    layers: int = 2) -> Path:
    """A float32 Llama GGUF with a byte-level BPE vocabulary, small enough to convert in a second."""
    import gguf
    from tokenizers import pre_tokenizers

    tokens = ["<|endoftext|>", "<s>", "</s>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    kv_width = kv_heads * hidden // heads
    shapes = {
        "token_embd.weight": (len(tokens), hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (len(tokens), hidden),
    }
    for block in range(layers):
        shapes |= {
            f"blk.{block}.attn_norm.weight": (hidden,),
            f"blk.{block}.ffn_norm.weight": (hidden,),
            f"blk.{block}.attn_q.weight": (hidden, hidden),
            f"blk.{block}.attn_k.weight": (kv_width, hidden),
            f"blk.{block}.attn_v.weight": (kv_width, hidden),
            f"blk.{block}.attn_output.weight": (hidden, hidden),
            f"blk.{block}.ffn_gate.weight": (intermediate, hidden),
            f"blk.{block}.ffn_up.weight": (intermediate, hidden),
            f"blk.{block}.ffn_down.weight": (hidden, intermediate),
        }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
