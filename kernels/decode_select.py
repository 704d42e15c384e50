"""The KV blocks a decode step reads: per (sequence, KV head), the ``cnt`` best-scoring blocks
(docs/design.md §2, "Decode"), in one launch instead of a bias add and a top-k.

``top_blocks(scores, bias, counts, k)`` returns int32 ``[B, H, k]``: the indices of the
``counts[b, h]`` largest entries of ``scores + bias`` (ties: the lower index first), in
increasing block order, then -1. The decode kernel reads the first ``counts`` entries of a
row, so the kept set needs no sort.

Kernel: one program per row holds the row's scores as order-preserving int32 keys in
registers, finds the ``cnt``-th largest key by bisection over the 32-bit key range (32
counting passes over the registers), then writes the indices of the keys above it and of
the first ones equal to it at positions given by a prefix sum. Rows of up to
:data:`MAX_BLOCKS` blocks (64k-token blocks: a 1M-token cache); longer rows and CPU tensors
take the torch reference (:func:`~.reference.top_blocks_ref`).
"""
import torch

from .kernel_utils import HAS_TRITON, interpreting, tl, triton
from .reference import top_blocks_ref

#: the longest row (blocks) the kernel holds in registers
MAX_BLOCKS = 16384


@triton.jit
def _top_blocks_kernel(S, BIAS, CNT, OUT, N, K, H, s_sb, s_sh, s_bb, s_ob, s_oh, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    cnt = tl.load(CNT + pid).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(S + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh + offs, mask=m, other=0.0).to(tl.float32)
    x += tl.load(BIAS + b.to(tl.int64) * s_bb + offs, mask=m, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # increasing with x (-inf lowest)
    key = tl.where(m, key, -4294967296)  # below every real key
    lo = tl.min(key, 0) * 0 - 2147483648  # the largest t with count(key >= t) >= cnt lies in [lo, hi]
    hi = lo + 4294967295
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((key >= mid).to(tl.int64), 0) >= cnt
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    gt = key > lo
    eq = key == lo
    need = cnt - tl.sum(gt.to(tl.int64), 0)
    take = gt | (eq & (tl.cumsum(eq.to(tl.int64), 0) <= need))
    pos = tl.cumsum(take.to(tl.int64), 0) - 1
    out = OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    tl.store(out + pos, offs, mask=take & (pos < K))
    tl.store(out + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= cnt) & (offs < K))


def top_blocks(scores, bias, counts, k, backend="auto"):
    """The ``counts`` best blocks of each row (module docstring).

    Args:
        scores: float ``[B, H, N]`` (any float dtype; summed with the bias in float32).
        bias: float ``[B, 1, N]``, the same for every head of a sequence.
        counts: int ``[B, H]``, each in ``[0, k]``.
        k: the output width, ``1 <= k <= N``.
        backend: ``"auto"`` (Triton on CUDA for rows of at most :data:`MAX_BLOCKS`), ``"triton"``
            or ``"torch"``.

    Returns:
        int32 ``[B, H, k]``.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H, N], got shape {tuple(scores.shape)}")
    B, H, N = scores.shape
    if tuple(bias.shape) != (B, 1, N):
        raise ValueError(f"bias must have shape [B, 1, N] = {(B, 1, N)}, got {tuple(bias.shape)}")
    if tuple(counts.shape) != (B, H):
        raise ValueError(f"counts must have shape [B, H] = {(B, H)}, got {tuple(counts.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an integer in [1, N={N}], got {k!r}")
    use_triton = backend == "triton" or (backend == "auto" and HAS_TRITON and scores.is_cuda and N <= MAX_BLOCKS)
    if not use_triton:
        return top_blocks_ref(scores, bias, counts, k)
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if not (scores.is_cuda or interpreting()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {scores.device}")
    if N > MAX_BLOCKS:
        raise ValueError(f"rows of {N} blocks exceed the kernel's {MAX_BLOCKS}; use backend='torch'")
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    bias = bias.float().contiguous()
    counts = counts.to(torch.int32).contiguous()
    out = torch.empty(B, H, k, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(N))
    _top_blocks_kernel[(B * H,)](scores, bias, counts, out, N, k, H, scores.stride(0), scores.stride(1),
                                 bias.stride(0), out.stride(0), out.stride(1), BLOCK=block,
                                 num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return out
