"""Input builders shared by the kernel test files (on sys.path through setup.cfg's pytest
``pythonpath``; imported as ``kernel_inputs``)."""
import torch


def nb(T):
    """Number of 64-token blocks of T tokens."""
    return (T + 63) // 64


def randn(gen, shape, dtype, device="cpu", scale=1.0, shift=0.0):
    """Normal values drawn on the CPU from ``gen`` (reproducible), then cast and moved."""
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype).to(device)


def qkv(gen, B, HQ, H, T, D, dtype, device="cpu"):
    """q [B, HQ, T, D], k and v [B, H, T, D]."""
    return randn(gen, (B, HQ, T, D), dtype, device), randn(gen, (B, H, T, D), dtype, device), \
        randn(gen, (B, H, T, D), dtype, device)


def up(*ts):
    """The same tensors in fp32 (inputs of the fp32 references)."""
    return tuple(t.float() for t in ts)


def grads(fn, q, k, v, do):
    """Output and (dq, dk, dv) of ``fn`` through autograd, on fresh leaf copies; when ``fn``
    returns a tuple (attn_with_pooling), its first element is the output."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def dense_cases(d128_gqas=(1, 3), extra=()):
    """pytest params ``(T, gqa, D, dtype, causal)`` for the kernels without a block mask:
    every T, GQA ratio, causal flag and dtype at head_dim 64; fp16 at head_dim 128 for T 65
    and 200 with the GQA ratios ``d128_gqas``; then the cases ``extra``."""
    import pytest
    cases = []
    for T in (1, 63, 64, 65, 192, 200):
        for gqa in (1, 3):
            for causal in (True, False):
                for dtype in ("fp16", "fp32"):
                    cases.append((T, gqa, 64, dtype, causal))
    for T in (65, 200):
        for gqa in d128_gqas:
            for causal in (True, False):
                cases.append((T, gqa, 128, "fp16", causal))
    cases += list(extra)
    return [pytest.param(*c, id=f"T{c[0]}-gqa{c[1]}-d{c[2]}-{c[3]}-{'causal' if c[4] else 'full'}") for c in cases]
