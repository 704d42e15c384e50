"""SeerLlamaForCausalLM on CPU (torch-reference kernels): modes, cache, padding, gradients."""
import inspect

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from seer_attn.modeling_seer import SeerForwardContext

# transformers >= 5.2x renamed the cache argument (``past_key_values`` -> ``cache``) and the
# checkpointing switch; the tests use whichever name the installed version takes.
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _ids(T, B=1, seed=0, vocab=96):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_dense_logits_equal_stock_llama(tiny, tiny_kwargs):
    m = tiny()
    ref = LlamaForCausalLM(LlamaConfig(**tiny_kwargs)).eval()
    res = ref.load_state_dict(m.state_dict(), strict=False)
    assert not res.missing_keys and all(".attn_gate." in k for k in res.unexpected_keys)
    x = _ids(150, B=2)
    assert torch.equal(m(x).logits, ref(x).logits)


@pytest.mark.parametrize("T", [1, 40, 64, 65, 200])
@torch.no_grad()
def test_sparse_with_every_block_equals_dense(tiny, T):
    m = tiny(seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    x = _ids(T, B=2, seed=T)
    dense = m(x).logits
    m.set_seer_mode("sparse")
    sparse = m(x).logits
    torch.testing.assert_close(sparse, dense, atol=2e-5, rtol=1e-5)
    dens = m.seer_density()
    assert dens.shape == (2, 2, 4) and torch.allclose(dens, torch.ones_like(dens))


@torch.no_grad()
def test_keep_local_reaches_the_model_masks(tiny):
    m = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.05, seer_dense_last_rows=0,
             seer_keep_local=3)
    ctx = SeerForwardContext(masks=[])
    m(_ids(1000), seer_ctx=ctx)
    NB = 16
    i = torch.arange(NB)
    band = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) <= 3)  # diagonal + 3 before it
    for mask in ctx.masks:
        assert (mask | ~band).all()


@torch.no_grad()
def test_sparse_prefill_drops_blocks_and_reports_density(tiny):
    m = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3, seer_dense_last_rows=0)
    x = _ids(1000)
    ctx = SeerForwardContext(masks=[])
    sparse = m(x, seer_ctx=ctx).logits
    d = m.seer_density()
    assert d.shape == (2, 1, 4)
    assert 0.2 < d.mean().item() < 0.45
    NB = 16
    for mask, dl in zip(ctx.masks, d):
        assert mask.shape == (1, 4, NB, NB) and not mask.triu(1).any()
        tril = torch.ones(NB, NB, dtype=torch.bool).tril()
        torch.testing.assert_close(dl, (mask & tril).sum((-1, -2)).float() / tril.sum())
    m.set_seer_mode("dense")
    assert (m(x).logits - sparse).abs().max() > 1e-3  # dropping blocks changes something
    # the same masks replayed give the same logits
    m.set_seer_mode("sparse")
    torch.testing.assert_close(m(x, seer_ctx=SeerForwardContext(forced_masks=ctx.masks)).logits, sparse)


def test_distill_loss_finite_grads_only_on_gates_lm_loss_unchanged(tiny):
    m = tiny()
    x = _ids(300, B=2)
    with torch.no_grad():
        dense_loss = m(x, labels=x).loss
    m.set_seer_mode("distill").train()
    out = m(x, labels=x)
    torch.testing.assert_close(out.loss, dense_loss, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.gate_loss) and out.gate_loss.item() > 0
    out.gate_loss.backward()
    for name, p in m.named_parameters():
        if ".attn_gate." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} received a gradient from the gate loss"


