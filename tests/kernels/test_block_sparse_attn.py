"""block_sparse_attn / dense_attn with backend="triton" (the Triton interpreter on CPU, compiled
kernels on CUDA) against the torch reference ``block_sparse_attn_ref``.

Tolerance (style guide): the kernel's error against the fp32 reference (computed on the same,
upcast inputs) must be <= 2x the error of the reference run in the inputs' own precision
(``upcast=False``) plus a small slack, and <= a hard cap. bf16 is left to
test_gpu_kernels.py: the interpreter's bf16 ``tl.dot`` is broken.
"""
import importlib
import warnings

import pytest
import torch
from kernel_inputs import dense_cases, grads as _grads, nb as _nb, qkv as _qkv, randn as _randn, up as _up

from seer_attn.kernels import (attn_with_pooling, attn_with_pooling_ref, block_sparse_attn, block_sparse_attn_ref,
                               dense_attn, random_block_mask)

# the module (the package attribute of the same name is the function)
bsa_module = importlib.import_module("seer_attn.kernels.block_sparse_attn")

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
#: (B, HQ, H) per GQA ratio: small batch/head counts keep the interpreter fast.
SHAPES = {1: (2, 2, 2), 3: (1, 6, 2)}
#: Error budgets: outputs in absolute error, gradients relative to max(1, max|ref|).
OUT_BUDGET = {torch.float16: dict(slack=1e-3, cap=2e-2), torch.float32: dict(slack=1e-5, cap=1e-4)}
GRAD_BUDGET = {torch.float16: dict(slack=1e-3, cap=2e-2), torch.float32: dict(slack=1e-5, cap=1e-4)}


def _mask(gen, B, HQ, T, density, causal, device):
    """A random mask keeping ``density`` of the blocks and always the diagonal.

    random_block_mask draws only the causal triangle; without causal the upper triangle
    gets random blocks of the same density too.
    """
    NB = _nb(T)
    m = random_block_mask(B, HQ, NB, density, generator=gen)
    if not causal:
        upper = torch.ones(NB, NB, dtype=torch.bool).triu(1)
        m = m | ((torch.rand(B, HQ, NB, NB, generator=gen) < density) & upper)
    return m.to(device)


def _case_id(T, gqa, D, density, dtype, causal):
    return f"T{T}-gqa{gqa}-d{D}-dens{density}-{dtype}-{'causal' if causal else 'full'}"


# ----------------------------------------------------------------------------- forward

def _fwd_cases():
    cases = []
    # full grid over the cheap axes in fp16 ...
    for T in (1, 63, 64, 65, 200):
        for gqa in (1, 3):
            for D in (64, 128):
                for density in (0.0, 0.5, 1.0):
                    for causal in (True, False):
                        cases.append((T, gqa, D, density, "fp16", causal))
    # ... and fp32 (tight cap) on head_dim 64 and GQA 3
    for T in (1, 63, 64, 65, 200):
        for density in (0.0, 0.5, 1.0):
            for causal in (True, False):
                cases.append((T, 3, 64, density, "fp32", causal))
    return [pytest.param(*c, id=_case_id(*c)) for c in cases]


@pytest.mark.parametrize("T, gqa, D, density, dtype, causal", _fwd_cases())
def test_forward_matches_reference(T, gqa, D, density, dtype, causal, gen, device, error_budget):
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    mask = _mask(gen, B, HQ, T, density, causal, device)
    out = block_sparse_attn(q, k, v, mask, causal=causal, backend="triton")
    assert out.dtype == dt and out.shape == q.shape
    ref32 = block_sparse_attn_ref(*_up(q, k, v), mask, causal=causal)
    ref_lp = block_sparse_attn_ref(q, k, v, mask, causal=causal, upcast=False)
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[dt])


