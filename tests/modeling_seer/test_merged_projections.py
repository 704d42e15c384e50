"""seer_merge_projections (modeling_seer/merged_projections.py): each layer's q/k/v as one GEMM and
the MLP's gate/up as one, for inference. Every family's logits equal the unmerged model's
(fp32, summation order only), the stock parameters become views of the concatenations (no
copy; state dict and saved folders unchanged), graph-mode decode with compiled layers gives
the unmerged tokens, PEFT-wrapped projections are refused, a forward that needs the projections'
gradients runs them unmerged, and a change after the merge (a cast) undoes it with a warning
instead of running stale weights."""
import logging

import pytest
import torch
from test_families import FAMILIES, _stock, _x

from seer_attn.modeling_seer.conversion import from_stock
from seer_attn.modeling_seer.merged_projections import Merged

from decode_inputs import DECODE, ids as _ids, left_pad as _left_pad


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
@torch.no_grad()
def test_merged_logits_equal_unmerged_in_every_family(name):
    seer = _frozen(from_stock(_stock(name, 2), seer_gate_hidden_size=32, seer_mode="sparse",
                              seer_sparsity_method="nz_ratio", seer_nz_ratio=0.5))
    x = _x(T=200)
    ref = seer(x).logits
    seer.seer_merge_projections()
    attn, mlp = seer.model.layers[0].self_attn, seer.model.layers[0].mlp
    merged = attn._seer_qkv
    assert merged.sizes == (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == merged.weight.untyped_storage().data_ptr()
    assert (attn.q_proj.bias is not None) == (merged.bias is not None)  # Qwen2's q/k/v biases merge too
    assert mlp._seer_gate_up.sizes == (mlp.gate_proj.out_features, mlp.up_proj.out_features)
    calls = []
    for layer in seer.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(seer(x).logits, ref, atol=1e-5, rtol=1e-5)
    assert calls == []  # the merged GEMM ran, not the three projections
    seer.seer_merge_projections(enable=False)
    assert attn._seer_qkv is None and getattr(mlp, "_seer_gate_up", None) is None
    torch.testing.assert_close(seer(x).logits, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_state_dict_and_saved_folder_are_unchanged(tiny, tmp_path):
    m = _frozen(tiny(seed=3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.seer_merge_projections()
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    m.save_pretrained(tmp_path)
    back = type(m).from_pretrained(tmp_path).eval()
    x = _x(T=130)
    torch.testing.assert_close(back(x).logits, m(x).logits, atol=1e-5, rtol=1e-5)
    # loading into the merged model writes through the views into the one GEMM's weight
    fresh = _frozen(tiny(seed=4)).seer_merge_projections()
    fresh.load_state_dict(back.state_dict())
    torch.testing.assert_close(fresh(x).logits, back(x).logits, atol=1e-5, rtol=1e-5)
    assert fresh.model.layers[0].self_attn._seer_qkv is not None


@torch.no_grad()
def test_graph_decode_with_compiled_layers_equals_unmerged(tiny, monkeypatch):
    """The graph step's compiled layer pieces (q/k/v in, gate/up in the MLP) with the merge: the
    unmerged run's tokens and kept share, across a block boundary."""
    m = _frozen(tiny(**DECODE, seer_decode_sparsity=True, seer_decode_budget=3 * 64))
    ids, mask = _left_pad([_ids(300, seed=1)[0], _ids(200, seed=2)[0]], 300)
    m.seer_compile_pointwise(backend="aot_eager")
    try:
        ref = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40)
        ref_density = m.seer_decode_density()
        m.seer_merge_projections()
        calls = []  # the merged GEMMs' sizes, as the compiled pieces trace them (the graphs run no Python)
        call = Merged.__call__
        monkeypatch.setattr(Merged, "__call__", lambda self, x: calls.append(len(self.sizes)) or call(self, x))
        out = m.seer_generate(ids, attention_mask=mask, max_new_tokens=40)
    finally:
        m.seer_compile_pointwise(enable=False)
    assert torch.equal(out, ref)
    torch.testing.assert_close(m.seer_decode_density(), ref_density, rtol=1e-5, atol=1e-6)
    assert set(calls) == {3, 2}  # q/k/v (in and outside the compiled pieces) and gate/up (in them)
    assert m.model.layers[1].mlp._seer_gate_up is not None  # still merged after the run


def test_wrapped_projections_are_refused_and_trained_ones_run_unmerged(tiny):
    m = tiny(seed=5)  # parameters require grad, as a loaded model's do
    x = _x(T=70)
    ref = m(x).logits
    m.seer_merge_projections()
    m.zero_grad()
    out = m(x).logits  # grad mode and trainable projections: the stock ones, so their gradients arrive
    out.float().pow(2).mean().backward()
    torch.testing.assert_close(out, ref)
    assert m.model.layers[0].self_attn.q_proj.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref, atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    m.seer_merge_projections(enable=False)
    wrapped = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj is a Linear.*not a plain nn\.Linear"):
        wrapped.base_model.model.seer_merge_projections()
    assert wrapped.base_model.model.model.layers[1].self_attn._seer_qkv is None  # every layer checked first


def test_offloaded_projections_are_refused(tiny):
    m = _frozen(tiny(seed=8))
    m.model.layers[1].mlp.up_proj._hf_hook = object()  # as accelerate's dispatch leaves it
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj is dispatched by accelerate"):
        m.seer_merge_projections()
    assert m.model.layers[0].self_attn._seer_qkv is None


@torch.no_grad()
def test_a_cast_after_the_merge_undoes_it_with_a_warning(tiny, caplog):
    m = _frozen(tiny(seed=6)).seer_merge_projections()
    x = _x(T=70)
    m.double()
    ref = tiny(seed=6).double()(x).logits
    with caplog.at_level(logging.WARNING):
        out = m(x).logits
    assert "projections changed since the merge" in caplog.text
    assert m.model.layers[0].self_attn._seer_qkv is None
    torch.testing.assert_close(out, ref)
