"""attn_with_pooling with backend="triton" (interpreter on CPU, compiled on CUDA) against
``attn_with_pooling_ref``: the attention output under the style guide's low-precision rule,
the pooled block map (float32; pool_op "max" and "sum") with a tight tolerance and its
invariants (rows sum to 1, exact zeros above the diagonal when causal, no NaN anywhere).
"""
import warnings

import pytest
import torch
from kernel_inputs import dense_cases, grads, nb as _nb, qkv as _qkv, randn as _randn, up as _up

from seer_attn.kernels import attn_with_pooling, attn_with_pooling_ref

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SHAPES = {1: (2, 2, 2), 3: (1, 6, 2)}  # (B, HQ, H) per GQA ratio
OUT_BUDGET = {torch.float16: dict(slack=1e-3, cap=2e-2), torch.float32: dict(slack=1e-5, cap=1e-4)}
GRAD_BUDGET = {torch.float16: dict(slack=1e-3, cap=2e-2), torch.float32: dict(slack=1e-5, cap=1e-4)}
#: The pooled map is float32 probabilities computed from the same inputs in fp32 in both the
#: kernel and the reference: only summation order differs.
POOL_ATOL, POOL_RTOL = 1e-5, 1e-4


def _check_pooled(pooled, ref_pooled, causal, live_rows=None):
    """Tight comparison plus invariants. ``live_rows``: bool [B, NB] of block rows holding at
    least one real query (all when None); the others must be all zero."""
    B, HQ, NB, _ = ref_pooled.shape
    assert pooled.dtype == torch.float32 and pooled.shape == ref_pooled.shape
    n_bad = (~torch.isfinite(pooled)).sum().item()
    assert n_bad == 0, f"{n_bad} non-finite pooled entries (NaN-poisoned entries not written?)"
    assert not pooled.requires_grad
    torch.testing.assert_close(pooled, ref_pooled, atol=POOL_ATOL, rtol=POOL_RTOL)
    assert (pooled >= 0).all()
    if causal:
        upper = torch.ones(NB, NB, dtype=torch.bool, device=pooled.device).triu(1)
        assert torch.equal(pooled[..., upper], torch.zeros_like(pooled[..., upper])), "above-diagonal blocks not 0"
    if live_rows is None:
        live_rows = torch.ones(B, NB, dtype=torch.bool, device=pooled.device)
    live = live_rows[:, None, :].expand(B, HQ, NB)
    sums = pooled.sum(-1)
    torch.testing.assert_close(sums[live], torch.ones_like(sums[live]), atol=1e-5, rtol=0)
    assert torch.equal(pooled[~live], torch.zeros_like(pooled[~live])), "dead block rows must be all 0"


@pytest.mark.parametrize("pool_op", ["max", "sum"])
@pytest.mark.parametrize("T, gqa, D, dtype, causal",
                         dense_cases(extra=[(200, 3, 128, "fp32", True), (63, 1, 128, "fp32", False)]))
def test_forward_and_pooled_map_match_reference(T, gqa, D, dtype, causal, pool_op, gen, device, error_budget):
    """pool_op "max": SeerAttention's target; "sum": the probability mass of each block."""
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    out, pooled = attn_with_pooling(q, k, v, causal=causal, backend="triton", pool_op=pool_op)
    assert out.dtype == dt and out.shape == q.shape
    assert pooled.shape == (B, HQ, _nb(T), _nb(T))
    ref_out, ref_pooled = attn_with_pooling_ref(*_up(q, k, v), causal=causal, pool_op=pool_op)
    lp_out, _ = attn_with_pooling_ref(q, k, v, causal=causal, upcast=False, pool_op=pool_op)
    error_budget(out, ref_out, lp_out, **OUT_BUDGET[dt])
    _check_pooled(pooled, ref_pooled, causal)


@pytest.mark.parametrize("T, gqa, dtype, causal", [
    pytest.param(*c, id=f"T{c[0]}-gqa{c[1]}-{c[2]}-{'causal' if c[3] else 'full'}")
    for c in [(1, 1, "fp32", True), (63, 3, "fp32", True), (65, 3, "fp32", False), (65, 1, "fp32", True),
              (200, 3, "fp32", True), (200, 1, "fp32", False), (200, 3, "fp16", True)]])
def test_gradients_match_reference(T, gqa, dtype, causal, gen, device, error_budget):
    """The output of attn_with_pooling is differentiable (the pooled map is not)."""
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, 64, dt, device)
    do = _randn(gen, (B, HQ, T, 64), dt, device)

    def kernel(q, k, v):
        out, pooled = attn_with_pooling(q, k, v, causal=causal, backend="triton")
        assert not pooled.requires_grad, "the kernel's pooled map must be non-differentiable"
        return out

    got = grads(kernel, q, k, v, do)
    ref = grads(lambda q, k, v: attn_with_pooling_ref(q, k, v, causal=causal), *_up(q, k, v, do))
    ref_lp = grads(lambda q, k, v: attn_with_pooling_ref(q, k, v, causal=causal, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])