def test_distill_gate_gradients_same_with_gradient_checkpointing(tiny):
    x = _ids(300, B=1)
    grads = []
    for gc in (False, True):
        m = tiny(seer_mode="distill").train()
        for n, p in m.named_parameters():
            p.requires_grad_(".attn_gate." in n)
        if gc:
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m(x).gate_loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_dense_prefill_then_decode_equals_full_forward(tiny):
    m = tiny()
    x = _ids(140)
    full = m(x).logits
    cache = DynamicCache(config=m.config)
    out = m(x[:, :130], **{CACHE: cache}, use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(130, 139):
        steps.append(m(x[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 129:139], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_sparse_prefill_then_decode_uses_the_cache(tiny):
    """Sparse prefill, then decode token by token == the same prefill followed by one chunked
    forward of the same tokens (both attend densely to the cache); and with every block kept
    it equals one full forward."""
    x = _ids(330)
    for nz, compare_full in ((0.3, False), (1.0, True)):
        m = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=nz, seer_dense_last_rows=0)
        c1 = DynamicCache(config=m.config)
        m(x[:, :320], **{CACHE: c1}, use_cache=True)
        dec = torch.cat([m(x[:, t:t + 1], **{CACHE: c1}, use_cache=True).logits for t in range(320, 330)], 1)
        c2 = DynamicCache(config=m.config)
        m(x[:, :320], **{CACHE: c2}, use_cache=True)
        chunk = m(x[:, 320:330], **{CACHE: c2}, use_cache=True).logits
        torch.testing.assert_close(dec, chunk, atol=2e-5, rtol=1e-5)
        if compare_full:
            torch.testing.assert_close(dec, m(x).logits[:, 320:330], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_after_sparse_prefill(tiny):
    m = tiny(seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    x = _ids(200)
    dense = m.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    m.set_seer_mode("sparse")
    sparse = m.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(dense, sparse) and sparse.shape == (1, 206)
    m.set_seer_mode("sparse", seer_nz_ratio=0.2, seer_dense_last_rows=0)
    out = m.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 206) and m.seer_density().mean() < 0.6


def _left_pad(rows, T, pad_id=0):
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("mode", ["dense", "sparse_all", "sparse"])
@torch.no_grad()
def test_left_padded_batch_matches_unpadded_rows(tiny, mode):
    seer = {"dense": {}, "sparse_all": dict(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0),
            "sparse": dict(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.4,
                           seer_dense_last_rows=0)}[mode]
    m = tiny(**seer)
    a, b = _ids(200, seed=1)[0], _ids(137, seed=2)[0]
    ids, mask = _left_pad([a, b], 200)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = m(ids, attention_mask=mask, position_ids=pos).logits
    if mode != "sparse":
        # rows equal their unpadded single-sequence forward
        torch.testing.assert_close(out[0], m(a[None]).logits[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 63:], m(b[None]).logits[0], atol=2e-5, rtol=1e-5)
    # padded keys are never attended: other pad ids leave real tokens' logits unchanged
    ids2 = ids.clone()
    ids2[1, :63] = 5
    out2 = m(ids2, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out2[1, 63:], out[1, 63:], atol=2e-5, rtol=1e-5)
    assert torch.isfinite(out[1, 63:]).all()


@torch.no_grad()
def test_right_padding_and_noncontiguous_mask(tiny):
    m = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    a = _ids(100, seed=3)[0]
    ids = torch.zeros(1, 150, dtype=torch.long)
    ids[0, :100] = a
    mask = torch.zeros(1, 150, dtype=torch.long)
    mask[0, :100] = 1
    torch.testing.assert_close(m(ids, attention_mask=mask).logits[0, :100], m(a[None]).logits[0], atol=2e-5,
                               rtol=1e-5)
    mask[0, 10] = 0
    with pytest.raises(ValueError, match="contiguous"):
        m(ids, attention_mask=mask)


@torch.no_grad()
def test_baseline_selectors_run_and_keep_diagonal(tiny):
    m = tiny(seer_mode="sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=0.3, seer_dense_last_rows=0)
    x = _ids(1280)
    for sel in ("gate", "streaming", "meanpool", "oracle_max", "oracle_mass"):
        m.set_seer_mode("sparse", seer_selector=sel)
        ctx = SeerForwardContext(masks=[])
        out = m(x, seer_ctx=ctx).logits
        assert torch.isfinite(out).all()
        for mask in ctx.masks:
            assert mask.diagonal(dim1=-2, dim2=-1).all()
        if sel == "streaming":  # sink + the most recent blocks
            k = int((1 - (1 - 0.3) ** 0.5) * 20)
            assert k >= 2
            row = ctx.masks[0][0, 0, 19]
            assert row.nonzero().flatten().tolist() == [0] + list(range(20 - (k - 1), 20))
