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
