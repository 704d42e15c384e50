"""Sliding-window attention (``window=``) in block_sparse_attn, dense_attn and attn_with_pooling
with backend="triton" (the interpreter on CPU, compiled on CUDA), against the torch references;
the references themselves against transformers' own sliding-window mask.

Semantics (transformers' ``sliding_window_causal_mask_function``): key j is visible to query i
iff j <= i and i - j < window. Lengths 1, 63, 65, 200 and windows 1, 64, 100, 128 cover windows
shorter than a block, equal to one, cutting blocks in the middle, and longer than the sequence.
Tolerances follow the style guide's rule (see test_block_sparse_attn.py).
"""
import importlib

import pytest
import torch
from kernel_inputs import grads as _grads, nb as _nb, qkv as _qkv, randn as _randn, up as _up

from seer_attn.kernels import (attn_with_pooling, attn_with_pooling_ref, block_sparse_attn, block_sparse_attn_ref,
                               dense_attn, random_block_mask)

bsa_module = importlib.import_module("seer_attn.kernels.block_sparse_attn")

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SHAPES = {1: (2, 2, 2), 3: (1, 6, 2)}  # (B, HQ, H) per GQA ratio
OUT_BUDGET = {torch.float16: dict(slack=1e-3, cap=2e-2), torch.float32: dict(slack=1e-5, cap=1e-4)}
GRAD_BUDGET = OUT_BUDGET
POOL_ATOL, POOL_RTOL = 1e-5, 1e-4
LENGTHS, WINDOWS = (1, 63, 65, 200), (1, 64, 100, 128)


