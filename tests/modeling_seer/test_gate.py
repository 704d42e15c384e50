import math

import pytest
import torch

from seer_attn.modeling_seer.gate import (MASKED_LOGIT, AttnGate, block_pool, causal_density, gate_distill_loss,
                                          select_blocks)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_block_pool_matches_explicit_loops(T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, 3, T, 8, generator=g)
    out = block_pool(x, 64, ("max", "min", "avg"))
    NB = math.ceil(T / 64)
    assert out.shape == (2, 3, NB, 24)
    for i in range(NB):
        blk = x[:, :, i * 64:(i + 1) * 64]
        torch.testing.assert_close(out[:, :, i, :8], blk.amax(2))
        torch.testing.assert_close(out[:, :, i, 8:16], blk.amin(2))
        torch.testing.assert_close(out[:, :, i, 16:], blk.mean(2))


def test_block_pool_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 130, 4, generator=g)
    valid = torch.zeros(1, 130, dtype=torch.bool)
    valid[:, 70:] = True  # left padding: block 0 is all padding, block 1 partly
    out = block_pool(x, 64, ("avg", "max"), valid)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    torch.testing.assert_close(out[:, :, 1, :4], x[:, :, 70:128].mean(2))
    torch.testing.assert_close(out[:, :, 1, 4:], x[:, :, 70:128].amax(2))


