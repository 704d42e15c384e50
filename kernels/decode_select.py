"""The KV blocks a decode step reads: the decode gate's block scores and, per (sequence, KV
head), the ``cnt`` best-scoring blocks (docs/design.md §2, "Decode"), one launch each.

``gate_scores(y, keys, rope)`` returns float32 ``[B, H, N]``: the projected query of each
(sequence, KV head), rotated by RoPE (``y[..., :G] * cos + y[..., G:] * sin``, the partner
columns made by the projection) when ``rope`` is given, dotted with each of its ``N`` block
keys. One program per (row, chunk of 64 blocks): the three elementwise ops and the batched
matmul of the torch path become one launch, in float32 throughout.

``top_blocks(scores, bias, counts, k)`` returns int32 ``[B, H, k]``: the indices of the
``counts[b, h]`` largest entries of ``scores + bias`` (ties: the lower index first), in
increasing block order, then -1. The decode kernel reads the first ``counts`` entries of a
row, so the kept set needs no sort.

Kernel: one program per row holds the row's scores as order-preserving int32 keys in
registers, finds the ``cnt``-th largest key by bisection over the 32-bit key range (32
counting passes over the registers, compares and counts in int32: a GPU runs 64-bit integer
ops as pairs of 32-bit ones), then writes the indices of the keys above it and of
the first ones equal to it at positions given by a prefix sum. Rows of up to
:data:`MAX_BLOCKS` blocks (64k-token blocks: a 1M-token cache); longer rows and CPU tensors
take the torch reference (:func:`~.reference.top_blocks_ref`).
"""
import torch

from .kernel_utils import HAS_TRITON, interpreting, tl, triton
from .reference import gate_scores_ref, top_blocks_ref

#: the longest row (blocks) the kernel holds in registers
MAX_BLOCKS = 16384
#: block keys scored per gate_scores program
SCORE_CHUNK = 64
#: launch warps of top_blocks by padded row length (the largest bound at or above it); benchmarks
#: may override entries (docs/experiments/decode_step_sweep.py)
TOP_BLOCKS_WARPS = {2048: 4, 8192: 8, MAX_BLOCKS: 16}