def _visible(T, window):
    """Bool [T, T] from transformers' own mask function: query i (rows) sees key j (columns)."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    fn = sliding_window_causal_mask_function(window)
    i = torch.arange(T)[:, None].expand(T, T)
    j = torch.arange(T)[None, :].expand(T, T)
    return fn(0, 0, i, j)


def _mask(gen, B, HQ, T, device):
    """Half the causal blocks plus the diagonal: at T=200 some kept blocks lie wholly outside a
    64-token window, some are cut by it, some are inside."""
    return random_block_mask(B, HQ, _nb(T), 0.5, generator=gen).to(device)


def _check_grads(got, ref, ref_lp, dt, error_budget):
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])


def _cases(dtype, lengths=LENGTHS, windows=WINDOWS):
    cases = [(T, w, 3 if n % 2 else 1, dtype) for n, (T, w) in enumerate((T, w) for T in lengths for w in windows)]
    return [pytest.param(*c, id=f"T{c[0]}-w{c[1]}-gqa{c[2]}-{c[3]}") for c in cases]


# ----------------------------------------------------------------------------- the references

@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w}")
def test_references_match_transformers_mask(window, gen):
    """Outputs and pooled map of the references equal a materialised softmax under the mask
    transformers builds for a sliding window (float64, odd length, GQA, a sparse block mask)."""
    B, HQ, H, T, D = 1, 4, 2, 150, 16
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float64, "cpu")
    mask = _mask(gen, B, HQ, T, "cpu")
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = q @ kk.transpose(-1, -2) / D ** 0.5
    vis = _visible(T, window)
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
    out, pooled = attn_with_pooling_ref(q.float(), k.float(), v.float(), window=window)
    torch.testing.assert_close(out, (p @ vv).float(), atol=1e-5, rtol=1e-5)
    NB = _nb(T)
    expected = torch.zeros(B, HQ, NB, NB, dtype=torch.float64)
    for i in range(NB):
        for j in range(NB):
            expected[:, :, i, j] = p[:, :, 64 * i:64 * (i + 1), 64 * j:64 * (j + 1)].amax(dim=(-1, -2))
    torch.testing.assert_close(pooled, (expected / expected.sum(-1, keepdim=True)).float(), atol=1e-6, rtol=1e-5)
    # block-sparse: the window and the block mask together
    allowed = vis & mask.repeat_interleave(64, 2).repeat_interleave(64, 3)[..., :T, :T]
    ps = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    got = block_sparse_attn_ref(q.float(), k.float(), v.float(), mask, window=window)
    torch.testing.assert_close(got, (ps @ vv).float(), atol=1e-5, rtol=1e-5)


def test_window_longer_than_sequence_is_full_causal(gen):
    B, HQ, H, T, D = 1, 2, 1, 130, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, "cpu")
    mask = _mask(gen, B, HQ, T, "cpu")
    assert torch.equal(block_sparse_attn_ref(q, k, v, mask, window=T), block_sparse_attn_ref(q, k, v, mask))
    a, b = attn_with_pooling_ref(q, k, v, window=10 * T), attn_with_pooling_ref(q, k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- kernels vs references

@pytest.mark.parametrize("T, window, gqa, dtype", _cases("fp32") + _cases("fp16", lengths=(65, 200)))
def test_sparse_forward_backward(T, window, gqa, dtype, gen, device, error_budget):
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, 64, dt, device)
    do = _randn(gen, (B, HQ, T, 64), dt, device)
    mask = _mask(gen, B, HQ, T, device)
    got = _grads(lambda q, k, v: block_sparse_attn(q, k, v, mask, window=window, backend="triton"), q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, window=window), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, window=window, upcast=False), q, k, v, do)
    _check_grads(got, ref, ref_lp, dt, error_budget)


@pytest.mark.parametrize("T, window, gqa, dtype", _cases("fp32") + _cases("fp16", lengths=(200,)))
def test_pooling_forward_backward(T, window, gqa, dtype, gen, device, error_budget):
    """attn_with_pooling (the dense kernel variant plus the pooling pass): output, gradients,
    and a pooled map that covers only visible keys (blocks wholly outside the window are 0)."""
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, 64, dt, device)
    do = _randn(gen, (B, HQ, T, 64), dt, device)
    got = _grads(lambda q, k, v: attn_with_pooling(q, k, v, window=window, backend="triton"), q, k, v, do)
    ref = _grads(lambda q, k, v: attn_with_pooling_ref(q, k, v, window=window), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: attn_with_pooling_ref(q, k, v, window=window, upcast=False), q, k, v, do)
    _check_grads(got, ref, ref_lp, dt, error_budget)
    _, pooled = attn_with_pooling(q, k, v, window=window, backend="triton")
    _, ref_pooled = attn_with_pooling_ref(*_up(q, k, v), window=window)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, ref_pooled, atol=POOL_ATOL, rtol=POOL_RTOL)
    NB = _nb(T)
    i = torch.arange(NB, device=pooled.device)
    outside = (i[:, None] - i[None, :] - 1) * 64 + 1 >= window  # nearest pair of the block already too far
    assert torch.equal(pooled[..., outside], torch.zeros_like(pooled[..., outside]))
    torch.testing.assert_close(pooled.sum(-1), torch.ones_like(pooled.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("T, window, gqa, dtype", _cases("fp32", lengths=(63, 200), windows=(1, 100)) +
                         _cases("fp16", lengths=(200,), windows=(64,)))
def test_dense_forward_backward(T, window, gqa, dtype, gen, device, error_budget):
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, 64, dt, device)
    do = _randn(gen, (B, HQ, T, 64), dt, device)
    full = torch.ones(B, HQ, _nb(T), _nb(T), dtype=torch.bool, device=device)
    got = _grads(lambda q, k, v: dense_attn(q, k, v, window=window, backend="triton"), q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, full, window=window), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, full, window=window, upcast=False), q, k, v, do)
    _check_grads(got, ref, ref_lp, dt, error_budget)


@pytest.mark.parametrize("window", [1, 64, 100], ids=lambda w: f"w{w}")
def test_blocks_outside_the_window_change_nothing(window, gen, device):
    """Keeping blocks wholly outside the window (here: every causal block) gives bit for bit the
    output and gradients of the mask restricted to blocks the window reaches."""
    B, HQ, H, T, D = 1, 3, 1, 330, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, device)
    do = _randn(gen, (B, HQ, T, D), torch.float32, device)
    NB = _nb(T)
    i = torch.arange(NB, device=device)
    inside = ((i[:, None] - i[None, :] - 1) * 64 + 1 < window) & (i[None, :] <= i[:, None])
    full = torch.ones(B, HQ, NB, NB, dtype=torch.bool, device=device)
    a = _grads(lambda q, k, v: block_sparse_attn(q, k, v, full, window=window, backend="triton"), q, k, v, do)
    b = _grads(lambda q, k, v: block_sparse_attn(q, k, v, full & inside, window=window, backend="triton"),
               q, k, v, do)
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("op", ["sparse", "dense", "pooling"])
@pytest.mark.parametrize("tiles", ["gpu", "wide"], ids=lambda t: f"{t}-tiles")
def test_other_tile_configs_with_padding(op, tiles, gen, device, error_budget, monkeypatch):
    """Any BLOCK_M/BLOCK_N the launch table may pick (the GPU's, and 256-wide gathers), with a
    window cutting blocks mid-way and a left-/right-padded batch."""
    if tiles == "wide" and device == "cuda":
        pytest.skip("256-wide fp32 tiles exceed GPU shared memory; they exercise the 4-block gather in the interpreter")
    B, HQ, H, T, D, window = 2, 4, 2, 300, 64, 100
    keys = [(kern, sparse) for kern in ("fwd", "dq", "dkdv") for sparse in (True, False)]
    if tiles == "gpu":
        cfgs = {(kern, sparse, D): bsa_module._config(kern, sparse, D, True) for kern, sparse in keys}
    else:
        wide = {("fwd", True): (64, 256), ("fwd", False): (256, 256), ("dq", True): (64, 256),
                ("dq", False): (256, 256), ("dkdv", True): (256, 64), ("dkdv", False): (256, 256)}
        cfgs = {(kern, sparse, D): (*wide[kern, sparse], 4, 1) for kern, sparse in keys}
    for key, cfg in cfgs.items():
        monkeypatch.setitem(bsa_module.CONFIG_OVERRIDES, key, cfg)
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, device)
    do = _randn(gen, (B, HQ, T, D), torch.float32, device)
    mask = _mask(gen, B, HQ, T, device) if op == "sparse" else torch.ones(
        B, HQ, _nb(T), _nb(T), dtype=torch.bool, device=device)
    bounds = torch.tensor([[7, 300], [0, 222]], device=device)
    kw = dict(seq_bounds=bounds, window=window, backend="triton")
    fn = {"sparse": lambda q, k, v: block_sparse_attn(q, k, v, mask, **kw),
          "dense": lambda q, k, v: dense_attn(q, k, v, **kw),
          "pooling": lambda q, k, v: attn_with_pooling(q, k, v, **kw)[0]}[op]
    got = _grads(fn, q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, seq_bounds=bounds, window=window), q, k, v, do)
    _check_grads(got, ref, ref, torch.float32, error_budget)
    if op == "pooling":
        _, pooled = attn_with_pooling(q, k, v, **kw)
        _, ref_pooled = attn_with_pooling_ref(q, k, v, seq_bounds=bounds, window=window)
        assert torch.isfinite(pooled).all()
        torch.testing.assert_close(pooled, ref_pooled, atol=POOL_ATOL, rtol=POOL_RTOL)