@pytest.mark.parametrize("T, gqa, D, dtype, causal", dense_cases(d128_gqas=(3,)))
def test_dense_forward_matches_reference(T, gqa, D, dtype, causal, gen, device, error_budget):
    """dense_attn runs the non-sparse kernel variant (128-row programs, no index lists)."""
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    full = torch.ones(B, HQ, _nb(T), _nb(T), dtype=torch.bool, device=device)
    out = dense_attn(q, k, v, causal=causal, backend="triton")
    assert out.dtype == dt and out.shape == q.shape
    ref32 = block_sparse_attn_ref(*_up(q, k, v), full, causal=causal)
    ref_lp = block_sparse_attn_ref(q, k, v, full, causal=causal, upcast=False)
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[dt])


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [65, 200], ids=lambda T: f"T{T}")
def test_rows_without_blocks_output_exact_zeros(T, causal, dtype, gen, device, error_budget):
    """A query block whose mask row is all False attends nothing: its rows are exactly 0 and
    get dq = 0; a KV head none of whose query heads selects a key block gets dk = dv = 0 there."""
    dt = DTYPES[dtype]
    B, HQ, H, D = 2, 6, 2, 64
    NB = _nb(T)
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    do = _randn(gen, (B, HQ, T, D), dt, device)
    mask = _mask(gen, B, HQ, T, 0.5, causal, device)
    mask[0, 0, 0] = False  # first block row (the diagonal too)
    mask[0, 1, NB - 1] = False  # last, partial block row
    mask[1, 2, :] = False  # a whole head
    mask[1, 3:6, :, 0] = False  # KV head 1 of batch 1: key block 0 selected by nobody ...
    mask[1, 3:6, 0] = False  # ... (row 0 is then empty as well)
    empty = [(0, 0, 0), (0, 1, NB - 1)] + [(1, 2, i) for i in range(NB)] + [(1, h, 0) for h in (3, 4, 5)]

    fn = lambda q, k, v: block_sparse_attn(q, k, v, mask, causal=causal, backend="triton")  # noqa: E731
    out, dq, dk, dv = _grads(fn, q, k, v, do)
    for b, h, i in empty:
        rows = slice(64 * i, min(T, 64 * (i + 1)))
        assert torch.equal(out[b, h, rows], torch.zeros_like(out[b, h, rows])), f"out b{b} h{h} block row {i}"
        assert torch.equal(dq[b, h, rows], torch.zeros_like(dq[b, h, rows])), f"dq b{b} h{h} block row {i}"
    cols = slice(0, 64)
    assert torch.equal(dk[1, 1, cols], torch.zeros_like(dk[1, 1, cols]))
    assert torch.equal(dv[1, 1, cols], torch.zeros_like(dv[1, 1, cols]))

    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal, upcast=False), q, k, v, do)
    error_budget(out, ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])


@pytest.mark.parametrize("T", [65, 200], ids=lambda T: f"T{T}")
def test_causal_ignores_blocks_above_diagonal(T, gen, device):
    """With causal=True, True entries above the diagonal change nothing, bit for bit."""
    B, HQ, H, D = 1, 3, 1, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float16, device)
    do = _randn(gen, (B, HQ, T, D), torch.float16, device)
    mask = _mask(gen, B, HQ, T, 0.5, True, device)
    junk = mask | torch.ones_like(mask).triu(1)
    a = _grads(lambda q, k, v: block_sparse_attn(q, k, v, mask, backend="triton"), q, k, v, do)
    b = _grads(lambda q, k, v: block_sparse_attn(q, k, v, junk, backend="triton"), q, k, v, do)
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------- backward

def _grad_cases():
    cases = []
    # fp32 grid over lengths, GQA, densities and causality on head_dim 64 ...
    for T in (1, 63, 64, 65, 200):
        for gqa in (1, 3):
            for density in (0.0, 0.5, 1.0):
                for causal in (True, False):
                    cases.append((T, gqa, 64, density, "fp32", causal))
    # ... head_dim 128 ...
    for T in (65, 200):
        for causal in (True, False):
            cases.append((T, 3, 128, 0.5, "fp32", causal))
    # ... and fp16 against the 2x rule
    cases += [(200, 3, 64, 0.5, "fp16", True), (200, 3, 128, 0.5, "fp16", False), (65, 1, 64, 1.0, "fp16", True),
              (63, 1, 128, 0.0, "fp16", True), (200, 1, 64, 1.0, "fp16", False)]
    return [pytest.param(*c, id=_case_id(*c)) for c in cases]


