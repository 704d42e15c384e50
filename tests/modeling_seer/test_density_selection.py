"""The ``density`` sparsity method (modeling_seer/selection.py): the density asked for is the
density reported, up to one block of the layer (or the keep rules' floor); masks grow with the
asked density; each batch row is solved on its own; at the threshold's own density it gives the
threshold's mask; in the model every layer and sequence of a padded batch gets the density."""
import math

import pytest
import torch

from seer_attn.kernels import window_block_mask
from seer_attn.modeling_seer import SeerForwardContext
from seer_attn.modeling_seer.selection import (MASKED_LOGIT, causal_density, causal_fill, density_budget,
                                               keep_rule_mask, select_blocks)

KEEP_RULES = {
    "none": dict(keep_diagonal=False, dense_last_rows=0),
    "diag": dict(keep_diagonal=True, dense_last_rows=0),
    "sink_local": dict(keep_diagonal=True, keep_sink=True, keep_local=1, dense_last_rows=0),
    "all": dict(keep_diagonal=True, keep_sink=True, keep_local=2, dense_last_rows=2),
}
SHAPES = [(1, 1, 4), (2, 3, 9), (1, 9, 33), (3, 2, 64)]  # (B, HQ, NB)
RHOS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def _scores(gen, B, HQ, NB, scale=3.0):
    return causal_fill(torch.randn(B, HQ, NB, NB, generator=gen) * scale)


def _expected_density(rho, NB, HQ, rules, window=None):
    """What the method must report per batch row: round(rho * HQ * R) blocks of the layer's HQ * R
    reached blocks, clipped to [the keep rules' blocks, every reached block]."""
    reached = window_block_mask(NB, window)
    forced = keep_rule_mask(NB, window=window, **rules)
    n, f = int(reached.sum()), int(forced.sum())
    return min(HQ * n, max(HQ * f, math.floor(rho * HQ * n + 0.5))) / (HQ * n), f / n


@pytest.mark.parametrize("rules", list(KEEP_RULES), ids=str)
@pytest.mark.parametrize("B,HQ,NB", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("window", [None, 150], ids=lambda w: f"window{w}")
def test_density_is_what_was_asked(B, HQ, NB, rules, window, gen):
    """Per batch row, the layer's density (mean over heads of the kept share of the reached
    blocks) is the asked density up to half a block of the layer's HQ * R blocks, or the keep
    rules' floor when the asked density is below it."""
    scores = _scores(gen, B, HQ, NB)
    for rho in RHOS:
        m = select_blocks(scores, "density", density=rho, window=window, **KEEP_RULES[rules])
        got = causal_density(m, window).mean(-1)  # [B]: the layer's density of each batch row
        want, floor = _expected_density(rho, NB, HQ, KEEP_RULES[rules], window)
        torch.testing.assert_close(got, torch.full((B,), want), atol=1e-6, rtol=0)
        if rho >= floor:
            n = int(window_block_mask(NB, window).sum())
            assert abs(got - rho).max().item() <= 0.5 / (HQ * n) + 1e-6
        assert not (m & ~window_block_mask(NB, window)).any()  # causal, inside the window
        assert (m | ~keep_rule_mask(NB, window=window, **KEEP_RULES[rules])).all()  # the keep rules hold


@pytest.mark.parametrize("B,HQ,NB", SHAPES[1:], ids=lambda v: str(v))
def test_masks_grow_with_the_asked_density(B, HQ, NB, gen):
    """A higher density keeps every block a lower one keeps (the same ranking, a larger budget)."""
    scores = _scores(gen, B, HQ, NB)
    prev = None
    for rho in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.0):
        m = select_blocks(scores, "density", density=rho, **KEEP_RULES["sink_local"])
        if prev is not None:
            assert not (prev & ~m).any()
            assert (causal_density(m).mean(-1) >= causal_density(prev).mean(-1)).all()
        prev = m
    assert torch.equal(prev, torch.ones(NB, NB, dtype=torch.bool).tril().expand_as(prev))  # 1.0: every block


