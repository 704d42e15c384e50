"""Fixtures of the training tests: a byte-level tokenizer, a tiny random SeerLlama, packed data.

Everything is offline and small enough for a 2-core CPU: the model has 2 layers of width
64 (4 query heads, 2 KV heads, head_dim 16, gate width 32) and sees 512-1024-token
sequences (8-16 attention blocks).
"""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

EOS = "<eos>"


def make_byte_tokenizer():
    """A byte-level tokenizer: id 0 = <eos>, ids 1..256 = the 256 bytes (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {EOS: 0}
    for _, char in sorted(bytes_to_unicode().items()):
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def tiny_config(layers=2, **overrides):
    from seer_attn.modeling_seer import SeerLlamaConfig

    # initializer_range 0.3 (not Llama's 0.02): with tiny random weights every attention row
    # is nearly uniform, the target maps are flat and there is nothing to distil; larger q/k
    # weights give peaked, input-dependent attention, like a trained model's.
    kw = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.3,
              seer_gate_hidden_size=32, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    kw.update(overrides)
    return SeerLlamaConfig(**kw)


def tiny_model(seed=0, layers=2, **overrides):
    """A fresh tiny SeerLlamaForCausalLM; the same seed gives bit-identical weights."""
    from seer_attn.modeling_seer import SeerLlamaForCausalLM

    torch.manual_seed(seed)
    return SeerLlamaForCausalLM(tiny_config(layers, **overrides))


@pytest.fixture(scope="session")
def make_tiny_model():
    """:func:`tiny_model` as a fixture (tests do not import conftest modules)."""
    return tiny_model


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets_cache"))


@pytest.fixture(scope="session")
def packed_train_512(byte_tokenizer, datasets_cache):
    """The bundled train corpus, byte-tokenised, packed into 512-token sequences."""
    from seer_attn.training.data import load_packed_dataset

    return load_packed_dataset(None, byte_tokenizer, 512, seed=0, cache_dir=datasets_cache)
