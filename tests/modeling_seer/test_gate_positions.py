"""Gate RoPE positions: every block sits at the position of its first real token, for every
T % 64 and with left or right padding (issue 11 item 1: a partial last block got ~-2^63)."""
import pytest
import torch

from seer_attn.modeling_seer import SeerForwardContext
from seer_attn.modeling_seer import seer_layer

T_CASES = [1, 63, 64, 65, 100, 127, 150, 191]
SPARSE = dict(seer_sparsity_method="nz_ratio", seer_nz_ratio=0.2, seer_dense_last_rows=0)
PAD = 128  # left padding by a multiple of 64 keeps the real blocks aligned


def _ids(T, seed):
    return torch.randint(0, 96, (T,), generator=torch.Generator().manual_seed(seed))


def _batch(prompt, pad):
    """Row 0: ``prompt`` left-padded by ``pad``; row 1: the same prompt right-padded by ``pad``."""
    T = len(prompt)
    ids = torch.zeros(2, T + pad, dtype=torch.long)
    mask = torch.zeros(2, T + pad, dtype=torch.long)
    ids[0, pad:], mask[0, pad:] = prompt, 1
    ids[1, :T], mask[1, :T] = prompt, 1
    return ids, mask


def _positions(mask, kind):
    """``None`` (the model's default, 0..T-1 over padding too) or generate's cumsum ids."""
    return None if kind == "default" else (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("kind", ["default", "generate"])
@pytest.mark.parametrize("T", T_CASES, ids=[f"T{t}" for t in T_CASES])
@torch.no_grad()
def test_sparse_padded_rows_match_the_prompt_alone(tiny, T, kind):
    m = tiny().set_seer_mode("sparse", **SPARSE)
    prompt = _ids(T, seed=T)
    alone = m(prompt[None]).logits[0, -1]
    ids, mask = _batch(prompt, PAD)
    out = m(ids, attention_mask=mask, position_ids=_positions(mask, kind)).logits
    torch.testing.assert_close(out[0, -1], alone, atol=1e-5, rtol=1e-5)  # left-padded: last position
    torch.testing.assert_close(out[1, T - 1], alone, atol=1e-5, rtol=1e-5)  # right-padded: its last real token


@pytest.mark.parametrize("T", T_CASES, ids=[f"T{t}" for t in T_CASES])
@torch.no_grad()
def test_distill_padded_rows_match_the_prompt_alone(tiny, T, monkeypatch):
    """The gate scores and pooled targets of the padded rows' real blocks equal the unpadded
    run's, and so does the gate loss recomputed on those blocks."""
    m = tiny().set_seer_mode("distill")
    scores, pooled = [], []
    for layer in m.model.layers:
        layer.self_attn.attn_gate.register_forward_hook(lambda mod, args, out: scores.append(out))
    real_pool = seer_layer.attn_with_pooling

    def recording_pool(*args, **kwargs):
        out, p = real_pool(*args, **kwargs)
        pooled.append(p)
        return out, p

    monkeypatch.setattr(seer_layer, "attn_with_pooling", recording_pool)
    prompt = _ids(T, seed=T)
    alone_loss = m(prompt[None]).gate_loss
    alone_scores, alone_pooled = scores[:], pooled[:]
    scores.clear(), pooled.clear()
    ids, mask = _batch(prompt, PAD)
    m(ids, attention_mask=mask, position_ids=_positions(mask, "default"))
    nb, pb = len(alone_scores[0][0, 0]), PAD // 64
    for row, real in ((0, slice(pb, pb + nb)), (1, slice(0, nb))):
        loss = 0.0
        for s, p, s1, p1 in zip(scores, pooled, alone_scores, alone_pooled):
            s, p = s[row:row + 1, :, real, real], p[row:row + 1, :, real, real]
            torch.testing.assert_close(s, s1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(p, p1, atol=1e-5, rtol=1e-5)
            loss = loss + seer_layer.gate_distill_loss(s, p)
        torch.testing.assert_close(loss * m.config.seer_distill_loss_scale, alone_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", T_CASES, ids=[f"T{t}" for t in T_CASES])
@torch.no_grad()
def test_sparse_dense_selection_with_unaligned_left_padding(tiny, T):
    """Padding by 64+37 shifts the block boundaries (so the gate sees other blocks); with every
    block kept the padded row still equals the prompt alone."""
    m = tiny().set_seer_mode("sparse", seer_sparsity_method="nz_ratio", seer_nz_ratio=1.0)
    prompt = _ids(T, seed=T)
    ids, mask = _batch(prompt, 101)
    out = m(ids, attention_mask=mask).logits
    alone = m(prompt[None]).logits[0, -1]
    torch.testing.assert_close(out[0, -1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, T - 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad", [0, 37, 64, 101], ids=lambda p: f"pad{p}")
@pytest.mark.parametrize("T", [1, 63, 64, 65, 150], ids=lambda t: f"T{t}")
def test_gate_block_positions_are_first_real_token_positions(tiny, T, pad):
    """``gate_rope`` is the gate RoPE table at each block's first real token position (0 for a
    block of padding only), checked against a plain loop, for left and right padding."""
    m = tiny(seer_mode="sparse")
    n = T + pad
    mask = torch.zeros(2, n, dtype=torch.long)
    mask[0, pad:] = 1  # left padding
    mask[1, :T] = 1  # right padding
    for pos in (None, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0), torch.arange(n)[None] * 3 + 5):
        ctx = SeerForwardContext()
        m.model._prepare_context(ctx, mask if pad else None, pos, n, torch.device("cpu"))
        full = (torch.arange(n)[None] if pos is None else pos).expand(2, n)
        want = torch.zeros(2, (n + 63) // 64, dtype=torch.long)
        for b in range(2):
            for i in range(want.shape[1]):
                real = [t for t in range(64 * i, min(n, 64 * i + 64)) if mask[b, t] or not pad]
                want[b, i] = full[b, real[0]] if real else 0
        cos, sin = m.model.gate_rotary_emb(torch.empty(0), want)
        got_cos, got_sin = (t.expand(2, -1, -1) for t in ctx.gate_rope)
        assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin), (pos, want)
