"""The mean-pooled prior on the gate's scores (``seer_meanpool_prior``,
selection.with_meanpool_prior): off by default and then the gate alone; its softmax is the
normalised geometric mixture of the gate's and the mean-pooled rows; share 1 ranks by the prior;
what calibration reads (distill mode's scores) is what sparse mode selects from; a window still
bounds the selection."""
import pytest
import torch

from seer_attn.kernels import window_block_mask
from seer_attn.modeling_seer import SeerForwardContext, SeerLlamaConfig, SeerLlamaForCausalLM
from seer_attn.modeling_seer.gate import AttnGate
from seer_attn.modeling_seer.selection import (MASKED_LOGIT, SELECTORS, SPARSITY_METHODS, ScoreInputs,
                                               meanpool_scores, select_blocks, select_blocks_for,
                                               window_fill, with_meanpool_prior)

METHOD_PARAM = {"threshold": dict(threshold=1e-2), "nz_ratio": dict(nz_ratio=0.3), "coverage": dict(coverage=0.8),
                "gain": dict(gain=0.05), "density": dict(density=0.3)}


def _inputs(gen, T=7 * 64 - 9, window=None, prior=0.0):
    B, HQ, H, D = 1, 4, 2, 16
    q, k, v = (torch.randn(B, n, T, D, generator=gen) for n in (HQ, H, H))
    gate = AttnGate(HQ, H, D, hidden_size=32, use_rope=False)
    return ScoreInputs(q, k, v, q, k, 64, D ** -0.5, gate=gate, window=window, meanpool_prior=prior)


@torch.no_grad()
def test_weight_zero_is_the_gate_alone(gen):
    x = _inputs(gen)
    g = x.gate(x.q_pre, x.k_pre, rope=None)
    assert with_meanpool_prior(g, x.q, x.k, 64, 0.0) is g
    assert torch.equal(SELECTORS["gate"].scores(x), g)