@pytest.mark.parametrize("T, gqa, D, density, dtype, causal", _grad_cases())
def test_gradients_match_reference(T, gqa, D, density, dtype, causal, gen, device, error_budget):
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    do = _randn(gen, (B, HQ, T, D), dt, device)
    mask = _mask(gen, B, HQ, T, density, causal, device)
    got = _grads(lambda q, k, v: block_sparse_attn(q, k, v, mask, causal=causal, backend="triton"), q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp, t in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:], (q, k, v)):
        assert a.dtype == dt and a.shape == t.shape, name
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])


@pytest.mark.parametrize("T, gqa, dtype, causal", [
    pytest.param(T, gqa, dtype, causal, id=f"T{T}-gqa{gqa}-{dtype}-{'causal' if causal else 'full'}")
    for (T, gqa, dtype, causal) in [(1, 3, "fp32", True), (65, 1, "fp32", True), (65, 3, "fp32", False),
                                    (192, 3, "fp32", True), (200, 1, "fp32", False), (200, 3, "fp16", True)]])
def test_dense_gradients_match_reference(T, gqa, dtype, causal, gen, device, error_budget):
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, 64, dt, device)
    do = _randn(gen, (B, HQ, T, 64), dt, device)
    full = torch.ones(B, HQ, _nb(T), _nb(T), dtype=torch.bool, device=device)
    got = _grads(lambda q, k, v: dense_attn(q, k, v, causal=causal, backend="triton"), q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, full, causal=causal), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, full, causal=causal, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])


# ----------------------------------------------------------------------------- long key-block lists

@pytest.mark.parametrize("window", [None, 150], ids=["full-causal", "window150"])
@pytest.mark.parametrize("bounded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_dkdv_split_lists_match_reference(dtype, bounded, window, gen, device, error_budget, monkeypatch):
    """dK/dV of key blocks whose lists are cut into pieces (here at 2 entries each: a sink
    block every query block keeps, the diagonal and random blocks) equal the reference, and
    a second backward pass gives the same bits (the pieces add in a fixed order)."""
    monkeypatch.setattr(bsa_module, "DKDV_SPLIT_BLOCKS", 2)
    dt = DTYPES[dtype]
    B, HQ, H, T, D = 2, 6, 2, 500, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    do = _randn(gen, (B, HQ, T, D), dt, device)
    mask = _mask(gen, B, HQ, T, 0.4, True, "cpu")
    mask[..., 0] = True  # the sink: every query block keeps key block 0 (3 heads x 8 rows: 12 pieces)
    mask[:, 1, :, 2] = False  # and a key block that one head never keeps
    mask = mask.to(device)
    bounds = torch.tensor([[0, T], [37, 470]], device=device) if bounded else None
    kw = dict(causal=True, seq_bounds=bounds, window=window)
    fn = lambda q, k, v: block_sparse_attn(q, k, v, mask, backend="triton", **kw)  # noqa: E731
    got = _grads(fn, q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, **kw), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, upcast=False, **kw), q, k, v, do)
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])
    again = _grads(fn, q, k, v, do)
    for name, a, b in zip(("dk", "dv"), got[2:], again[2:]):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


# ----------------------------------------------------------------------------- padded batches

