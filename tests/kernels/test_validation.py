"""User-facing validation of the attention ops and their references: bad inputs raise
ValueError / TypeError whose message names the offending argument and value (style guide),
before anything is launched."""
import re

import pytest
import torch

from seer_attn import kernels

B, HQ, H, T, D = 1, 2, 1, 65, 64  # a valid GQA-2 shape; NB = 2
NB = 2
PUBLIC_OPS = ["block_sparse_attn", "dense_attn", "attn_with_pooling"]
REF_OPS = ["block_sparse_attn_ref", "attn_with_pooling_ref"]
ALL_OPS = PUBLIC_OPS + REF_OPS


def _t(shape, dtype=torch.float16, device="cpu"):
    return torch.randn(shape).to(dtype).to(device) if dtype.is_floating_point else torch.ones(shape, dtype=dtype,
                                                                                              device=device)


def _good(device):
    return dict(q=_t((B, HQ, T, D), device=device), k=_t((B, H, T, D), device=device),
                v=_t((B, H, T, D), device=device), block_mask=torch.ones(B, HQ, NB, NB, dtype=torch.bool,
                                                                         device=device))


def _call(op, q, k, v, block_mask, **kw):
    fn = getattr(kernels, op)
    if op in PUBLIC_OPS:
        kw.setdefault("backend", "triton")
    if op.startswith("block_sparse"):
        return fn(q, k, v, block_mask, **kw)
    return fn(q, k, v, **kw)


def _run(op, device, **override):
    args = _good(device)
    kw = {name: override.pop(name) for name in list(override) if name not in args}
    args.update(override)
    return _call(op, args["q"], args["k"], args["v"], args["block_mask"], **kw)


def test_valid_inputs_run(device):
    """The baseline every case below breaks in one place."""
    for op in ALL_OPS:
        _run(op, device)


