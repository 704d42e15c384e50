"""Sliding windows in the selection (modeling_seer/selection.py) and in a windowed model: no
selector, method or keep rule ever selects a block wholly outside the window; density counts
the blocks the window reaches; nz_ratio keeps the share it is asked for; the Qwen3 gate sees q/k
after the per-head norm."""
import pytest
import torch

from seer_attn.kernels import window_block_mask
from seer_attn.modeling_seer import SeerForwardContext
from seer_attn.modeling_seer.conversion import from_stock
from seer_attn.modeling_seer.families import FAMILIES
from seer_attn.modeling_seer.gate import AttnGate
from seer_attn.modeling_seer.selection import (SELECTORS, SPARSITY_METHODS, ScoreInputs, causal_density,
                                               nz_ratio_k, select_blocks)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
METHOD_PARAM = {"threshold": dict(threshold=1e-3), "nz_ratio": dict(nz_ratio=0.5), "coverage": dict(coverage=0.9),
                "gain": dict(gain=0.02), "density": dict(density=0.3)}


def _inputs(gen, T, window):
    B, HQ, H, D = 1, 4, 2, 16
    q, k, v = (torch.randn(B, n, T, D, generator=gen) for n in (HQ, H, H))
    gate = AttnGate(HQ, H, D, hidden_size=32, use_rope=False)
    return ScoreInputs(q, k, v, q, k, 64, D ** -0.5, gate=gate, window=window)


@pytest.mark.parametrize("window", [1, 64, 100, 200, 5000], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("selector", sorted(SELECTORS))
def test_no_selected_block_lies_wholly_outside_the_window(selector, window, gen):
    """Every selector x method, with every keep rule on (the sink, local blocks, dense last rows):
    the mask stays inside the blocks the window reaches, and keeps the diagonal."""
    T = 9 * 64 - 5  # NB = 9, partial last block
    x = _inputs(gen, T, window)
    scores = SELECTORS[selector].scores(x)
    reached = window_block_mask(9, window)
    for method in SPARSITY_METHODS:
        m = select_blocks(scores, method, keep_diagonal=True, keep_sink=True, keep_local=3, dense_last_rows=2,
                          window=window, **METHOD_PARAM[method])
        assert not (m & ~reached).any(), f"{method}: selected blocks outside the window"
        assert m.diagonal(dim1=-2, dim2=-1).all()
        assert torch.equal(m[..., -2:, :], reached[-2:].expand_as(m[..., -2:, :])), "dense last rows = reached"
        d = causal_density(m, window)
        assert ((d > 0) & (d <= 1)).all()
    if window >= T:  # a window longer than the sequence is full causal attention
        for method in SPARSITY_METHODS:
            kw = dict(keep_sink=True, keep_local=1, **METHOD_PARAM[method])
            assert torch.equal(select_blocks(scores, method, window=window, **kw), select_blocks(scores, method, **kw))


def test_sink_is_dropped_once_the_window_leaves_it(gen):
    x = _inputs(gen, 8 * 64, 100)
    m = select_blocks(SELECTORS["streaming"].scores(x), "nz_ratio", nz_ratio=0.3, keep_sink=True, window=100,
                      dense_last_rows=0)
    assert m[..., :3, 0].all()  # block 0 is reached from rows 0-2 (distance 65 < 100 at row 2) ...
    assert not m[..., 3:, 0].any()  # ... not from row 3 on (distance 129)


@pytest.mark.parametrize("window", [100, 1000, 1500], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5, 1.0])
def test_nz_ratio_keeps_its_share_of_the_reached_blocks(rho, window, gen):
    """nz_ratio measured over the blocks the window reaches: the achievable share closest to the
    target, within half a block per row of it once one block per row is not already more
    (exactly 1 at 1.0); the full-causal k is unchanged without a window."""
    NB = 40
    scores = torch.randn(1, 2, NB, NB, generator=gen)
    m = select_blocks(scores, "nz_ratio", nz_ratio=rho, keep_diagonal=False, dense_last_rows=0, window=window)
    c = window_block_mask(NB, window).sum(-1)
    d = causal_density(m, window)
    assert torch.allclose(d, d[0, 0].expand_as(d))  # the same k in every head
    shares = [torch.minimum(torch.tensor(k), c).sum().item() / c.sum().item() for k in range(1, int(c.max()) + 1)]
    assert abs(d[0, 0].item() - rho) <= min(abs(s - rho) for s in shares) + 1e-6
    if rho >= shares[0]:
        assert abs(d[0, 0].item() - rho) <= 0.5 * NB / c.sum().item() + 1e-6
    if rho == 1.0:
        assert d.min().item() == 1.0
    full_causal_k = min(NB, max(1, int((1 - (1 - rho) ** 0.5) * NB)))
    assert nz_ratio_k(rho, NB) == nz_ratio_k(rho, NB, window=NB * 64) == full_causal_k