def _bounds(T):
    """Batch 0 left-padded, batch 1 right-padded (both unaligned to 64), batch 2 all padding."""
    return torch.tensor([[T - (T * 2) // 3, T], [0, T // 2 + 3], [T // 3, T // 3]], dtype=torch.int64)


def _padding_masks(bounds, T):
    pos = torch.arange(T)
    real = (pos[None, :] >= bounds[:, :1]) & (pos[None, :] < bounds[:, 1:])  # [B, T]
    return real


@pytest.mark.parametrize("op", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [65, 200], ids=lambda T: f"T{T}")
def test_padded_batch(T, causal, dtype, op, gen, device, error_budget):
    """seq_bounds: padded query rows output 0 and get dq = 0, padded keys get dk = dv = 0, and
    the values at padded positions change nothing at real positions (bit for bit)."""
    dt = DTYPES[dtype]
    B, HQ, H, D = 3, 3, 1, 64
    bounds = _bounds(T)
    real = _padding_masks(bounds, T).to(device)
    bounds = bounds.to(device)
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    do = _randn(gen, (B, HQ, T, D), dt, device)
    mask = (_mask(gen, B, HQ, T, 0.5, causal, device) if op == "sparse"
            else torch.ones(B, HQ, _nb(T), _nb(T), dtype=torch.bool, device=device))

    def fn(q, k, v):
        if op == "sparse":
            return block_sparse_attn(q, k, v, mask, causal=causal, seq_bounds=bounds, backend="triton")
        return dense_attn(q, k, v, causal=causal, seq_bounds=bounds, backend="triton")

    got = _grads(fn, q, k, v, do)
    out, dq, dk, dv = got
    pad = ~real[:, None, :, None]  # [B, 1, T, 1]
    assert torch.equal(out.masked_fill(~pad, 0), torch.zeros_like(out)), "padded query rows must output 0"
    assert torch.equal(dq.masked_fill(~pad, 0), torch.zeros_like(dq)), "padded query rows must get dq = 0"
    assert torch.equal(dk.masked_fill(~pad, 0), torch.zeros_like(dk)), "padded keys must get dk = 0"
    assert torch.equal(dv.masked_fill(~pad, 0), torch.zeros_like(dv)), "padded keys must get dv = 0"

    ref_fn = lambda up: lambda q, k, v: block_sparse_attn_ref(  # noqa: E731
        q, k, v, mask, causal=causal, seq_bounds=bounds, upcast=up)
    ref = _grads(ref_fn(True), *_up(q, k, v, do))
    ref_lp = _grads(ref_fn(False), q, k, v, do)
    error_budget(out, ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])

    # garbage at padded positions (q, k and v, and the incoming gradient) must not leak
    def garbage(t):
        return torch.where(pad, _randn(gen, t.shape, dt, device, scale=10.0, shift=5.0), t)

    with warnings.catch_warnings():
        # The dK/dV kernel computes exp2(q.k - lse) for padded keys too and discards the rows
        # at the end, so large garbage keys overflow there; the interpreter (numpy) warns.
        warnings.filterwarnings("ignore", r"(overflow|invalid value) encountered", RuntimeWarning)
        got2 = _grads(fn, garbage(q), garbage(k), garbage(v), garbage(do))
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, got2):
        assert torch.equal(x.masked_fill(pad, 0), y.masked_fill(pad, 0)), f"{name} at real positions changed"
        assert torch.equal(y.masked_fill(~pad, 0), torch.zeros_like(y)), f"{name} at padded positions not 0"


# ----------------------------------------------------------------------------- misc

def test_strided_inputs_match_contiguous(gen, device):
    """q/k/v as [B, T, H, D] -> [B, H, T, D] transposed views (what attention layers pass) and a
    non-contiguous incoming gradient give exactly the results of contiguous copies."""
    B, HQ, H, T, D = 2, 6, 2, 130, 64
    q = _randn(gen, (B, T, HQ, D), torch.float16, device).transpose(1, 2)
    k = _randn(gen, (B, T, H, D), torch.float16, device).transpose(1, 2)
    v = _randn(gen, (B, T, H, D), torch.float16, device).transpose(1, 2)
    do = _randn(gen, (B, T, HQ, D), torch.float16, device).transpose(1, 2)
    assert not q.is_contiguous()
    mask = _mask(gen, B, HQ, T, 0.5, True, device)
    fn = lambda q, k, v: block_sparse_attn(q, k, v, mask, backend="triton")  # noqa: E731
    a = _grads(fn, q, k, v, do)
    b = _grads(fn, q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous())
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("sm_scale", [0.05, 0.5], ids=lambda s: f"scale{s}")
def test_custom_sm_scale(sm_scale, gen, device, error_budget):
    B, HQ, H, T, D = 1, 3, 1, 130, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, device)
    do = _randn(gen, (B, HQ, T, D), torch.float32, device)
    mask = _mask(gen, B, HQ, T, 0.5, True, device)
    got = _grads(lambda q, k, v: block_sparse_attn(q, k, v, mask, sm_scale=sm_scale, backend="triton"), q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, sm_scale=sm_scale), q, k, v, do)
    default = block_sparse_attn_ref(q, k, v, mask)
    assert (ref[0] - default).abs().max() > 1e-2  # the scale matters for these inputs
    error_budget(got[0], ref[0], ref[0], **OUT_BUDGET[torch.float32])
    for name, a, r in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        error_budget(a, r, r, rel=True, what=name, **GRAD_BUDGET[torch.float32])


