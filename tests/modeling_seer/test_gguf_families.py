"""Conversion from a GGUF file for the families transformers reads from GGUF (llama, qwen2,
qwen3; ``transformers/integrations/ggml.py``): a tiny stock model is written as an F32 GGUF with
llama.cpp's tensor names (the ``gguf`` package), then ``load_seer_model("x.gguf")`` gives the
stock logits (<= 1e-5).

Mistral: llama.cpp files it under the "llama" architecture, and transformers 5.x loads such a
file as Llama (its Mistral check tests ``"mistral" in [general.name]``, a list membership; a
file named exactly "mistral" then fails in transformers for want of a "mistral" entry in
gguf-py's architectures). So a Mistral GGUF converts to SeerLlamaForCausalLM: the same weights
and layers, without a sliding window (exact for Mistral releases whose ``sliding_window`` is null).
"""
import pytest
import torch

from seer_attn.modeling_seer.conversion import load_seer_model
from seer_attn.modeling_seer.families import FAMILIES

gguf = pytest.importorskip("gguf")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
#: llama.cpp architecture of each family (see above for Mistral)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
#: the Seer family transformers' GGUF reader leads to
LOADS_AS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
#: transformers reads no head_dim for qwen2/qwen3 GGUFs: Qwen2 derives it, Qwen3 takes its default (128)
EXTRA = {"qwen3": dict(head_dim=128)}


def _llama_cpp_permute(w, heads):
    """llama.cpp's q/k row order for its "llama" architecture (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(stock, path, family):
    cfg, arch = stock.config, ARCH[family]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"Tiny {family} 2L")  # llama.cpp writes names such as "Mistral 7B Instruct v0.3"
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, t in stock.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        gname = names.get_name(base)
        assert gname is not None, f"no GGUF name for {name}"
        arr = t.float().numpy()
        if arch == "llama" and gname.endswith((".attn_q", ".attn_k")):
            arr = _llama_cpp_permute(arr, cfg.num_attention_heads if gname.endswith("q") else cfg.num_key_value_heads)
        w.add_tensor(f"{gname}.{suffix}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", sorted(ARCH))
def test_load_seer_model_converts_a_gguf(family, tmp_path):
    """Seer from the GGUF = the stock model written to it (dense, and sparse at density 1);
    the tiny Mistral's window (4096) exceeds the test sequence, so Llama's logits are Mistral's."""
    fam = FAMILIES[family]
    torch.manual_seed(0)
    stock = fam.stock_model_class(fam.stock_config_class(**TINY, **EXTRA.get(family, {}))).eval()
    path = tmp_path / f"tiny-{family}.gguf"
    write_tiny_gguf(stock, path, family)
    seer = load_seer_model(str(path), seer_gate_hidden_size=32).eval()
    target = FAMILIES[LOADS_AS[family]]
    assert type(seer).__name__ == target.seer_model and seer.config.model_type == target.seer_model_type
    x = torch.randint(0, TINY["vocab_size"], (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(seer(x).logits, stock(x).logits, atol=1e-5, rtol=0)
        seer.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
        torch.testing.assert_close(seer(x).logits, stock(x).logits, atol=1e-4, rtol=0)


def test_gates_only_on_a_gguf_loads_in_bfloat16_as_the_full_folder(tmp_path):
    """A gates-only folder whose base is a GGUF file, loaded with dtype=bfloat16, gives the logits
    of the full folder loaded so: the same dtypes everywhere, the RoPE tables in float32 as
    from_pretrained builds them (cast to bfloat16 they moved every position but the first)."""
    import copy

    from seer_attn.modeling_seer.remote_bundle import write_remote_code

    torch.manual_seed(0)
    stock = FAMILIES["llama"].stock_model_class(FAMILIES["llama"].stock_config_class(**TINY)).eval()
    write_tiny_gguf(stock, tmp_path / "tiny.gguf", "llama")
    seer = load_seer_model(str(tmp_path / "tiny.gguf"), seer_gate_hidden_size=32, seer_mode="sparse",
                           seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3, seer_dense_last_rows=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in seer.gate_state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    seer.save_pretrained(tmp_path / "full")
    cfg = copy.deepcopy(seer.config)
    cfg.seer_base_model = str(tmp_path / "tiny.gguf")
    cfg.save_pretrained(tmp_path / "gates")
    seer.save_gates(tmp_path / "gates")
    write_remote_code(tmp_path / "gates", "seer_llama")
    cls = type(seer)
    full = cls.from_pretrained(tmp_path / "full", dtype=torch.bfloat16).eval()
    gates = cls.from_pretrained(tmp_path / "gates", dtype=torch.bfloat16).eval()
    dtypes = lambda m: {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    assert dtypes(gates) == dtypes(full)
    assert full.model.rotary_emb.inv_freq.dtype == torch.float32
    x = torch.randint(0, TINY["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = full(x).logits
        assert torch.isfinite(ref).all() and torch.equal(gates(x).logits, ref)
    assert full.seer_density().mean() < 0.9  # the prefill was sparse