@pytest.mark.parametrize("pool_op", ["max", "sum"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [65, 200], ids=lambda T: f"T{T}")
def test_padded_batch(T, causal, dtype, pool_op, gen, device, error_budget):
    """seq_bounds: padded query rows output 0, block rows without real queries pool to all-zero
    rows, key blocks of padding only pool to 0, and padded values change nothing (bit for bit)."""
    dt = DTYPES[dtype]
    B, HQ, H, D = 3, 3, 1, 64
    NB = _nb(T)
    # left-padded, right-padded (both unaligned to 64), all padding
    bounds = torch.tensor([[T - (T * 2) // 3, T], [0, T // 2 + 3], [T // 3, T // 3]])
    pos = torch.arange(T)
    real = (pos[None, :] >= bounds[:, :1]) & (pos[None, :] < bounds[:, 1:])  # [B, T]
    live = torch.nn.functional.pad(real, (0, NB * 64 - T)).view(B, NB, 64).any(-1)  # [B, NB]
    real, live, bounds = real.to(device), live.to(device), bounds.to(device)
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)

    out, pooled = attn_with_pooling(q, k, v, causal=causal, seq_bounds=bounds, backend="triton", pool_op=pool_op)
    ref_out, ref_pooled = attn_with_pooling_ref(*_up(q, k, v), causal=causal, seq_bounds=bounds, pool_op=pool_op)
    lp_out, _ = attn_with_pooling_ref(q, k, v, causal=causal, seq_bounds=bounds, upcast=False, pool_op=pool_op)
    error_budget(out, ref_out, lp_out, **OUT_BUDGET[dt])
    _check_pooled(pooled, ref_pooled, causal, live_rows=live)
    pad = ~real[:, None, :, None]
    assert torch.equal(out.masked_fill(~pad, 0), torch.zeros_like(out)), "padded query rows must output 0"
    dead_cols = ~live[:, None, None, :].expand_as(pooled)
    assert torch.equal(pooled[dead_cols], torch.zeros_like(pooled[dead_cols])), "padding-only key blocks must be 0"

    def garbage(t):
        return torch.where(pad, _randn(gen, t.shape, dt, device, scale=10.0, shift=5.0), t)

    with warnings.catch_warnings():  # large garbage may overflow in discarded lanes (interpreter warns)
        warnings.filterwarnings("ignore", r"(overflow|invalid value) encountered", RuntimeWarning)
        out2, pooled2 = attn_with_pooling(garbage(q), garbage(k), garbage(v), causal=causal, seq_bounds=bounds,
                                          backend="triton", pool_op=pool_op)
    assert torch.equal(out2.masked_fill(pad, 0), out.masked_fill(pad, 0)), "padded values leaked into real rows"
    assert torch.equal(out2.masked_fill(~pad, 0), torch.zeros_like(out2))
    assert torch.equal(pooled2, pooled), "padded values leaked into the pooled map"


@pytest.mark.parametrize("pool_op", ["max", "sum"])
def test_scratch_in_head_chunks_gives_the_same_result(pool_op, gen, device, monkeypatch):
    """Above POOL_SCRATCH_BYTES the (batch, head) pairs launch a few at a time (here one per
    launch, seven launches, padded rows and a window in play): bit-identical output and map."""
    import importlib
    attn_mod = importlib.import_module("seer_attn.kernels.block_sparse_attn")
    B, HQ, H, T, D = 1, 6, 2, 200, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, device)
    bounds = torch.tensor([[7, T]], device=device)
    whole = attn_with_pooling(q, k, v, seq_bounds=bounds, window=90, backend="triton", pool_op=pool_op)
    q2 = torch.cat([q, q[:, :1]], 1)  # seven query heads over one KV head
    k2, v2 = k[:, :1], v[:, :1]
    whole7 = attn_with_pooling(q2, k2, v2, seq_bounds=bounds, window=90, backend="triton", pool_op=pool_op)
    monkeypatch.setattr(attn_mod, "POOL_SCRATCH_BYTES", 1)
    for (o, p), args in ((whole, (q, k, v)), (whole7, (q2, k2, v2))):
        o1, p1 = attn_with_pooling(*args, seq_bounds=bounds, window=90, backend="triton", pool_op=pool_op)
        assert torch.equal(o1, o) and torch.equal(p1, p)
    _, ref = attn_with_pooling_ref(q2, k2, v2, seq_bounds=bounds, window=90, pool_op=pool_op)
    torch.testing.assert_close(whole7[1], ref, atol=POOL_ATOL, rtol=POOL_RTOL)


@pytest.mark.parametrize("sm_scale", [0.05, 0.5], ids=lambda s: f"scale{s}")
def test_custom_sm_scale(sm_scale, gen, device, error_budget):
    B, HQ, H, T, D = 1, 3, 1, 130, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, device)
    out, pooled = attn_with_pooling(q, k, v, sm_scale=sm_scale, backend="triton")
    ref_out, ref_pooled = attn_with_pooling_ref(q, k, v, sm_scale=sm_scale)
    _, default_pooled = attn_with_pooling_ref(q, k, v)
    assert (ref_pooled - default_pooled).abs().max() > 1e-2  # the scale matters for these inputs
    error_budget(out, ref_out, ref_out, **OUT_BUDGET[torch.float32])
    _check_pooled(pooled, ref_pooled, True)


@pytest.mark.parametrize("pool_op", ["max", "sum"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_reference_pooling_matches_definition(causal, pool_op, gen):
    """The reference itself against docs/design.md §2, on a materialised attention matrix:
    softmax probabilities, max (or sum) over each 64x64 tile, each block row normalised to sum 1."""
    B, HQ, H, T, D = 1, 4, 2, 150, 16
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float64, "cpu")
    NB = _nb(T)
    out, pooled = attn_with_pooling_ref(q.float(), k.float(), v.float(), causal=causal, pool_op=pool_op)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = q @ kk.transpose(-1, -2) / D ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    expected = torch.zeros(B, HQ, NB, NB, dtype=torch.float64)
    for i in range(NB):
        for j in range(NB):
            tile = p[:, :, 64 * i:64 * (i + 1), 64 * j:64 * (j + 1)]
            expected[:, :, i, j] = tile.amax(dim=(-1, -2)) if pool_op == "max" else tile.sum(dim=(-1, -2))
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(out, (p @ vv).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, expected.float(), atol=1e-6, rtol=1e-5)