def test_backend_dispatch(gen, device):
    """backend="torch" is the reference; "auto" is Triton on CUDA and the reference elsewhere."""
    B, HQ, H, T, D = 1, 2, 1, 65, 64
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, device)
    mask = _mask(gen, B, HQ, T, 0.5, True, device)
    ref = block_sparse_attn_ref(q, k, v, mask)
    assert torch.equal(block_sparse_attn(q, k, v, mask, backend="torch"), ref)
    auto = block_sparse_attn(q, k, v, mask, backend="auto")
    expected = block_sparse_attn(q, k, v, mask, backend="triton") if q.is_cuda else ref
    assert torch.equal(auto, expected)


def test_reference_matches_explicit_definition(gen):
    """The reference itself, against a materialised masked softmax (odd length, GQA, padding)."""
    B, HQ, H, T, D = 2, 4, 2, 130, 16
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float64, "cpu")
    mask = _mask(gen, B, HQ, T, 0.5, True, "cpu")
    mask[1, 3, 1] = False
    bounds = torch.tensor([[5, T], [0, 100]])
    got = block_sparse_attn_ref(q.float(), k.float(), v.float(), mask, seq_bounds=bounds)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = q @ kk.transpose(-1, -2) / D ** 0.5
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) & mask.repeat_interleave(64, 2).repeat_interleave(64, 3)[..., :T, :T]
    real = (pos[None, :] >= bounds[:, :1]) & (pos[None, :] < bounds[:, 1:])
    allowed = allowed & real[:, None, None, :] & real[:, None, :, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(got, (p @ vv).float(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- other tile shapes

def _tile_configs(name, D):
    """Launch configurations to run through CONFIG_OVERRIDES: the GPU's own table (so the CPU
    interpreter checks the tiles CUDA runs) and wide 256-row/col tiles (4-block gathers)."""
    keys = [(kern, sparse) for kern in ("fwd", "dq", "dkdv") for sparse in (True, False)]
    if name == "gpu":
        return {(kern, sparse, D): bsa_module._config(kern, sparse, D, True) for kern, sparse in keys}
    wide = {("fwd", True): (64, 256), ("fwd", False): (256, 256), ("dq", True): (64, 256), ("dq", False): (256, 256),
            ("dkdv", True): (256, 64), ("dkdv", False): (256, 256)}
    return {(kern, sparse, D): (*wide[kern, sparse], 4, 1) for kern, sparse in keys}


@pytest.mark.parametrize("tiles", ["gpu", "wide"], ids=lambda t: f"{t}-tiles")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("op", ["sparse", "dense", "pooling"])
def test_other_tile_configs(op, causal, tiles, gen, device, error_budget, monkeypatch):
    """The kernels are correct for any BLOCK_M/BLOCK_N multiple of 64 the launch table may pick."""
    if tiles == "wide" and device == "cuda":
        pytest.skip("256-wide fp32 tiles exceed GPU shared memory; they exercise the 4-block gather in the interpreter")
    B, HQ, H, T, D = 1, 4, 2, 300, 64
    for key, cfg in _tile_configs(tiles, D).items():
        monkeypatch.setitem(bsa_module.CONFIG_OVERRIDES, key, cfg)
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.float32, device)
    do = _randn(gen, (B, HQ, T, D), torch.float32, device)
    mask = _mask(gen, B, HQ, T, 0.5, causal, device) if op == "sparse" else torch.ones(
        B, HQ, _nb(T), _nb(T), dtype=torch.bool, device=device)
    bounds = torch.tensor([[7, 290]], device=device)
    kw = dict(causal=causal, seq_bounds=bounds, backend="triton")
    if op == "sparse":
        fn = lambda q, k, v: block_sparse_attn(q, k, v, mask, **kw)  # noqa: E731
    elif op == "dense":
        fn = lambda q, k, v: dense_attn(q, k, v, **kw)  # noqa: E731
    else:
        fn = lambda q, k, v: attn_with_pooling(q, k, v, **kw)[0]  # noqa: E731
    got = _grads(fn, q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal, seq_bounds=bounds), q, k, v, do)
    error_budget(got[0], ref[0], ref[0], **OUT_BUDGET[torch.float32])
    for name, a, r in zip(("dq", "dk", "dv"), got[1:], ref[1:]):
        error_budget(a, r, r, rel=True, what=name, **GRAD_BUDGET[torch.float32])
    if op == "pooling":
        _, pooled = attn_with_pooling(q, k, v, causal=causal, seq_bounds=bounds, backend="triton")
        _, ref_pooled = attn_with_pooling_ref(q, k, v, causal=causal, seq_bounds=bounds)
        assert torch.isfinite(pooled).all()
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- TMA loads

@pytest.mark.parametrize("case", ["causal", "window-padded", "full"])
@pytest.mark.parametrize("op", ["sparse", "dense", "pooling"])
def test_tma_loads_equal_pointer_loads(op, case, gen, device, monkeypatch):
    """K/V tiles through tensor descriptors (FWD_OPTIONS["tma"]) give the pointer loads' bits:
    strided [B, T, H, D] views, a length past the last full block (TMA pads those rows with
    zeros where the pointer loads mask them), GQA, windows and padded rows; and the
    descriptors are really built when asked for and not otherwise."""
    if device == "cpu":  # the interpreter's sparse tiles gather two blocks; TMA needs one per step
        monkeypatch.setitem(bsa_module.CONFIG_OVERRIDES, ("fwd", True, 64), (64, 64, 4, 1))
    built = []
    monkeypatch.setattr(bsa_module, "TensorDescriptor",
                        lambda *a, _td=bsa_module.TensorDescriptor: built.append(a[3]) or _td(*a))
    B, HQ, H, T, D = 2, 6, 2, 190, 64
    causal, window = case != "full", (100 if case == "window-padded" else None)
    bounds = torch.tensor([[9, T], [0, 170]], device=device) if case == "window-padded" else None
    q, k, v = (_randn(gen, (B, T, n, D), torch.float16, device).transpose(1, 2) for n in (HQ, H, H))
    mask = _mask(gen, B, HQ, T, 0.5, causal, device)
    kw = dict(causal=causal, seq_bounds=bounds, window=window, backend="triton")
    if op == "sparse":
        run = lambda: (block_sparse_attn(q, k, v, mask, **kw),)  # noqa: E731
    elif op == "dense":
        run = lambda: (dense_attn(q, k, v, **kw),)  # noqa: E731
    else:
        run = lambda: attn_with_pooling(q, k, v, **kw)  # noqa: E731
    monkeypatch.setitem(bsa_module.FWD_OPTIONS, "tma", False)
    plain = run()
    assert built == []
    monkeypatch.setitem(bsa_module.FWD_OPTIONS, "tma", True)
    tma = run()
    assert built, "TMA asked for but no tensor descriptor built"
    assert all(shape[2] in (64, 128) for shape in built), built
    for a, b in zip(plain, tma):
        assert torch.equal(a, b)
    ref = block_sparse_attn_ref(q, k, v, mask if op == "sparse" else torch.ones_like(mask), causal=causal,
                                seq_bounds=bounds, window=window)
    assert (tma[0].float() - ref.float()).abs().max() < 2e-2


@pytest.mark.parametrize("case", ["causal", "window-padded", "full"])
@pytest.mark.parametrize("op", ["sparse", "dense", "dense-gpu-tiles"])
def test_tma_backward_equals_pointer_loads(op, case, gen, device, monkeypatch):
    """The backward kernels' tiles through tensor descriptors (BWD_OPTIONS["tma"]: K/V in the dQ
    kernel, Q/dO in the dK/dV kernel) give the pointer loads' gradients bit for bit: strided
    views, a partial last block, GQA, windows, padded rows; descriptors built only when asked.
    ``dense-gpu-tiles``: the GPU's dense TMA tiles (dQ 128 x 64, dK/dV 64 query rows x 128 keys)."""
    if device == "cpu":  # one-block sparse tiles (the interpreter's default tiles gather two blocks)
        for kernel in ("dq", "dkdv"):
            monkeypatch.setitem(bsa_module.CONFIG_OVERRIDES, (kernel, True, 64), (64, 64, 4, 1))
    if op == "dense-gpu-tiles":
        monkeypatch.setitem(bsa_module.CONFIG_OVERRIDES, ("dq", False, 64), (128, 64, 4, 1))
        monkeypatch.setitem(bsa_module.CONFIG_OVERRIDES, ("dkdv", False, 64), (64, 128, 4, 1))
    built = []
    monkeypatch.setattr(bsa_module, "TensorDescriptor",
                        lambda *a, _td=bsa_module.TensorDescriptor: built.append(a[0].shape) or _td(*a))
    monkeypatch.setitem(bsa_module.FWD_OPTIONS, "tma", False)
    B, HQ, H, T, D = 2, 6, 2, 190, 64
    causal, window = case != "full", (100 if case == "window-padded" else None)
    bounds = torch.tensor([[9, T], [0, 170]], device=device) if case == "window-padded" else None
    q, k, v, do = (_randn(gen, (B, T, n, D), torch.float16, device).transpose(1, 2) for n in (HQ, H, H, HQ))
    mask = _mask(gen, B, HQ, T, 0.5, causal, device)
    kw = dict(causal=causal, seq_bounds=bounds, window=window, backend="triton")
    fn = (lambda q, k, v: block_sparse_attn(q, k, v, mask, **kw)) if op == "sparse" else (  # noqa: E731
        lambda q, k, v: dense_attn(q, k, v, **kw))
    monkeypatch.setitem(bsa_module.BWD_OPTIONS, "tma", False)
    plain = _grads(fn, q, k, v, do)
    assert built == []
    monkeypatch.setitem(bsa_module.BWD_OPTIONS, "tma", True)
    tma = _grads(fn, q, k, v, do)
    # dQ reads K and V ([B, H, ...]), dK/dV reads Q and dO ([B, HQ, ...])
    assert {s[1] for s in built} == {H, HQ}, built
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, tma):
        assert torch.equal(a, b), name
    ref_mask = mask if op == "sparse" else torch.ones_like(mask)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, ref_mask, causal=causal, seq_bounds=bounds,
                                                       window=window), q, k, v, do)
    for name, a, r in zip(("dq", "dk", "dv"), tma[1:], ref[1:]):
        assert (a.float() - r.float()).abs().max() < 5e-2, name