# (id, overrides as a function of device, exception type, regex naming the bad value)
INPUT_CASES = [
    ("q-not-tensor", lambda d: dict(q=[[1.0]]), TypeError, r"q must be a torch\.Tensor, got list"),
    ("q-rank2", lambda d: dict(q=_t((T, D), device=d)), ValueError, r"q must have rank 4 .*got shape \(65, 64\)"),
    ("q-rank3", lambda d: dict(q=_t((HQ, T, D), device=d)), ValueError,
     r"q must have rank 4 \[B, H, T, D\], got shape \(2, 65, 64\)"),
    ("k-rank5", lambda d: dict(k=_t((B, H, T, 1, D), device=d)), ValueError,
     r"k must have rank 4 \[B, H, T, D\], got shape \(1, 1, 65, 1, 64\)"),
    ("v-rank3", lambda d: dict(v=_t((H, T, D), device=d)), ValueError, r"v must have rank 4 .*\(1, 65, 64\)"),
    ("int32", lambda d: {n: _t(s, torch.int32, d) for n, s in (("q", (B, HQ, T, D)), ("k", (B, H, T, D)),
                                                              ("v", (B, H, T, D)))},
     TypeError, r"q\.dtype must be one of .*got torch\.int32"),
    ("float64", lambda d: {n: _t(s, torch.float64, d) for n, s in (("q", (B, HQ, T, D)), ("k", (B, H, T, D)),
                                                                  ("v", (B, H, T, D)))},
     TypeError, r"q\.dtype must be one of .*got torch\.float64"),
    ("k-fp32", lambda d: dict(k=_t((B, H, T, D), torch.float32, d)), TypeError,
     r"q, k, v must share one dtype, got q=torch\.float16, k=torch\.float32, v=torch\.float16"),
    ("v-bf16", lambda d: dict(v=_t((B, H, T, D), torch.bfloat16, d)), TypeError, r"v=torch\.bfloat16"),
    ("k-meta", lambda d: dict(k=_t((B, H, T, D), device="meta")), ValueError,
     r"q, k, v must be on one device, got q=\w+(:\d+)?, k=meta"),
    ("v-meta", lambda d: dict(v=_t((B, H, T, D), device="meta")), ValueError, r"v=meta"),
    ("heads-4-vs-3", lambda d: dict(q=_t((B, 4, T, D), device=d), k=_t((B, 3, T, D), device=d),
                                    v=_t((B, 3, T, D), device=d), block_mask=torch.ones(B, 4, NB, NB, dtype=torch.bool,
                                                                                        device=d)),
     ValueError, r"number of query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    ("kv-more-heads", lambda d: dict(k=_t((B, 4, T, D), device=d), v=_t((B, 4, T, D), device=d)), ValueError,
     r"query heads \(2\) .* key/value heads \(4\)"),
    ("k-v-shapes", lambda d: dict(v=_t((B, H, T - 1, D), device=d)), ValueError,
     r"k and v must have the same shape, got k=\(1, 1, 65, 64\), v=\(1, 1, 64, 64\)"),
    ("kv-length", lambda d: dict(k=_t((B, H, 64, D), device=d), v=_t((B, H, 64, D), device=d)), ValueError,
     r"k/v shape \(1, 1, 64, 64\) does not match q shape \(1, 2, 65, 64\)"),
    ("kv-batch", lambda d: dict(k=_t((2, H, T, D), device=d), v=_t((2, H, T, D), device=d)), ValueError,
     r"k/v shape \(2, 1, 65, 64\) does not match q shape"),
    *[(f"head-dim-{hd}", (lambda hd: lambda d: dict(q=_t((B, HQ, T, hd), device=d), k=_t((B, H, T, hd), device=d),
                                                    v=_t((B, H, T, hd), device=d)))(hd),
       ValueError, rf"head_dim {hd} is not supported") for hd in (8, 48, 96, 256)],
    *[(f"block-size-{bs}", (lambda bs: lambda d: dict(block_size=bs))(bs), ValueError,
       rf"block_size {bs} is not supported; supported: \(64,\)") for bs in (32, 128)],
    *[(f"sm-scale-{s!r}", (lambda s: lambda d: dict(sm_scale=s))(s), ValueError,
       rf"sm_scale must be a positive finite number <= 10000 .*, got {re.escape(repr(s))}")
      for s in (0.0, -0.125, float("nan"), float("inf"), "0.125", 1e38, 10000.5, -float("inf"))],
    ("sm-scale-tensor", lambda d: dict(sm_scale=torch.tensor(0.125)), ValueError,
     r"sm_scale must be a positive finite number .*, got tensor\(0\.1250\)"),
    ("bounds-list", lambda d: dict(seq_bounds=[[0, T]]), TypeError,
     r"seq_bounds must be a torch\.Tensor of shape \[B, 2\], got list"),
    ("bounds-float", lambda d: dict(seq_bounds=torch.tensor([[0.0, 65.0]])), TypeError,
     r"seq_bounds must be an integer tensor, got torch\.float32"),
    ("bounds-bool", lambda d: dict(seq_bounds=torch.tensor([[False, True]])), TypeError, r"got torch\.bool"),
    ("bounds-shape-B", lambda d: dict(seq_bounds=torch.tensor([65])), ValueError,
     r"seq_bounds must have shape \[B, 2\] = \(1, 2\), got \(1,\)"),
    ("bounds-shape-3", lambda d: dict(seq_bounds=torch.tensor([[0, 1, 65]])), ValueError, r"got \(1, 3\)"),
    ("bounds-end-past-T", lambda d: dict(seq_bounds=torch.tensor([[0, 66]])), ValueError,
     r"0 <= start <= end <= T=65, got \[\[0, 66\]\]"),
    ("bounds-start-after-end", lambda d: dict(seq_bounds=torch.tensor([[40, 30]])), ValueError, r"got \[\[40, 30\]\]"),
    ("bounds-negative", lambda d: dict(seq_bounds=torch.tensor([[-1, 65]])), ValueError, r"got \[\[-1, 65\]\]"),
]

def _input_params():
    params = []
    for op in ALL_OPS:
        for cid, make, exc, match in INPUT_CASES:
            params.append(pytest.param(op, make, exc, match, id=f"{op}-{cid}"))
    return params


@pytest.mark.parametrize("op, make, exc, match", _input_params())
def test_bad_inputs_raise(op, make, exc, match, device):
    with pytest.raises(exc, match=match):
        _run(op, device, **make(device))


MASK_CASES = [
    ("not-tensor", lambda d: [[True]], TypeError, r"block_mask must be a torch\.Tensor, got list"),
    ("uint8", lambda d: torch.ones(B, HQ, NB, NB, dtype=torch.uint8, device=d), TypeError,
     r"block_mask must have dtype torch\.bool, got torch\.uint8"),
    ("float32", lambda d: torch.ones(B, HQ, NB, NB, device=d), TypeError, r"got torch\.float32"),
    ("NB+1", lambda d: torch.ones(B, HQ, NB + 1, NB + 1, dtype=torch.bool, device=d), ValueError,
     r"block_mask must have shape \[B, HQ, NB, NB\] = \(1, 2, 2, 2\), got \(1, 2, 3, 3\)"),
    ("kv-heads", lambda d: torch.ones(B, H, NB, NB, dtype=torch.bool, device=d), ValueError,
     r"= \(1, 2, 2, 2\), got \(1, 1, 2, 2\)"),
    ("rank3", lambda d: torch.ones(HQ, NB, NB, dtype=torch.bool, device=d), ValueError, r"got \(2, 2, 2\)"),
    ("not-square", lambda d: torch.ones(B, HQ, NB, NB + 1, dtype=torch.bool, device=d), ValueError,
     r"got \(1, 2, 2, 3\)"),
    ("meta", lambda d: torch.ones(B, HQ, NB, NB, dtype=torch.bool, device="meta"), ValueError,
     r"block_mask is on meta, q is on \w+"),
]


