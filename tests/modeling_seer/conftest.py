import pytest
import torch

from seer_attn.modeling_seer import SeerLlamaConfig, SeerLlamaForCausalLM

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)


def tiny_model(seed=0, **seer):
    torch.manual_seed(seed)
    cfg = SeerLlamaConfig(**TINY, seer_gate_hidden_size=32, **seer)
    return SeerLlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny():
    """Factory of tiny random SeerLlama models: ``tiny(seed=0, **seer_options)``."""
    return tiny_model


@pytest.fixture
def tiny_kwargs():
    """LlamaConfig keyword arguments of the tiny model."""
    return dict(TINY)