# ----------------------------------------------------------------------------- pair programs

def _pair_cases():
    cases = []
    for T in (1, 63, 64, 65, 130, 200):  # one block, odd and even block counts, partial last blocks
        for density in (0.0, 0.3, 1.0):
            for causal in (True, False):
                cases.append((T, 3, 64, density, "fp16", causal))
    cases += [(200, 1, 128, 0.5, "fp16", True), (130, 3, 64, 0.5, "fp32", True), (130, 3, 64, 0.5, "fp32", False)]
    return [pytest.param(*c, id=_case_id(*c)) for c in cases]


@pytest.mark.parametrize("T, gqa, D, density, dtype, causal", _pair_cases())
def test_pair_rows_forward_and_backward(T, gqa, D, density, dtype, causal, gen, device, error_budget, monkeypatch):
    """FWD_OPTIONS["pair_rows"]: 128-row programs over the union of two query blocks' lists,
    each half masked where its block did not keep the key block. Output and gradients (the
    backward reads the pair forward's log-sum-exp) within the budget of the fp32 reference,
    empty rows and odd block counts included; the pair lists are really used."""
    monkeypatch.setitem(bsa_module.FWD_OPTIONS, "pair_rows", True)
    used = []
    convert = bsa_module.block_mask_to_indices
    monkeypatch.setattr(bsa_module, "block_mask_to_indices",
                        lambda *a, **kw: used.append(kw.get("pairs", False)) or convert(*a, **kw))
    dt = DTYPES[dtype]
    B, HQ, H = SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt, device)
    mask = _mask(gen, B, HQ, T, density, causal, device)
    if density > 0:  # a block keeping nothing beside one keeping something: its half stays empty
        mask[0, 0, 0, :] = False
    do = _randn(gen, q.shape, dt, device)
    fn = lambda q, k, v: block_sparse_attn(q, k, v, mask, causal=causal, backend="triton")  # noqa: E731
    got = _grads(fn, q, k, v, do)
    assert used and used[0] is True, used
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal), *_up(q, k, v), _up(do)[0])
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])