@pytest.mark.parametrize("op", ["block_sparse_attn", "block_sparse_attn_ref"])
@pytest.mark.parametrize("make, exc, match", [pytest.param(*c[1:], id=c[0]) for c in MASK_CASES])
def test_bad_block_mask_raises(op, make, exc, match, device):
    with pytest.raises(exc, match=match):
        _run(op, device, block_mask=make(device))


@pytest.mark.parametrize("op", PUBLIC_OPS)
@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None])
def test_bad_backend_raises(op, backend, device):
    match = rf"backend must be 'auto', 'triton' or 'torch', got {re.escape(repr(backend))}"
    with pytest.raises(ValueError, match=match):
        _run(op, device, backend=backend)


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_triton_backend_needs_cuda_or_interpreter(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors .*got device cpu"):
        _run(op, "cpu")


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_empty_sequence_raises(op, device):
    empty = dict(q=_t((B, HQ, 0, D), device=device), k=_t((B, H, 0, D), device=device),
                 v=_t((B, H, 0, D), device=device), block_mask=torch.ones(B, HQ, 0, 0, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"sequence length T must be >= 1, got 0"):
        _run(op, device, **empty)


@pytest.mark.parametrize("op", ["attn_with_pooling", "attn_with_pooling_ref"])
@pytest.mark.parametrize("pool_op", ["mean", "MAX", None])
def test_bad_pool_op_raises(op, pool_op, device):
    with pytest.raises(ValueError, match=rf"pool_op must be 'max' or 'sum', got {re.escape(repr(pool_op))}"):
        _run(op, device, pool_op=pool_op)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(sm_scale=True), ValueError, r"sm_scale must be a positive finite number <= 10000 .*, got True"),
    (dict(block_size=64.0), ValueError, r"block_size 64\.0 is not supported"),
], ids=["sm_scale-bool", "block_size-float"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_scalar_types_are_checked(op, kw, exc, match, device):
    with pytest.raises(exc, match=match):
        _run(op, device, **kw)


@pytest.mark.parametrize("mask, exc, match", [
    (lambda: torch.ones(1, 2, 3, 3), TypeError, r"bool torch\.Tensor, got torch\.float32"),
    (lambda: [[True]], TypeError, r"got list"),
    (lambda: torch.ones(2, 3, 3, dtype=torch.bool), ValueError, r"\[B, HQ, NB, NB\], got \(2, 3, 3\)"),
    (lambda: torch.ones(1, 1, 3, 4, dtype=torch.bool), ValueError, r"got \(1, 1, 3, 4\)"),
], ids=["float", "list", "rank3", "not-square"])
def test_block_mask_to_indices_validates(mask, exc, match):
    from seer_attn.kernels import block_mask_to_indices
    with pytest.raises(exc, match=match):
        block_mask_to_indices(mask())


@pytest.mark.parametrize("causal", ["no", "", 1, 0, None, torch.tensor(True)], ids=repr)
@pytest.mark.parametrize("op", ALL_OPS)
def test_causal_must_be_a_bool(op, causal, device):
    """``causal="no"`` was truthy, so it ran causal attention silently (Triton and reference paths)."""
    with pytest.raises(TypeError, match=rf"causal must be True or False, got {re.escape(repr(causal))}"):
        _run(op, device, causal=causal)


@pytest.mark.parametrize("op", ALL_OPS)
def test_largest_sm_scale_is_finite(op, device):
    """The bound is sound: at sm_scale = MAX_SM_SCALE, large fp16 inputs still give a finite output
    (1e38 gave NaN silently)."""
    from seer_attn.kernels.kernel_utils import MAX_SM_SCALE
    out = _run(op, device, sm_scale=MAX_SM_SCALE, q=_t((B, HQ, T, D), device=device) * 100)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("window", [0, -64, 1.5, 64.0, True, "64", torch.tensor(64)], ids=repr)
@pytest.mark.parametrize("op", ALL_OPS)
def test_bad_window_raises(op, window, device):
    match = rf"window must be None or a positive int \(tokens\), got {re.escape(repr(window))}"
    with pytest.raises(ValueError, match=match):
        _run(op, device, window=window)


@pytest.mark.parametrize("op", ALL_OPS)
def test_window_needs_causal(op, device):
    with pytest.raises(ValueError, match=r"window=64 needs causal=True"):
        _run(op, device, window=64, causal=False)
