"""Compiled Triton kernels on a CUDA GPU: real shapes (8k/16k tokens, head_dim 128, GQA 4), bf16
(which the CPU interpreter cannot check) and fp16, against the fp32 torch reference, the
reference run in low precision, and torch SDPA; sliding windows (``-k window``) at 4k-16k
tokens with a 4096-token window. Skipped without CUDA.

Tolerance (style guide): error against the fp32 reference on the same (upcast) inputs
<= 2x the error of a low-precision baseline (the reference with ``upcast=False``, and SDPA)
plus a small slack, and <= a hard cap.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import grads as _grads, nb as _nb, qkv, randn, up as _up

from seer_attn.kernels import (attn_with_pooling, attn_with_pooling_ref, block_sparse_attn, block_sparse_attn_ref,
                               dense_attn, random_block_mask)

pytestmark = pytest.mark.requires_cuda
_randn = partial(randn, device="cuda")
_qkv = partial(qkv, device="cuda")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUT_BUDGET = {torch.bfloat16: dict(slack=4e-3, cap=5e-2), torch.float16: dict(slack=1e-3, cap=2e-2),
              torch.float32: dict(slack=1e-5, cap=1e-4)}
GRAD_BUDGET = {torch.bfloat16: dict(slack=4e-3, cap=5e-2), torch.float16: dict(slack=1e-3, cap=2e-2),
               torch.float32: dict(slack=1e-5, cap=1e-4)}
POOL_ATOL, POOL_RTOL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    """The fp32 reference must be fp32: no TF32 in torch's matmuls while these tests run."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
    torch.cuda.empty_cache()


def _mask(gen, B, HQ, T, density, causal):
    NB = _nb(T)
    m = random_block_mask(B, HQ, NB, density, generator=gen)
    if not causal:
        upper = torch.ones(NB, NB, dtype=torch.bool).triu(1)
        m = m | ((torch.rand(B, HQ, NB, NB, generator=gen) < density) & upper)
    return m.cuda()


def _full(B, HQ, T):
    return torch.ones(B, HQ, _nb(T), _nb(T), dtype=torch.bool, device="cuda")


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------- real shapes

LONG = [pytest.param(T, dtype, id=f"T{T}-gqa4-d128-{dtype}") for T in (8192, 16384) for dtype in ("bf16", "fp16")]


@pytest.mark.parametrize("T, dtype", LONG)
def test_long_dense_vs_reference_and_sdpa(T, dtype, gen, error_budget):
    dt = DTYPES[dtype]
    B, HQ, H, D = 1, 8, 2, 128
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    out = dense_attn(q, k, v, backend="triton")
    ref32 = block_sparse_attn_ref(*_up(q, k, v), _full(B, HQ, T))
    ref_lp = block_sparse_attn_ref(q, k, v, _full(B, HQ, T), upcast=False)
    error_budget(out, ref32, ref_lp, what="vs reference", **OUT_BUDGET[dt])
    error_budget(out, ref32, _sdpa(q, k, v, True), what="vs SDPA", **OUT_BUDGET[dt])
    # block_sparse_attn with every block kept is the same attention through the sparse variant
    sparse_full = block_sparse_attn(q, k, v, _full(B, HQ, T), backend="triton")
    error_budget(sparse_full, ref32, _sdpa(q, k, v, True), what="sparse all-blocks vs SDPA", **OUT_BUDGET[dt])


@pytest.mark.parametrize("T, density", [pytest.param(T, d, id=f"T{T}-gqa4-d128-dens{d}-bf16")
                                        for T in (8192, 16384 + 37) for d in (0.1, 0.3)])
def test_long_sparse_vs_reference(T, density, gen, error_budget):
    B, HQ, H, D = 1, 8, 2, 128
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.bfloat16)
    mask = _mask(gen, B, HQ, T, density, True)
    out = block_sparse_attn(q, k, v, mask, backend="triton")
    ref32 = block_sparse_attn_ref(*_up(q, k, v), mask)
    ref_lp = block_sparse_attn_ref(q, k, v, mask, upcast=False)
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[torch.bfloat16])