def test_pair_rows_padded_batch_and_fallbacks(gen, device, monkeypatch):
    """Pair programs with padded rows (seq_bounds) match the row programs; windows and pooling
    fall back to row programs; a bad option value is named."""
    monkeypatch.setitem(bsa_module.FWD_OPTIONS, "pair_rows", True)
    B, HQ, H, T, D = 2, 4, 2, 190, 64
    q, k, v = (_randn(gen, (B, n, T, D), torch.float16, device) for n in (HQ, H, H))
    mask = _mask(gen, B, HQ, T, 0.5, True, device)
    bounds = torch.tensor([[9, T], [0, 170]], device=device)
    paired = block_sparse_attn(q, k, v, mask, seq_bounds=bounds, backend="triton")
    ref = block_sparse_attn_ref(q, k, v, mask, seq_bounds=bounds)
    assert (paired.float() - ref.float()).abs().max() < 2e-2
    assert not bsa_module._pair_rows(mask, 64, False, 100) and not bsa_module._pair_rows(mask, 64, True, None)
    assert not bsa_module._pair_rows(mask, 128, False, None) and bsa_module._pair_rows(mask, 64, False, None)
    for bad in ("auto", 1):  # 1 == True, yet not a bool
        monkeypatch.setitem(bsa_module.FWD_OPTIONS, "pair_rows", bad)
        with pytest.raises(ValueError, match=f"FWD_OPTIONS\\['pair_rows'\\] must be True or False, got {bad!r}"):
            block_sparse_attn(q, k, v, mask, backend="triton")


def test_tma_option_is_checked():
    for name in ("FWD_OPTIONS", "BWD_OPTIONS"):
        options = getattr(bsa_module, name)
        for bad in ("yes", 1, 0):  # 1 == True, 0 == False, yet not bools
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(options, "tma", bad)
                with pytest.raises(ValueError, match=f"{name}\\['tma'\\] must be True, False or 'auto', got {bad!r}"):
                    bsa_module._tma_ok(options, torch.zeros(1, 1, 64, 128, dtype=torch.float16))
