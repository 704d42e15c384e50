"""The block-mask type and its one conversion to per-row index lists.

A block mask is a bool tensor ``[B, HQ, NB, NB]`` with NB = ceil(T / block_size): entry
(b, h, i, j) True means query block i of head h attends key block j. With ``causal`` only
the lower triangle (j <= i) is meaningful; entries above the diagonal are ignored.

The kernels read masks as index lists: for every row, the selected column indices in
ascending order, packed at the start of the row, plus a count. :func:`block_mask_to_indices`
is the only place that conversion happens. Its ``pairs`` form lists, for every pair of
query blocks (2i, 2i + 1), the union of their two rows, each entry ``4 * j + flags`` with
flag bit 0 set when block 2i keeps key block j and bit 1 when block 2i + 1 does (the forward
kernel's 128-row programs, ``FWD_OPTIONS["pair_rows"]``).
"""
import torch

from .kernel_utils import HAS_TRITON, interpreting, tl, triton


@triton.jit
def _mask_to_indices_kernel(M, IDX, CNT, NB, ROWS, s_mr, s_mc, CAUSAL: tl.constexpr, TRANSPOSE: tl.constexpr,
                            PAIRS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one row of the [B*HQ*ROWS, NB] output (a mask row, its transpose, or a pair)
    bh = row // ROWS
    i = row % ROWS
    base = M + bh.to(tl.int64) * NB * NB
    if CAUSAL and TRANSPOSE:
        lo = i  # key block i is seen by query blocks i..NB-1
    else:
        lo = 0
    if CAUSAL and not TRANSPOSE:
        if PAIRS:
            hi = tl.minimum(2 * i + 2, NB)
        else:
            hi = i + 1
    else:
        hi = NB
    count = 0
    for c0 in range(lo, hi, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        inb = cols < hi
        if PAIRS:  # rows 2i and 2i + 1 (past NB: none); causal: row 2i only up to its diagonal
            a = tl.load(base + (2 * i) * s_mr + cols * s_mc, mask=inb, other=0) != 0
            hi_b = tl.where(2 * i + 1 < NB, hi, 0)
            b = tl.load(base + (2 * i + 1) * s_mr + cols * s_mc, mask=cols < hi_b, other=0) != 0
            if CAUSAL:
                a = a & (cols <= 2 * i)
            sel = (a | b) & inb
            val = cols * 4 + a.to(tl.int32) + 2 * b.to(tl.int32)
        else:
            if TRANSPOSE:
                m = tl.load(base + cols * s_mr + i * s_mc, mask=inb, other=0)
            else:
                m = tl.load(base + i * s_mr + cols * s_mc, mask=inb, other=0)
            sel = (m != 0) & inb
            val = cols
        pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1 + count
        tl.store(IDX + row.to(tl.int64) * NB + pos, val.to(tl.int32), mask=sel)
        count += tl.sum(sel.to(tl.int32), axis=0)
    tl.store(CNT + row, count)


def _indices_torch(mask, values=None):
    """Compact each row of ``mask`` to its selected entries of ``values`` (default: the column
    indices), ascending by column."""
    NB = mask.shape[-1]
    cnt = mask.sum(-1, dtype=torch.int32)
    pos = (mask.cumsum(-1) - 1).masked_fill(~mask, NB)  # unselected -> spill column NB
    idx = torch.zeros(*mask.shape[:-1], NB + 1, dtype=torch.int32, device=mask.device)
    if values is None:
        values = torch.arange(NB, dtype=torch.int32, device=mask.device).expand_as(mask)
    idx.scatter_(-1, pos.long(), values.to(torch.int32))
    return idx[..., :NB].contiguous(), cnt


def _pair_rows_torch(m):
    """``[..., NB, NB]`` causal-filtered mask -> the union of rows 2i, 2i+1 and the entry codes."""
    NB = m.shape[-1]
    if NB % 2:
        m = torch.cat([m, torch.zeros_like(m[..., :1, :])], dim=-2)
    a, b = m[..., 0::2, :], m[..., 1::2, :]
    cols = torch.arange(NB, dtype=torch.int32, device=m.device)
    return a | b, cols * 4 + a.int() + 2 * b.int()


def block_mask_to_indices(block_mask: torch.Tensor, causal: bool = True, transpose: bool = False,
                          pairs: bool = False):
    """Convert a bool block mask to per-row ascending index lists.

    Args:
        block_mask: bool ``[B, HQ, NB, NB]``.
        causal: drop entries above the diagonal (key block j > query block i).
        transpose: index the mask by key block instead: row j lists the query blocks i that
            attend key block j (what the dK/dV backward pass iterates over).
        pairs: one list per pair of query blocks (2i, 2i + 1): the key blocks either keeps,
            each as ``4 * j + flags`` (bit 0: block 2i keeps it, bit 1: block 2i + 1 does).

    Returns:
        ``(idx, cnt)``: int32 ``[B, HQ, R, NB]`` whose row r holds the ``cnt[..., r]``
        selected indices (or codes) in ascending order (entries past the count are
        unspecified), and int32 ``[B, HQ, R]`` counts; R = NB, or ceil(NB / 2) with ``pairs``.
    """
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise TypeError("block_mask must be a bool torch.Tensor, got "
                        f"{getattr(block_mask, 'dtype', type(block_mask).__name__)}")
    if block_mask.dim() != 4 or block_mask.shape[-1] != block_mask.shape[-2]:
        raise ValueError(f"block_mask must have shape [B, HQ, NB, NB], got {tuple(block_mask.shape)}")
    if pairs and transpose:
        raise ValueError("block_mask_to_indices: pairs=True lists query-block pairs; it has no transpose")
    B, HQ, NB, _ = block_mask.shape
    rows = (NB + 1) // 2 if pairs else NB
    if HAS_TRITON and (block_mask.is_cuda or interpreting()):
        m = block_mask.contiguous()
        idx = torch.empty(B, HQ, rows, NB, dtype=torch.int32, device=m.device)
        cnt = torch.empty(B, HQ, rows, dtype=torch.int32, device=m.device)
        if B * HQ * NB > 0:
            m8 = m.view(torch.uint8)
            _mask_to_indices_kernel[(B * HQ * rows,)](m8, idx, cnt, NB, rows, NB, 1, CAUSAL=causal,
                                                      TRANSPOSE=transpose, PAIRS=pairs,
                                                      BLOCK=min(1024, max(16, triton.next_power_of_2(NB))))
        return idx, cnt
    m = block_mask
    if causal:
        m = m & torch.ones(NB, NB, dtype=torch.bool, device=m.device).tril()
    if transpose:
        m = m.transpose(-1, -2)
    return _indices_torch(*_pair_rows_torch(m)) if pairs else _indices_torch(m)


def window_block_mask(NB: int, window=None, block_size: int = 64, device="cpu"):
    """Bool ``[NB, NB]``: the causal blocks (i >= j) that a sliding window of ``window`` tokens
    reaches, i.e. where some query of block i sees some key of block j (every causal block
    when ``window`` is None). The nearest pair of blocks j < i, query ``i * block_size`` and
    key ``(j + 1) * block_size - 1``, lies ``(i - j - 1) * block_size + 1`` tokens apart; the
    block is reached iff that distance is below ``window``. The diagonal is always reached."""
    i = torch.arange(NB, device=device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= (i[:, None] - i[None, :] - 1) * block_size + 1 < window
    return allowed


def causal_block_density(block_mask: torch.Tensor, per_head: bool = False, window=None, block_size: int = 64):
    """Kept share of the causal blocks (i >= j): the density this project reports.

    With a sliding ``window`` (tokens), the share of the blocks the window reaches
    (:func:`window_block_mask`): kept reached blocks / reached blocks, so that keeping every
    block the window allows is density 1. Returns a float over the whole mask, or with
    ``per_head`` a float tensor ``[B, HQ]``.
    """
    allowed = window_block_mask(block_mask.shape[-1], window, block_size, block_mask.device)
    kept = (block_mask & allowed).sum(dim=(-1, -2)).float() / allowed.sum().float()
    return kept if per_head else kept.mean().item()


def random_block_mask(B, HQ, NB, density, *, generator=None, device="cpu", keep_diagonal=True):
    """A random causal block mask keeping ``density`` of the causal blocks per (b, h) on average.

    The diagonal is always kept when ``keep_diagonal``; off-diagonal blocks are drawn so
    that the total kept share of causal blocks is ``density`` (benchmarks and tests).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    tril = torch.ones(NB, NB, dtype=torch.bool, device=device).tril()
    diag = torch.eye(NB, dtype=torch.bool, device=device)
    n_causal = NB * (NB + 1) / 2
    n_off = n_causal - NB
    want_off = max(0.0, density * n_causal - (NB if keep_diagonal else 0))
    p_off = 0.0 if n_off == 0 else min(1.0, want_off / n_off)
    r = torch.rand(B, HQ, NB, NB, generator=generator, device=device)
    m = (r < p_off) & tril & ~diag
    if keep_diagonal:
        m = m | diag
    return m