@pytest.mark.parametrize("pool_op", ["max", "sum"])
@pytest.mark.parametrize("T", [8192, 8192 + 37], ids=lambda T: f"T{T}-gqa4-d128-bf16")
def test_long_pooling_vs_reference_and_sdpa(T, pool_op, gen, error_budget):
    B, HQ, H, D = 1, 8, 2, 128
    q, k, v = _qkv(gen, B, HQ, H, T, D, torch.bfloat16)
    out, pooled = attn_with_pooling(q, k, v, backend="triton", pool_op=pool_op)
    ref_out, ref_pooled = attn_with_pooling_ref(*_up(q, k, v), pool_op=pool_op)
    lp_out, _ = attn_with_pooling_ref(q, k, v, upcast=False, pool_op=pool_op)
    error_budget(out, ref_out, lp_out, what="vs reference", **OUT_BUDGET[torch.bfloat16])
    error_budget(out, ref_out, _sdpa(q, k, v, True), what="vs SDPA", **OUT_BUDGET[torch.bfloat16])
    assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, ref_pooled, atol=POOL_ATOL, rtol=POOL_RTOL)
    NB = _nb(T)
    assert not pooled[..., torch.ones(NB, NB, dtype=torch.bool, device="cuda").triu(1)].any()
    torch.testing.assert_close(pooled.sum(-1), torch.ones(B, HQ, NB, device="cuda"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("op", ["dense", "sparse"])
def test_long_gradients_vs_reference_and_sdpa(op, gen, error_budget):
    B, HQ, H, T, D = 1, 4, 1, 8192, 128
    dt = torch.bfloat16
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    do = _randn(gen, (B, HQ, T, D), dt)
    mask = _full(B, HQ, T) if op == "dense" else _mask(gen, B, HQ, T, 0.3, True)
    if op == "dense":
        fn = lambda q, k, v: dense_attn(q, k, v, backend="triton")  # noqa: E731
    else:
        fn = lambda q, k, v: block_sparse_attn(q, k, v, mask, backend="triton")  # noqa: E731
    got = _grads(fn, q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=f"{name} vs reference", **GRAD_BUDGET[dt])
    if op == "dense":
        sd = _grads(lambda q, k, v: _sdpa(q, k, v, True), q, k, v, do)
        for name, a, r, s in zip(("out", "dq", "dk", "dv"), got, ref, sd):
            error_budget(a, r, s, rel=name != "out", what=f"{name} vs SDPA", **GRAD_BUDGET[dt])


@pytest.mark.parametrize("op", ["sparse", "dense", "pooling"])
def test_long_padded_batch(op, gen, error_budget):
    """Left- and right-padded rows of an 8k batch: zeros at padding, padding values inert."""
    B, HQ, H, T, D = 2, 8, 2, 8192, 128
    dt = torch.bfloat16
    bounds = torch.tensor([[T - 5000, T], [0, 6001]], device="cuda")
    pos = torch.arange(T, device="cuda")
    pad = ~((pos[None, :] >= bounds[:, :1]) & (pos[None, :] < bounds[:, 1:]))[:, None, :, None]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    mask = _mask(gen, B, HQ, T, 0.3, True) if op == "sparse" else _full(B, HQ, T)

    def fn(q, k, v):
        if op == "sparse":
            return block_sparse_attn(q, k, v, mask, seq_bounds=bounds, backend="triton"), None
        if op == "dense":
            return dense_attn(q, k, v, seq_bounds=bounds, backend="triton"), None
        return attn_with_pooling(q, k, v, seq_bounds=bounds, backend="triton")

    out, pooled = fn(q, k, v)
    if op == "pooling":
        ref32, ref_pooled = attn_with_pooling_ref(*_up(q, k, v), seq_bounds=bounds)
        ref_lp, _ = attn_with_pooling_ref(q, k, v, seq_bounds=bounds, upcast=False)
        torch.testing.assert_close(pooled, ref_pooled, atol=POOL_ATOL, rtol=POOL_RTOL)
    else:
        ref32 = block_sparse_attn_ref(*_up(q, k, v), mask, seq_bounds=bounds)
        ref_lp = block_sparse_attn_ref(q, k, v, mask, seq_bounds=bounds, upcast=False)
    error_budget(out, ref32, ref_lp, **OUT_BUDGET[dt])
    assert torch.equal(out.masked_fill(~pad, 0), torch.zeros_like(out))

    def garbage(t):
        return torch.where(pad, _randn(gen, t.shape, dt, scale=10.0, shift=5.0), t)

    out2, pooled2 = fn(garbage(q), garbage(k), garbage(v))
    assert torch.equal(out2.masked_fill(pad, 0), out.masked_fill(pad, 0)), "padding values leaked into real rows"
    if op == "pooling":
        assert torch.equal(pooled2, pooled)


# ----------------------------------------------------------------------------- bf16 at small shapes

def _small_cases():
    cases = []
    for T in (1, 63, 64, 65, 200, 1000):
        for gqa in (1, 3):
            for D in (64, 128):
                for density in (0.0, 0.5, 1.0):
                    for causal in (True, False):
                        cases.append((T, gqa, D, density, causal))
    return [pytest.param(*c, id=f"T{c[0]}-gqa{c[1]}-d{c[2]}-dens{c[3]}-bf16-{'causal' if c[4] else 'full'}")
            for c in cases]


SMALL_SHAPES = {1: (2, 2, 2), 3: (1, 6, 2)}


@pytest.mark.parametrize("T, gqa, D, density, causal", _small_cases())
def test_bf16_sparse_forward_backward(T, gqa, D, density, causal, gen, error_budget):
    dt = torch.bfloat16
    B, HQ, H = SMALL_SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    do = _randn(gen, (B, HQ, T, D), dt)
    mask = _mask(gen, B, HQ, T, density, causal)
    got = _grads(lambda q, k, v: block_sparse_attn(q, k, v, mask, causal=causal, backend="triton"), q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, causal=causal, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])


@pytest.mark.parametrize("T, gqa, D, causal", [
    pytest.param(T, g, D, c, id=f"T{T}-gqa{g}-d{D}-bf16-{'causal' if c else 'full'}")
    for T in (1, 65, 1000) for g in (1, 3) for D in (64, 128) for c in (True, False)])
def test_bf16_dense_and_pooling(T, gqa, D, causal, gen, error_budget):
    dt = torch.bfloat16
    B, HQ, H = SMALL_SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    do = _randn(gen, (B, HQ, T, D), dt)
    full = _full(B, HQ, T)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, full, causal=causal), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, full, causal=causal, upcast=False), q, k, v, do)
    for fn in (lambda q, k, v: dense_attn(q, k, v, causal=causal, backend="triton"),
               lambda q, k, v: attn_with_pooling(q, k, v, causal=causal, backend="triton")):
        got = _grads(fn, q, k, v, do)
        error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
        for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
            error_budget(a, r, lp, rel=True, what=name, **GRAD_BUDGET[dt])
    _, pooled = attn_with_pooling(q, k, v, causal=causal, backend="triton")
    _, ref_pooled = attn_with_pooling_ref(*_up(q, k, v), causal=causal)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, ref_pooled, atol=POOL_ATOL, rtol=POOL_RTOL)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_sdpa_agreement_small(dtype, gen, error_budget):
    """Odd length, GQA 4, both causal flags: Triton vs SDPA vs the fp32 reference."""
    dt = DTYPES[dtype]
    B, HQ, H, T, D = 2, 8, 2, 1031, 128
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    for causal in (True, False):
        out = dense_attn(q, k, v, causal=causal, backend="triton")
        ref32 = block_sparse_attn_ref(*_up(q, k, v), _full(B, HQ, T), causal=causal)
        error_budget(out, ref32, _sdpa(q, k, v, causal), what=f"causal={causal}", **OUT_BUDGET[dt])