@torch.no_grad()
@pytest.mark.parametrize("selector", sorted(SELECTORS))
def test_windowed_mistral_masks_stay_in_the_window(selector):
    """In the model: every layer's mask respects Mistral's window, and at density 1 (every
    reached block) the logits are those of dense attention through the same window."""
    torch.manual_seed(0)
    fam = FAMILIES["mistral"]
    stock = fam.stock_model_class(fam.stock_config_class(**TINY, sliding_window=150)).eval()
    seer = from_stock(stock, seer_gate_hidden_size=32, seer_mode="sparse", seer_selector=selector,
                      seer_sparsity_method="threshold", seer_threshold=0.05, seer_keep_sink=True)
    x = torch.randint(0, 96, (1, 450), generator=torch.Generator().manual_seed(1))
    ctx = SeerForwardContext(masks=[])
    seer(x, seer_ctx=ctx)
    reached = window_block_mask(8, 150)
    assert len(ctx.masks) == 2 and all(not (m & ~reached).any() for m in ctx.masks)
    assert seer.seer_density().max().item() <= 1.0
    seer.set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    torch.testing.assert_close(seer(x).logits, stock(x).logits, atol=1e-4, rtol=0)
    assert seer.seer_density().min().item() == 1.0


@torch.no_grad()
def test_qwen3_gate_sees_q_and_k_after_the_head_norm():
    """The gate's inputs are q_norm(q_proj(h)) and k_norm(k_proj(h)) per head, before RoPE."""
    torch.manual_seed(0)
    fam = FAMILIES["qwen3"]
    stock = fam.stock_model_class(fam.stock_config_class(**TINY)).eval()
    for layer in stock.model.layers:  # norms that are not the identity, so skipping one would show
        layer.self_attn.q_norm.weight.uniform_(0.5, 2.0)
        layer.self_attn.k_norm.weight.uniform_(0.5, 2.0)
    seer = from_stock(stock, seer_gate_hidden_size=32, seer_mode="sparse")
    attn = seer.model.layers[0].self_attn
    seen, normed = {}, {}
    attn.attn_gate.register_forward_hook(lambda mod, args, out: seen.update(q=args[0], k=args[1]))
    attn.q_norm.register_forward_hook(lambda mod, args, out: normed.update(q=out.transpose(1, 2)))
    attn.k_norm.register_forward_hook(lambda mod, args, out: normed.update(k=out.transpose(1, 2)))
    h = {}
    seer.model.layers[0].input_layernorm.register_forward_hook(lambda mod, args, out: h.update(x=out))
    seer(torch.randint(0, 96, (1, 130), generator=torch.Generator().manual_seed(2)))
    B, T = 1, 130
    q_raw = attn.q_proj(h["x"]).view(B, T, -1, attn.head_dim)
    assert torch.equal(seen["q"], normed["q"]) and torch.equal(seen["k"], normed["k"])
    torch.testing.assert_close(seen["q"], attn.q_norm(q_raw).transpose(1, 2), rtol=0, atol=0)
    assert not torch.allclose(seen["q"], q_raw.transpose(1, 2), atol=1e-3)