@torch.no_grad()
@pytest.mark.parametrize("weight", [0.25, 0.5, 1.0])
def test_softmax_is_the_normalised_geometric_mixture(weight, gen):
    x = _inputs(gen)
    g = x.gate(x.q_pre, x.k_pre, rope=None)
    m = meanpool_scores(x.q, x.k, 64)
    out = with_meanpool_prior(g, x.q, x.k, 64, weight)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    assert (out[..., ~causal] == MASKED_LOGIT).all()
    prod = torch.softmax(g.float(), -1) ** (1 - weight) * torch.softmax(m, -1) ** weight
    torch.testing.assert_close(torch.softmax(out, -1), prod / prod.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_share_one_ranks_by_the_prior(gen):
    x = _inputs(gen)
    g = x.gate(x.q_pre, x.k_pre, rope=None)
    m = meanpool_scores(x.q, x.k, 64)
    out = with_meanpool_prior(g, x.q, x.k, 64, 1.0)
    rows = torch.arange(1, 7)  # rows with a choice
    assert torch.equal(out[..., rows, :].argmax(-1), m[..., rows, :].argmax(-1))
    assert not torch.equal(g[..., rows, :].argmax(-1), m[..., rows, :].argmax(-1))  # the prior changed the ranking


@torch.no_grad()
@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_the_prior_keeps_window_filled_entries_masked(weight, gen):
    # the layer's distill and gate-loss paths window-fill the gate's logits once, before the prior
    x = _inputs(gen)
    g = window_fill(x.gate(x.q_pre, x.k_pre, rope=None), 100, 64)
    out = with_meanpool_prior(g, x.q, x.k, 64, weight)
    assert torch.equal(out == MASKED_LOGIT, g == MASKED_LOGIT)
    assert (~window_block_mask(7, 100) & torch.ones(7, 7, dtype=torch.bool).tril()).any()  # the window masks some


@torch.no_grad()
@pytest.mark.parametrize("window", [100, 300], ids=lambda w: f"w{w}")
def test_the_window_bounds_the_selection_with_the_prior(window, gen):
    x = _inputs(gen, window=window, prior=1.0)
    scores = SELECTORS["gate"].scores(x)
    reached = window_block_mask(7, window)
    for method in SPARSITY_METHODS:
        m = select_blocks(scores, method, keep_sink=True, keep_local=1, window=window, **METHOD_PARAM[method])
        assert not (m & ~reached).any(), method


PARAM = {"threshold": 0.12, "gain": 0.1, "nz_ratio": 0.3, "density": 0.3}


@torch.no_grad()
@pytest.mark.parametrize("method", list(PARAM))
def test_calibration_reads_what_sparse_mode_selects_from(method, tiny_kwargs):
    """One layer, so both modes see the same q and k: the scores distill mode hands to
    calibration (the prior applied) select the very mask sparse mode uses, and the prior changes it."""
    masks = {}
    for prior in (0.0, 0.8):
        torch.manual_seed(0)
        cfg = SeerLlamaConfig(**{**tiny_kwargs, "num_hidden_layers": 1}, seer_gate_hidden_size=32,
                              seer_meanpool_prior=prior, seer_sparsity_method=method, seer_dense_last_rows=0,
                              **{f"seer_{method}": PARAM[method]})
        model = SeerLlamaForCausalLM(cfg).eval()
        for name, p in model.named_parameters():  # scores that rank (fresh ones are near uniform)
            if "attn_gate" in name or "q_proj" in name or "k_proj" in name:
                p.normal_(0, 0.25, generator=torch.Generator().manual_seed(len(name)))
        x = torch.randint(0, 96, (1, 9 * 64), generator=torch.Generator().manual_seed(3))
        got = []
        model.set_seer_mode("distill")
        model(x, seer_ctx=SeerForwardContext(on_gate_scores=lambda i, s, w: got.append(s)))
        model.set_seer_mode("sparse")
        ctx = SeerForwardContext(masks=[])
        model(x, seer_ctx=ctx)
        assert torch.equal(ctx.masks[0], select_blocks_for(got[0], model.config, None, 0))
        masks[prior] = ctx.masks[0]
    assert not torch.equal(masks[0.0], masks[0.8])


@pytest.mark.parametrize("through", [False, True], ids=["gate-alone", "distill-prior"])
def test_distill_prior_puts_the_mixture_in_the_loss(through, tiny_kwargs, monkeypatch):
    """With ``seer_distill_prior`` the distillation loss, and fine-tuning's gate loss, read the
    scores sparse mode selects from (the gate mixed with the prior), and the gate still learns;
    without it they read the gate's own logits (the paper's loss)."""
    import seer_attn.modeling_seer.seer_layer as layer
    seen, real = [], layer.gate_distill_loss
    monkeypatch.setattr(layer, "gate_distill_loss", lambda s, t, **kw: seen.append(s) or real(s, t, **kw))
    torch.manual_seed(0)
    cfg = SeerLlamaConfig(**{**tiny_kwargs, "num_hidden_layers": 1}, seer_gate_hidden_size=32,
                          seer_meanpool_prior=0.5, seer_distill_prior=through, seer_dense_last_rows=0)
    model = SeerLlamaForCausalLM(cfg)
    gate = model.model.layers[0].self_attn.attn_gate
    x = torch.randint(0, 96, (1, 9 * 64), generator=torch.Generator().manual_seed(3))
    got = []
    model.set_seer_mode("distill")
    out = model(x, seer_ctx=SeerForwardContext(on_gate_scores=lambda i, s, w: got.append(s)))
    assert torch.equal(seen[0].detach(), got[0]) == through
    out.gate_loss.backward()
    assert gate.q_weight.grad is not None and gate.q_weight.grad.abs().sum() > 0
    model.set_seer_mode("sparse")
    ctx = SeerForwardContext(gate_loss_layers=frozenset({0}), masks=[])
    model(x, labels=x, seer_ctx=ctx)
    assert torch.allclose(seen[1].detach(), got[0], atol=1e-5) == through
    assert torch.equal(ctx.masks[0], select_blocks_for(got[0], model.config, None, 0))