# ----------------------------------------------------------------------------- sliding windows

def _window_sdpa(q, k, v, window):
    """SDPA under transformers' sliding-window mask (j <= i and i - j < window), materialised."""
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    vis = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=q.shape[1] != k.shape[1])


def _window_mask(gen, B, HQ, T, density, window):
    """A random mask plus every block the window does not reach (the kernel must skip those)."""
    from seer_attn.kernels import window_block_mask
    NB = _nb(T)
    reached = window_block_mask(NB, window, device="cuda")
    return _mask(gen, B, HQ, T, density, True) | (~reached & torch.ones_like(reached).tril())


WINDOW_LONG = [pytest.param(T, id=f"T{T}-w4096-gqa4-d128-bf16") for T in (4096, 8192 + 37, 16384)]


@pytest.mark.parametrize("T", WINDOW_LONG)
@pytest.mark.parametrize("op", ["dense", "sparse", "pooling"])
def test_long_window_vs_reference_and_sdpa(op, T, gen, error_budget):
    """Window 4096 at 4k-16k tokens, bf16: output against the fp32 reference (and SDPA under the
    same mask for dense/pooling); the pooled map against the reference, 0 where unreached."""
    B, HQ, H, D, window = 1, 8, 2, 128, 4096
    dt = torch.bfloat16
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    mask = _window_mask(gen, B, HQ, T, 0.3, window) if op == "sparse" else _full(B, HQ, T)
    if op == "sparse":
        out = block_sparse_attn(q, k, v, mask, window=window, backend="triton")
    elif op == "dense":
        out = dense_attn(q, k, v, window=window, backend="triton")
    else:
        out, pooled = attn_with_pooling(q, k, v, window=window, backend="triton")
    ref32 = block_sparse_attn_ref(*_up(q, k, v), mask, window=window)
    ref_lp = block_sparse_attn_ref(q, k, v, mask, window=window, upcast=False)
    error_budget(out, ref32, ref_lp, what="vs reference", **OUT_BUDGET[dt])
    if op != "sparse":
        error_budget(out, ref32, _window_sdpa(q, k, v, window), what="vs SDPA", **OUT_BUDGET[dt])
    if op == "pooling":
        from seer_attn.kernels import window_block_mask
        _, ref_pooled = attn_with_pooling_ref(*_up(q, k, v), window=window)
        torch.testing.assert_close(pooled, ref_pooled, atol=POOL_ATOL, rtol=POOL_RTOL)
        unreached = ~window_block_mask(_nb(T), window, device="cuda")
        assert not pooled[..., unreached].any()