@triton.jit
def _gate_scores_kernel(Y, COS, SIN, KEYS, OUT, N, H, s_yb, s_yh, s_cb, s_sb, s_kb, s_kh, s_kn, s_ob, s_oh,
                        G: tl.constexpr, ROPE: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_g = tl.arange(0, G)
    y_row = Y + b * s_yb + h * s_yh
    q = tl.load(y_row + offs_g).to(tl.float32)
    if ROPE:
        q = q * tl.load(COS + b * s_cb + offs_g).to(tl.float32) \
            + tl.load(y_row + G + offs_g).to(tl.float32) * tl.load(SIN + b * s_sb + offs_g).to(tl.float32)
    offs_n = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    m = offs_n < N
    k = tl.load(KEYS + b * s_kb + h * s_kh + offs_n.to(tl.int64)[:, None] * s_kn + offs_g[None, :],
                mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + b * s_ob + h * s_oh + offs_n, tl.sum(k * q[None, :], 1), mask=m)


@triton.jit
def _top_blocks_kernel(S, BIAS, CNT, OUT, N, K, H, s_sb, s_sh, s_bb, s_ob, s_oh, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    cnt = tl.load(CNT + pid)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(S + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh + offs, mask=m, other=0.0).to(tl.float32)
    x += tl.load(BIAS + b.to(tl.int64) * s_bb + offs, mask=m, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32, increasing with x (-inf lowest)
    # the largest t with count(key >= t) >= cnt lies in [lo, hi]; the bounds are int64 scalars
    # (the int32 range's ends), the per-block compares and counts int32
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum(((key >= mid.to(tl.int32)) & m).to(tl.int32), 0) >= cnt
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    t = lo.to(tl.int32)
    gt = (key > t) & m
    eq = (key == t) & m
    need = cnt - tl.sum(gt.to(tl.int32), 0)
    take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    out = OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    tl.store(out + pos, offs, mask=take & (pos < K))
    tl.store(out + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= cnt) & (offs < K))


def _use_triton(backend, t, what):
    """Whether a public function runs its Triton kernel (``backend`` checked by the caller)."""
    use = backend == "triton" or (backend == "auto" and HAS_TRITON and t.is_cuda)
    if use and not HAS_TRITON:
        raise RuntimeError(f"{what}: backend='triton' needs the triton package (pip install triton)")
    if use and not (t.is_cuda or interpreting()):
        raise ValueError(f"{what}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {t.device}")
    return use


def _check_backend(backend):
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def gate_scores(y, keys, rope=None, backend="auto"):
    """The decode gate's block logits of one step (module docstring).

    Args:
        y: ``[B, H, 2G]`` projected queries, the map's columns then their RoPE partners (or
            ``[B, H, G]`` without ``rope``); any strides with the last one 1.
        keys: ``[B, H, N, G]`` block keys (may be a slice of a larger buffer; last stride 1).
        rope: optional ``(cos, sin)``, each ``[B, G]``, at the token's position.
        backend: ``"auto"`` (Triton on CUDA when G is a power of two), ``"triton"`` or ``"torch"``.

    Returns:
        float32 ``[B, H, N]``.
    """
    _check_backend(backend)
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, H, N, G], got shape {tuple(keys.shape)}")
    B, H, N, G = keys.shape
    width = 2 * G if rope is not None else G
    if tuple(y.shape) != (B, H, width):
        raise ValueError(f"y must have shape [B, H, {'2G' if rope is not None else 'G'}] = {(B, H, width)}, "
                         f"got {tuple(y.shape)}")
    if rope is not None and any(tuple(t.shape) != (B, G) for t in rope):
        raise ValueError(f"rope must be (cos, sin) of shape [B, G] = {(B, G)}, got {[tuple(t.shape) for t in rope]}")
    pow2 = G >= 16 and G & (G - 1) == 0
    if backend == "triton" and not pow2:
        raise ValueError(f"backend='triton' needs G a power of two >= 16, got {G}")
    if not (pow2 and _use_triton(backend, keys, "gate_scores")):
        return gate_scores_ref(y, keys, rope)
    y, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (y, keys))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in rope) if rope is not None else (y, y)
    out = torch.empty(B, H, N, dtype=torch.float32, device=keys.device)
    _gate_scores_kernel[(B * H, triton.cdiv(N, SCORE_CHUNK))](
        y, cos, sin, keys, out, N, H, y.stride(0), y.stride(1), cos.stride(0), sin.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0), out.stride(1),
        G=G, ROPE=rope is not None, CHUNK=SCORE_CHUNK, num_warps=4)
    return out


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
    _check_backend(backend)
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H, N], got shape {tuple(scores.shape)}")
    B, H, N = scores.shape
    if tuple(bias.shape) != (B, 1, N):
        raise ValueError(f"bias must have shape [B, 1, N] = {(B, 1, N)}, got {tuple(bias.shape)}")
    if tuple(counts.shape) != (B, H):
        raise ValueError(f"counts must have shape [B, H] = {(B, H)}, got {tuple(counts.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an integer in [1, N={N}], got {k!r}")
    if backend == "triton" and N > MAX_BLOCKS:
        raise ValueError(f"rows of {N} blocks exceed the kernel's {MAX_BLOCKS}; use backend='torch'")
    if not (N <= MAX_BLOCKS and _use_triton(backend, scores, "top_blocks")):
        return top_blocks_ref(scores, bias, counts, k)
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    bias = bias.float().contiguous()
    counts = counts.to(torch.int32).contiguous()
    out = torch.empty(B, H, k, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(N))
    _top_blocks_kernel[(B * H,)](scores, bias, counts, out, N, k, H, scores.stride(0), scores.stride(1),
                                 bias.stride(0), out.stride(0), out.stride(1), BLOCK=block,
                                 num_warps=TOP_BLOCKS_WARPS[min(b for b in TOP_BLOCKS_WARPS if b >= block)])
    return out