def test_gate_shapes_gqa_sharing_and_causality():
    g = torch.Generator().manual_seed(1)
    gate = AttnGate(num_heads=6, num_kv_heads=2, head_dim=16, hidden_size=32)
    assert gate.q_weight.shape == (6, 16, 32) and gate.k_weight.shape == (2, 48, 32)
    q, k = torch.randn(1, 6, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    s = gate(q, k)
    assert s.shape == (1, 6, 5, 5) and s.dtype == torch.float32
    assert (s.triu(1)[s.triu(1) != 0] == MASKED_LOGIT).all()
    # heads of one GQA group share the K map: changing KV head 1's keys leaves heads 0-2 alone
    k2 = k.clone()
    k2[:, 1] += 1.0
    s2 = gate(q, k2)
    assert torch.equal(s[:, :3], s2[:, :3]) and not torch.equal(s[:, 3:], s2[:, 3:])


def test_gate_rope_is_relative_in_block_positions():
    g = torch.Generator().manual_seed(2)
    gate = AttnGate(2, 2, 16, hidden_size=32)
    q, k = torch.randn(1, 2, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))

    def rope(offset):
        pos = torch.arange(4).float()[None] * 64 + offset
        f = pos[..., None] * inv
        e = torch.cat([f, f], -1)
        return e.cos(), e.sin()
    # shifting every position by the same amount keeps q.k (RoPE is relative)
    torch.testing.assert_close(gate(q, k, rope(0)), gate(q, k, rope(640)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(gate(q, k, rope(0)), gate(q, k, None), atol=1e-3)


def test_threshold_mask_consistent_with_gate_scores():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 9, 9, generator=g) * 3
    NB = 9
    scores = scores.masked_fill(~torch.ones(NB, NB, dtype=torch.bool).tril(), MASKED_LOGIT)
    tau = 0.08
    m = select_blocks(scores, "threshold", threshold=tau, keep_diagonal=False, dense_last_rows=0)
    p = torch.softmax(scores, -1)
    assert torch.equal(m, (p >= tau).tril())
    m2 = select_blocks(scores, "threshold", threshold=tau, keep_diagonal=True, keep_sink=True, dense_last_rows=2)
    assert m2.diagonal(dim1=-2, dim2=-1).all() and m2[..., 0].all() and m2[..., -2:, :].tril(0).sum() > 0
    assert torch.equal(m2[..., -2:, :], torch.ones(NB, NB, dtype=torch.bool).tril()[-2:].expand(2, 3, 2, NB))
    assert not m2.triu(1).any()


def test_keep_local_adds_the_blocks_just_before_the_diagonal():
    NB = 8
    scores = torch.zeros(1, 2, NB, NB)
    scores[..., 0] = 5.0  # top-1 of every row: the first block
    scores = scores.masked_fill(~torch.ones(NB, NB, dtype=torch.bool).tril(), MASKED_LOGIT)
    base = select_blocks(scores, "nz_ratio", nz_ratio=0.01, keep_diagonal=True, dense_last_rows=0)
    i = torch.arange(NB)
    first_and_diag = (i[None, :] == 0) | (i[:, None] == i[None, :])
    assert torch.equal(base, first_and_diag.expand_as(base))
    m = select_blocks(scores, "nz_ratio", nz_ratio=0.01, keep_diagonal=True, dense_last_rows=0, keep_local=2)
    band = ((i[:, None] - i[None, :]) >= 1) & ((i[:, None] - i[None, :]) <= 2)
    assert torch.equal(m, base | band)


def test_nz_ratio_keeps_reference_k_per_row():
    g = torch.Generator().manual_seed(4)
    NB = 32
    scores = torch.randn(1, 2, NB, NB, generator=g)
    m = select_blocks(scores.masked_fill(~torch.ones(NB, NB, dtype=torch.bool).tril(), MASKED_LOGIT),
                      "nz_ratio", nz_ratio=0.3, keep_diagonal=False, dense_last_rows=0)
    k = int((1 - math.sqrt(1 - 0.3)) * NB)
    rows = m.sum(-1)
    full_rows = torch.arange(NB) + 1
    assert torch.equal(rows, torch.minimum(full_rows, torch.tensor(k)).expand_as(rows))
    assert abs(causal_density(m).mean().item() - 0.3) < 0.06


def test_coverage_keeps_fewest_blocks_reaching_the_mass():
    p = torch.tensor([[[[0.5, 0.3, 0.15, 0.05]]]]).expand(1, 1, 4, 4).clone()
    scores = torch.log(p)
    m = select_blocks(scores, "coverage", coverage=0.8, keep_diagonal=False, dense_last_rows=0)
    assert m[0, 0, 3].tolist() == [True, True, False, False]
    m = select_blocks(scores, "coverage", coverage=0.81, keep_diagonal=False, dense_last_rows=0)
    assert m[0, 0, 3].tolist() == [True, True, True, False]


def test_gain_keeps_blocks_holding_a_share_of_the_kept_mass():
    """The last row: the diagonal (forced) holds 0.1; 0.4 would hold 0.8 of 0.5, 0.3 then 0.375 of 0.8,
    0.2 then 0.2 of 1.0: gain 0.3 keeps two free blocks, 0.19 all three, and the order is the
    probabilities', not the positions'."""
    p = torch.tensor([0.3, 0.2, 0.4, 0.1]).expand(1, 1, 4, 4).clone()
    scores = torch.log(p)
    m = select_blocks(scores, "gain", gain=0.3, keep_diagonal=True, dense_last_rows=0)
    assert m[0, 0, 3].tolist() == [True, False, True, True]
    m = select_blocks(scores, "gain", gain=0.19, keep_diagonal=True, dense_last_rows=0)
    assert m[0, 0, 3].tolist() == [True, True, True, True]
    m = select_blocks(scores, "gain", gain=0.81, keep_diagonal=True, dense_last_rows=0)
    assert m[0, 0, 3].tolist() == [False, False, False, True]  # 0.4 / 0.5 < 0.81: the forced block alone


def _row_log_mass(p, forced_mass, kept):
    return math.log(forced_mass + sum(p[:kept]))


def test_gain_is_the_best_spend_of_its_blocks():
    """For the number of free blocks the gain rule keeps over a layer, no other split of that number
    over the rows (each row its most probable free blocks) keeps a larger summed log mass: the
    rule is the greedy optimum of a separable concave objective. Checked by exhaustive search on
    3 rows of 4 free blocks."""
    g = torch.Generator().manual_seed(7)
    NB = 5
    for trial in range(6):
        scores = (torch.randn(1, 1, NB, NB, generator=g) * 2).masked_fill(~torch.ones(NB, NB, dtype=torch.bool).tril(),
                                                                         MASKED_LOGIT)
        probs = torch.softmax(scores, -1)[0, 0]
        rows = [NB - 1, NB - 2, NB - 3]  # rows with 4, 3 and 2 free blocks beside the diagonal
        free = [sorted(probs[r, :r].tolist(), reverse=True) for r in rows]
        forced = [probs[r, r].item() for r in rows]
        for gain in (0.05, 0.15, 0.3, 0.6):
            m = select_blocks(scores, "gain", gain=gain, keep_diagonal=True, dense_last_rows=0)[0, 0]
            kept = [int(m[r, :r].sum()) for r in rows]
            got = sum(_row_log_mass(f, fm, k) for f, fm, k in zip(free, forced, kept))
            n = sum(kept)
            best = max(sum(_row_log_mass(f, fm, k) for f, fm, k in zip(free, forced, split))
                       for split in ((a, b, n - a - b) for a in range(5) for b in range(4)) if 0 <= split[2] <= 2)
            assert got >= best - 1e-9, (trial, gain, kept)


def test_gain_density_falls_with_the_parameter_and_keeps_the_keep_rules():
    g = torch.Generator().manual_seed(8)
    NB = 24
    scores = torch.randn(2, 3, NB, NB, generator=g) * 3
    dens, prev = [], None
    for gain in (1e-4, 0.01, 0.05, 0.2, 0.6, 0.99):
        m = select_blocks(scores, "gain", gain=gain, keep_diagonal=True, keep_sink=True, keep_local=1,
                          dense_last_rows=0)
        assert not m.triu(1).any()
        assert m.diagonal(dim1=-2, dim2=-1).all() and m[..., 0].all() and m.diagonal(-1, -2, -1).all()
        if prev is not None:
            assert not (m & ~prev).any()  # a larger gain keeps a subset
        prev = m
        dens.append(causal_density(m).mean().item())
    assert dens[0] > 0.8 and dens[-1] < dens[2] < dens[0]


def test_distill_loss_zero_at_target_and_positive_elsewhere():
    g = torch.Generator().manual_seed(5)
    NB = 8
    tril = torch.ones(NB, NB, dtype=torch.bool).tril()
    target = torch.rand(1, 2, NB, NB, generator=g) * tril
    target = target / target.sum(-1, keepdim=True)
    perfect = torch.log(target.clamp_min(1e-30)).masked_fill(~tril, MASKED_LOGIT)
    assert gate_distill_loss(perfect, target).abs().item() < 1e-6
    wrong = torch.zeros(1, 2, NB, NB).masked_fill(~tril, MASKED_LOGIT)
    loss = gate_distill_loss(wrong, target)
    assert loss.item() > 1e-3 and torch.isfinite(loss)


@pytest.mark.parametrize("w", [0.5, 4.0])
def test_distill_loss_peak_weight_weighs_rows_by_their_largest_target(w):
    """``peak_weight`` w: the mean of the per-row KL weighted by 1 + w * max(target row) (0: the
    plain mean); an error on a peaked row costs more than the same error on a flat one."""
    g = torch.Generator().manual_seed(6)
    NB = 8
    tril = torch.ones(NB, NB, dtype=torch.bool).tril()
    target = (torch.rand(2, 3, NB, NB, generator=g) ** 4) * tril
    target = target / target.sum(-1, keepdim=True)
    scores = torch.randn(2, 3, NB, NB, generator=g).masked_fill(~tril, MASKED_LOGIT)
    r0 = NB // 4
    t, logp = target[:, :, r0:], torch.log_softmax(scores[:, :, r0:], -1)
    kl_rows = (torch.xlogy(t, t) - t * logp).sum(-1)
    weights = 1 + w * t.amax(-1)
    torch.testing.assert_close(gate_distill_loss(scores, target, peak_weight=w),
                               (kl_rows * weights).sum() / (weights.sum() * NB))
    assert gate_distill_loss(scores, target, peak_weight=0.0) == gate_distill_loss(scores, target)
    peaked = torch.zeros(1, 1, NB, NB)
    peaked[..., 0] = 1.0  # every row's target: all on the sink block
    flat = tril[None, None].float() / tril.sum(-1, keepdim=True)
    both = torch.cat([peaked, flat], dim=1)
    off = torch.zeros(1, 2, NB, NB).masked_fill(~tril, MASKED_LOGIT)  # a uniform guess, wrong for both
    plain = gate_distill_loss(off, both)
    shifted = torch.cat([peaked, peaked], dim=1)  # the error of the peaked head alone, twice
    assert gate_distill_loss(off, both, peak_weight=w) > plain
    assert gate_distill_loss(off, shifted, peak_weight=w) == pytest.approx(gate_distill_loss(off, shifted).item())