@pytest.mark.parametrize("op", ["dense", "sparse"])
def test_long_window_gradients(op, gen, error_budget):
    B, HQ, H, T, D, window = 1, 4, 1, 8192, 128, 4096
    dt = torch.bfloat16
    q, k, v = _qkv(gen, B, HQ, H, T, D, dt)
    do = _randn(gen, (B, HQ, T, D), dt)
    mask = _full(B, HQ, T) if op == "dense" else _window_mask(gen, B, HQ, T, 0.3, window)
    if op == "dense":
        fn = lambda q, k, v: dense_attn(q, k, v, window=window, backend="triton")  # noqa: E731
    else:
        fn = lambda q, k, v: block_sparse_attn(q, k, v, mask, window=window, backend="triton")  # noqa: E731
    got = _grads(fn, q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, window=window), *_up(q, k, v, do))
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, window=window, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], **OUT_BUDGET[dt])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=f"{name} vs reference", **GRAD_BUDGET[dt])


@pytest.mark.parametrize("T, window, gqa", [pytest.param(T, w, g, id=f"T{T}-w{w}-gqa{g}-bf16")
                                             for T in (1, 65, 1000) for w in (1, 64, 100) for g in (1, 3)])
def test_bf16_window_small(T, window, gqa, gen, error_budget):
    """bf16 (which the interpreter cannot check) at the interpreter's small shapes: all three ops."""
    dt = torch.bfloat16
    B, HQ, H = SMALL_SHAPES[gqa]
    q, k, v = _qkv(gen, B, HQ, H, T, 64, dt)
    do = _randn(gen, (B, HQ, T, 64), dt)
    mask = _mask(gen, B, HQ, T, 0.5, True)
    for op in ("sparse", "dense", "pooling"):
        m = mask if op == "sparse" else _full(B, HQ, T)
        fn = {"sparse": lambda q, k, v: block_sparse_attn(q, k, v, m, window=window, backend="triton"),
              "dense": lambda q, k, v: dense_attn(q, k, v, window=window, backend="triton"),
              "pooling": lambda q, k, v: attn_with_pooling(q, k, v, window=window, backend="triton")}[op]
        got = _grads(fn, q, k, v, do)
        ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, m, window=window), *_up(q, k, v, do))
        ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, m, window=window, upcast=False), q, k, v, do)
        error_budget(got[0], ref[0], ref_lp[0], what=op, **OUT_BUDGET[dt])
        for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
            error_budget(a, r, lp, rel=True, what=f"{op} {name}", **GRAD_BUDGET[dt])


# ----------------------------------------------------------------------------- TMA loads