def test_each_batch_row_is_solved_on_its_own(gen):
    """Rows of very different confidence in one batch: each gets the mask it gets alone, and the
    density asked for (a shared threshold would give the peaked row few blocks, the flat row many)."""
    NB, HQ = 24, 3
    flat = _scores(gen, 1, HQ, NB, scale=0.1)
    peaked = _scores(gen, 1, HQ, NB, scale=8.0)
    mid = _scores(gen, 1, HQ, NB, scale=2.0)
    batch = torch.cat([flat, peaked, mid])
    rules = KEEP_RULES["sink_local"]
    m = select_blocks(batch, "density", density=0.3, **rules)
    for b, alone in enumerate((flat, peaked, mid)):
        assert torch.equal(m[b:b + 1], select_blocks(alone, "density", density=0.3, **rules))
    want, _ = _expected_density(0.3, NB, HQ, rules)
    torch.testing.assert_close(causal_density(m).mean(-1), torch.full((3,), want), atol=1e-6, rtol=0)
    shared = select_blocks(batch, "threshold", threshold=0.05, **rules)
    assert causal_density(shared).mean(-1).std() > 0.05  # what a shared threshold would do instead


@pytest.mark.parametrize("rules", list(KEEP_RULES), ids=str)
@pytest.mark.parametrize("window", [None, 300], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("tau", [1e-3, 1e-2, 5e-2, 0.2])
def test_equals_the_threshold_at_its_own_density(tau, rules, window, gen):
    """Given the density a threshold achieves on one layer's scores, the method keeps the very
    blocks the threshold keeps: the same probabilities, ranked over the whole layer."""
    scores = _scores(gen, 1, 4, 40)
    thr = select_blocks(scores, "threshold", threshold=tau, window=window, **KEEP_RULES[rules])
    rho = causal_density(thr, window).mean().item()
    assert torch.equal(select_blocks(scores, "density", density=rho, window=window, **KEEP_RULES[rules]), thr)


def test_padding_blocks_are_taken_last(gen):
    """Blocks whose score is masked (key blocks without a real token, query rows of padding
    only, whose softmax is uniform) are causal blocks the density counts, but the method takes
    them only once every real block is kept."""
    NB, HQ = 10, 2
    scores = _scores(gen, 1, HQ, NB)
    scores[..., :3] = MASKED_LOGIT  # left padding: key blocks 0-2 hold no real token
    m = select_blocks(scores, "density", density=0.4, keep_diagonal=False, dense_last_rows=0)
    real = torch.ones(NB, NB, dtype=torch.bool).tril()
    real[:, :3] = False
    assert not m[..., :3].any() and int(m.sum()) == math.floor(0.4 * HQ * 55 + 0.5) <= int(real.sum()) * HQ
    full = select_blocks(scores, "density", density=1.0, keep_diagonal=False, dense_last_rows=0)
    assert int(full[..., :3].sum()) == HQ * (1 + 2 + 8 * 3)  # every causal block, padding ones too


def test_budget_counts_the_keep_rules_and_clips():
    NB = 8
    reached = window_block_mask(NB)
    forced = keep_rule_mask(NB, keep_diagonal=True, keep_sink=True, dense_last_rows=0)
    assert int(forced.sum()) == 15  # 8 diagonal + 7 sink blocks below it
    assert density_budget(0.5, NB, forced, reached, heads=2) == math.floor(0.5 * 72 + 0.5) - 30
    assert density_budget(0.01, NB, forced, reached, heads=2) == 0  # below the floor: the keep rules only
    assert density_budget(1.0, NB, forced, reached, heads=2) == 2 * (36 - 15)


@torch.no_grad()
def test_model_gives_every_layer_and_padded_row_the_density(tiny):
    """In sparse mode with ``seer_sparsity_method="density"``, every layer of every sequence of a
    left-padded batch reports the asked density (the padded row's own solve), and density 1 is
    dense attention."""
    model = tiny(seer_mode="sparse", seer_sparsity_method="density", seer_density=0.4, seer_keep_sink=True,
                 seer_dense_last_rows=0)
    ids = torch.randint(0, 96, (2, 9 * 64 - 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :150] = 0  # row 0 is left-padded
    ctx = SeerForwardContext(masks=[])
    model(input_ids=ids, attention_mask=mask, seer_ctx=ctx)
    HQ = model.config.num_attention_heads
    want, _ = _expected_density(0.4, 9, HQ, dict(keep_diagonal=True, keep_sink=True, dense_last_rows=0))
    per_row = model.seer_density().mean(-1)  # [layers, batch]
    torch.testing.assert_close(per_row, torch.full_like(per_row, want), atol=1e-6, rtol=0)
    for m in ctx.masks:  # row 0's two key blocks of padding only: beyond the sink, never picked before real ones
        assert not m[0, :, 2:, 1].any()
    dense = model.set_seer_mode("dense")(input_ids=ids[1:]).logits
    sparse = model.set_seer_mode("sparse", seer_density=1.0)(input_ids=ids[1:]).logits
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=0)


@pytest.mark.requires_cuda
def test_density_on_the_gpu_at_32k_blocks():
    """On CUDA at 32k tokens (512 blocks, 32 heads): every batch row keeps the asked density to one
    block, and the mask is the CPU's up to blocks whose probabilities tie within rounding."""
    gen = torch.Generator().manual_seed(0)
    scores = _scores(gen, 2, 32, 512)
    rules = KEEP_RULES["sink_local"]
    gpu = select_blocks(scores.cuda(), "density", density=0.1, **rules)
    want, _ = _expected_density(0.1, 512, 32, rules)
    torch.testing.assert_close(causal_density(gpu).mean(-1).cpu(), torch.full((2,), want), atol=1e-6, rtol=0)
    cpu = select_blocks(scores, "density", density=0.1, **rules)
    assert (gpu.cpu() != cpu).sum().item() <= 1e-4 * cpu.sum().item()


@pytest.mark.parametrize("density, profile, floor, shares", [
    (0.5, (1.5, 0.5), 0.1, (0.75, 0.25)),  # nothing clipped: the profile as given (mean 1)
    (0.5, (3.0, 1.0), 0.1, (0.75, 0.25)),  # its mean does not matter, its spread does
    (0.7, (1.6, 0.4), 0.1, (1.0, 0.4)),  # the cap: what layer 0 cannot take goes to layer 1
    (0.6, (1.8, 0.2), 0.25, (0.95, 0.25)),  # the floor: what it holds up in layer 1 comes out of layer 0
    (0.2, (1.0, 1.0, 4.0), 0.25, (0.25, 0.25, 0.25)),  # asked below the floor: the floor everywhere
])
def test_profile_scale_keeps_the_mean(density, profile, floor, shares):
    from seer_attn.modeling_seer.selection import profile_scale
    s = profile_scale(density, profile, floor)
    got = [min(1.0, max(floor, s * density * p)) for p in profile]
    assert got == pytest.approx(shares, abs=1e-9)
    assert sum(got) / len(got) == pytest.approx(max(density, floor), abs=1e-9)


def test_keep_rule_floor_counts_the_forced_blocks():
    from seer_attn.modeling_seer.selection import keep_rule_floor
    NB = 8  # 36 causal blocks; diagonal 8, sink +7, one local block +7 (one shared with the sink), 2 last rows
    assert keep_rule_floor(NB, True, False, 0, 0) == pytest.approx(8 / 36)
    assert keep_rule_floor(NB, True, True, 1, 0) == pytest.approx((8 + 7 + 7 - 1) / 36)
    assert keep_rule_floor(NB, True, False, 0, 2) == pytest.approx((6 + 7 + 8) / 36)


@torch.no_grad()
def test_model_warns_once_when_the_density_is_under_the_floor(tiny, caplog):
    """A sparse prefill asked for less than the keep rules keep anyway says so, once per setting
    and length, naming the asked density and the floor; above the floor it says nothing."""
    from seer_attn.modeling_seer import seer_layer
    from seer_attn.modeling_seer.selection import keep_rule_floor
    seer_layer._warn_under_floor.cache_clear()
    model = tiny(seer_mode="sparse", seer_sparsity_method="density", seer_density=0.05, seer_keep_sink=True,
                 seer_keep_local=1, seer_dense_last_rows=2)
    ids = torch.randint(0, 96, (1, 6 * 64), generator=torch.Generator().manual_seed(2))
    floor = keep_rule_floor(6, True, True, 1, 2)
    with caplog.at_level("WARNING", logger=seer_layer.logger.name):
        model(input_ids=ids)
        model(input_ids=ids)
        under = [r.getMessage() for r in caplog.records if "floor" in r.getMessage()]
        assert len(under) == 1 and "seer_density=0.05" in under[0] and f"{floor:.3f}" in under[0], under
        caplog.clear()
        model.set_seer_mode("sparse", seer_density=min(1.0, floor + 0.2))(input_ids=ids)
        model.set_seer_mode("dense")(input_ids=ids)
        assert not [r for r in caplog.records if "floor" in r.getMessage()]
    assert model.set_seer_mode("sparse", seer_density=0.05)(input_ids=ids).logits.isfinite().all()