@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("op", ["sparse", "dense", "pooling"])
def test_tma_loads_equal_pointer_loads_long(op, D, gen, monkeypatch):
    """Compiled for the GPU, K/V through tensor descriptors (Hopper TMA) give the pointer loads'
    bits at a real shape: 8k + 33 tokens (a partial last block), GQA 4, bf16, strided views."""
    import importlib
    bsa = importlib.import_module("seer_attn.kernels.block_sparse_attn")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need a Hopper-or-newer GPU")
    built = []
    monkeypatch.setattr(bsa, "TensorDescriptor", lambda *a, _td=bsa.TensorDescriptor: built.append(a[3]) or _td(*a))
    B, HQ, H, T = 1, 16, 4, 8192 + 33
    q, k, v = (_randn(gen, (B, T, n, D), torch.bfloat16).transpose(1, 2) for n in (HQ, H, H))
    mask = _mask(gen, B, HQ, T, 0.3, True)
    run = {"sparse": lambda: (block_sparse_attn(q, k, v, mask),), "dense": lambda: (dense_attn(q, k, v),),
           "pooling": lambda: attn_with_pooling(q, k, v)}[op]
    monkeypatch.setitem(bsa.FWD_OPTIONS, "tma", False)
    plain = run()
    assert built == []
    monkeypatch.setitem(bsa.FWD_OPTIONS, "tma", True)
    tma = run()
    assert built
    for a, b in zip(plain, tma):
        assert torch.equal(a, b)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("op", ["sparse", "dense"])
def test_tma_backward_equals_pointer_loads_long(op, D, gen, monkeypatch):
    """Compiled for the GPU, the backward kernels' tiles through tensor descriptors (K/V in dQ,
    Q/dO in dK/dV) give the pointer loads' gradients bit for bit at 8k + 33 tokens, GQA 4,
    bf16, strided views (the reference comparisons above run the default, TMA at d128)."""
    import importlib
    bsa = importlib.import_module("seer_attn.kernels.block_sparse_attn")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need a Hopper-or-newer GPU")
    built = []
    monkeypatch.setattr(bsa, "TensorDescriptor",
                        lambda *a, _td=bsa.TensorDescriptor: built.append(a[0].shape) or _td(*a))
    monkeypatch.setitem(bsa.FWD_OPTIONS, "tma", False)
    B, HQ, H, T = 1, 16, 4, 8192 + 33
    q, k, v, do = (_randn(gen, (B, T, n, D), torch.bfloat16).transpose(1, 2) for n in (HQ, H, H, HQ))
    mask = _mask(gen, B, HQ, T, 0.3, True) if op == "sparse" else _full(B, HQ, T)
    fn = (lambda q, k, v: block_sparse_attn(q, k, v, mask)) if op == "sparse" else dense_attn
    monkeypatch.setitem(bsa.BWD_OPTIONS, "tma", False)
    plain = _grads(fn, q, k, v, do)
    assert built == []
    monkeypatch.setitem(bsa.BWD_OPTIONS, "tma", True)
    tma = _grads(fn, q, k, v, do)
    assert {s[1] for s in built} == {H, HQ}, built
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, tma):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("D", [64, 128])
def test_pair_rows_long(D, density, gen, monkeypatch, error_budget):
    """Compiled for the GPU, pair programs (FWD_OPTIONS["pair_rows"]: 128 query rows over the
    union of two blocks' lists) at 8k + 33 tokens, GQA 4, bf16: output and gradients within the
    budget of the fp32 reference, as the row programs are."""
    import importlib
    bsa = importlib.import_module("seer_attn.kernels.block_sparse_attn")
    monkeypatch.setitem(bsa.FWD_OPTIONS, "pair_rows", True)
    B, HQ, H, T = 1, 16, 4, 8192 + 33
    q, k, v, do = (_randn(gen, (B, n, T, D), torch.bfloat16) for n in (HQ, H, H, HQ))
    mask = _mask(gen, B, HQ, T, density, True)
    got = _grads(lambda q, k, v: block_sparse_attn(q, k, v, mask), q, k, v, do)
    ref = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask), *_up(q, k, v), _up(do)[0])
    ref_lp = _grads(lambda q, k, v: block_sparse_attn_ref(q, k, v, mask, upcast=False), q, k, v, do)
    error_budget(got[0], ref[0], ref_lp[0], what="pair output", **OUT_BUDGET[torch.bfloat16])
    for name, a, r, lp in zip(("dq", "dk", "dv"), got[1:], ref[1:], ref_lp[1:]):
        error_budget(a, r, lp, rel=True, what=f"pair {name}", **GRAD_BUDGET[torch.bfloat16])
