"""Block-sparse FlashAttention: forward, backward, and the dense variant that also emits the
max-pooled attention map (SeerAttention's distillation ground truth).

Layout: q ``[B, HQ, T, D]``, k/v ``[B, H, T, D]`` with ``HQ % H == 0`` (GQA is resolved
inside the kernels through ``hq // (HQ // H)``; K/V are never repeated in memory).

Structure (one file per op): ``@triton.jit`` kernels -> launchers (allocation, grid,
strides) -> ``torch.autograd.Function`` -> public functions. The public functions dispatch
to the torch references (``reference.py``) on CPU.

Kernel design. A forward program owns ``BLOCK_M`` query rows (one 64-row query block when
sparse) and walks the key blocks it must visit: with a mask, the row's ascending index
list; dense, all blocks up to the diagonal. Blocks strictly below the diagonal need no
masking and are processed ``BLOCK_N // 64`` at a time (gathered into one tile, so a
sparse row still feeds the tensor cores 128-wide tiles); the leftover single block and the
diagonal band come after, the latter with the causal mask. On Hopper, contiguous K/V tiles
(dense, or one block per sparse step) are loaded through tensor descriptors (TMA) at
head_dim 128 (``FWD_OPTIONS``); elsewhere by pointers. Scores live in the log2
domain (``qk_scale = sm_scale * log2(e)``) and the per-row log-sum-exp is stored for the
backward pass; rows that attend no key store ``+inf`` so that they contribute nothing
there. Programs start with the last query rows (under a causal mask the longest): the last
wave of the launch then holds short programs instead of the longest ones.

Pair programs (``FWD_OPTIONS["pair_rows"]``, off by default). A sparse program may instead own
two query blocks, 128 rows, and walk the union of their two lists (``block_mask_to_indices(...,
pairs=True)``: each entry carries which of the two keeps the key block); a key block only one
of them keeps is masked for the other's 64 rows. Where adjacent query blocks keep nearly the
same key blocks (a gate's vertical stripes, density 1.0) this is the dense kernel's 128-row
tile; where their lists are independent (random masks at density 0.1) the union is nearly twice
as long. The backward reads the pair forward's log-sum-exp like any other.

Pooling in the same pass. Each step also stores, per query row and key block, the row's
maximum score (or, for ``pool_op="sum"``, the log2 of its summed exp2 scores) to a float32
scratch ``[heads, NB, T]``; once the row's log-sum-exp is final, ``exp2(stat - lse)`` is that
row's block max (or mass) of the softmax probabilities, and the program reduces it over the
64 rows of each query block. The scores are computed once (a second walk over the key tiles
cost ~1.6x the attention); the scratch is 4 bytes per row and key block, launched a few heads
at a time above ``POOL_SCRATCH_BYTES``.

Long key-block lists (sparse dK/dV). A dK/dV program owns one key block and walks the query
blocks of every query head of its KV head that keep it. A block that nearly every query block
keeps (the sink block, which a gate's top-k picks in nearly every row) would be one program
walking ``GROUP * NB`` blocks while the average walks a few dozen; the whole launch then waits
for it. Such lists are cut into pieces of ``DKDV_SPLIT_BLOCKS`` or more entries, one program
each; the pieces of a block add their partial sums in a fixed order through a float32
scratch (so the result is the same every run), the last one stores.

Sliding window (``window``, the ``HAS_WINDOW`` flag). Index lists ascend, so a program's
key blocks come in three runs: wholly outside the window (skipped: a scalar load each), cut
by it (at most ``BLOCK_M // 64 + 1`` blocks, masked one at a time), then inside it (the
unmasked walk above). The dK/dV program sees the mirror image along its transposed lists:
inside, cut, outside. Pooling reduces only the key blocks the window reaches; the others
pool to zero.
"""
import torch

from .block_mask import block_mask_to_indices
from .kernel_utils import (TensorDescriptor, check_attention_inputs, check_backend, check_block_mask, check_seq_bounds,
                           check_window, desc_rows, new_output, num_blocks, tl, tma_capable, triton, use_triton)
from .reference import attn_with_pooling_ref, block_sparse_attn_ref

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _program_heads(pid_bh, HQ, GROUP: tl.constexpr):
    """Batch, query head and KV head of the (batch, query head) pair ``pid_bh``."""
    b = pid_bh // HQ
    hq = pid_bh % HQ
    return b, hq, hq // GROUP


@triton.jit
def _head_base(X, b, head, s_b, s_h):
    """Row 0 of ``head`` of batch ``b`` in a ``[B, H, T, D]`` tensor (64-bit offsets)."""
    return X + b.to(tl.int64) * s_b + head.to(tl.int64) * s_h


@triton.jit
def _load_rows(base, s_t, offs, offs_d, T):
    """Rows ``offs`` of one head (from :func:`_head_base`); rows past T read as zeros."""
    return tl.load(base + offs[:, None] * s_t + offs_d[None, :], mask=(offs < T)[:, None], other=0.0)


@triton.jit
def _store_rows(base, s_t, offs, offs_d, val, T):
    """Store ``val`` (cast to the tensor's dtype) as rows ``offs`` of one head, rows past T left out."""
    tl.store(base + offs[:, None] * s_t + offs_d[None, :], val.to(base.dtype.element_ty), mask=(offs < T)[:, None])


@triton.jit
def _seq_bounds(BOUNDS, b, T, HAS_BOUNDS: tl.constexpr):
    """The keys batch row ``b`` may attend, ``[kv_lo, kv_hi)``: its ``seq_bounds`` or all T."""
    if HAS_BOUNDS:
        kv_lo = tl.load(BOUNDS + 2 * b)
        kv_hi = tl.load(BOUNDS + 2 * b + 1)
    else:
        kv_lo = 0
        kv_hi = T
    return kv_lo, kv_hi


@triton.jit
def _tile_offsets(idx_row, p, BLOCK: tl.constexpr, BS: tl.constexpr, SPARSE: tl.constexpr):
    """Token offsets of the tile made of the BLOCK // BS blocks at list positions p, p+1...
    (A one-block tile's index read as a broadcast vector load, for the software pipeliner to
    prefetch, was 3% slower on an H200: docs/experiments/kernel_changes_h200.md.)"""
    r = tl.arange(0, BLOCK)
    if SPARSE:
        if BLOCK == BS:
            offs = tl.load(idx_row + p) * BS + r
        elif BLOCK == 2 * BS:  # two scalar loads instead of a BLOCK-wide gather
            b0 = tl.load(idx_row + p)
            b1 = tl.load(idx_row + p + 1)
            offs = tl.where(r < BS, b0 * BS + r, b1 * BS + (r - BS))
        else:
            offs = tl.load(idx_row + p + r // BS) * BS + r % BS
    else:
        offs = p * BS + r
    return offs


@triton.jit
def _tile_start(idx_row, p, BS: tl.constexpr, SPARSE: tl.constexpr, TMA: tl.constexpr):
    """First token of the tile at list position ``p`` (read only by TMA loads, whose tiles
    are one block or, dense, contiguous blocks)."""
    n0 = p * BS
    if TMA:
        if SPARSE:
            n0 = tl.load(idx_row + p) * BS
    return n0


@triton.jit
def _query_block_list(IDX, CNT, pid_bh, qb0, NB, SPARSE: tl.constexpr, CAUSAL: tl.constexpr):
    """The key blocks query block ``qb0`` visits: its index-list row (sparse), how many
    blocks lie strictly below the diagonal band, and whether its diagonal block is kept."""
    idx_row = IDX
    has_diag = qb0 < 0  # a (false) tensor in both variants: one return type
    if SPARSE:
        row = pid_bh * NB + qb0
        idx_row = IDX + row.to(tl.int64) * NB
        cnt = tl.load(CNT + row)
        n_off = cnt
        if CAUSAL:  # lists are causal-filtered and ascending: the diagonal, if kept, is last
            last = tl.load(idx_row + tl.maximum(cnt - 1, 0))
            has_diag = (cnt > 0) & (last == qb0)
            n_off = cnt - has_diag.to(tl.int32)
    else:
        if CAUSAL:
            n_off = qb0
        else:
            n_off = NB
    return idx_row, n_off, has_diag


@triton.jit
def _pair_list(IDX, CNT, pid_bh, pid_m, NB, qb0, CAUSAL: tl.constexpr):
    """The union list of query blocks ``qb0`` and ``qb0 + 1`` (``block_mask_to_indices(...,
    pairs=True)``: codes ``4 * j + flags``): its row, its length, and how many entries lie
    strictly below both diagonals (causal: the last one or two entries are blocks qb0, qb0 + 1)."""
    row = pid_bh * ((NB + 1) // 2) + pid_m
    idx_row = IDX + row.to(tl.int64) * NB
    cnt = tl.load(CNT + row)
    n_off = cnt
    if CAUSAL:
        last = tl.load(idx_row + tl.maximum(cnt - 1, 0)) >> 2
        prev = tl.load(idx_row + tl.maximum(cnt - 2, 0)) >> 2
        n_off = cnt - ((cnt > 0) & (last >= qb0)).to(tl.int32) - ((cnt > 1) & (prev >= qb0)).to(tl.int32)
    return idx_row, cnt, n_off


@triton.jit
def _pair_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, kd, vd, b, h, e, half, offs_m, offs_d, qk_scale, T,
               kv_lo, kv_hi, CAUSAL_MASK: tl.constexpr, KV_MASK: tl.constexpr, PREC: tl.constexpr,
               BS: tl.constexpr, TMA: tl.constexpr):
    """One key block of a pair program: entry ``e`` = 4 * block + flags; the rows of the half
    whose query block did not keep it are masked."""
    blk = e >> 2
    rows_ok = tl.where(half, (e & 1) != 0, (e & 2) != 0)
    return _fwd_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, kd, vd, b, h, blk * BS, offs_m,
                     blk * BS + tl.arange(0, BS), offs_d, qk_scale, T, kv_lo, kv_hi, 0, offs_m, blk, 0,
                     CAUSAL_MASK, KV_MASK, False, PREC, False, False, BS, TMA, rows_ok, True)


@triton.jit
def _list_entry(idx_row, p, n, stop, SPARSE: tl.constexpr):
    """Key (or query) block at list position ``p`` (dense: ``p`` itself); ``stop`` when ``p >= n``."""
    if SPARSE:
        e = tl.load(idx_row + p, mask=p < n, other=0)
    else:
        e = p
    return tl.where(p < n, e, stop)


@triton.jit
def _window_key_blocks(m0, BLOCK_M: tl.constexpr, BS: tl.constexpr, WIN):
    """For query rows ``m0 .. m0 + BLOCK_M - 1`` and a sliding window of ``WIN`` tokens: the
    first key block any row sees (blocks before it are skipped) and the first key block
    every row sees whole (blocks from ``lo`` up to it are masked)."""
    lo = tl.maximum(m0 - WIN + 1, 0) // BS
    full = (tl.maximum(m0 + BLOCK_M - WIN, 0) + BS - 1) // BS
    return lo, full


@triton.jit
def _load_kv(k_base, v_base, s_kt, s_vt, offs_n, offs_d, T, BOUNDARY: tl.constexpr):
    """K and V rows ``offs_n``; only boundary tiles (which may run past T) are masked."""
    if BOUNDARY:
        kin = (offs_n < T)[:, None]
        k = tl.load(k_base + offs_n[:, None] * s_kt + offs_d[None, :], mask=kin, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vt + offs_d[None, :], mask=kin, other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * s_kt + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * s_vt + offs_d[None, :])
    return k, v


@triton.jit
def _load_kv_tile(k_base, v_base, s_kt, s_vt, kd, vd, b, h, n0, offs_n, offs_d, T, BOUNDARY: tl.constexpr,
                  TMA: tl.constexpr):
    """The K and V tile of keys ``offs_n`` (contiguous from ``n0`` when ``TMA``): through the
    tensor descriptors ``kd``/``vd`` or by pointers."""
    if TMA:
        k = desc_rows(kd, b, h, n0, offs_n.shape[0], offs_d.shape[0])
        v = desc_rows(vd, b, h, n0, offs_n.shape[0], offs_d.shape[0])
    else:
        k, v = _load_kv(k_base, v_base, s_kt, s_vt, offs_n, offs_d, T, BOUNDARY)
    return k, v


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, kd, vd, b, h, n0, offs_m, offs_n, offs_d, qk_scale, T,
              kv_lo, kv_hi, win, scr_rows, blk0, scr_stride, CAUSAL_MASK: tl.constexpr, KV_MASK: tl.constexpr,
              WIN_MASK: tl.constexpr, PREC: tl.constexpr, STATS: tl.constexpr, STAT_SUM: tl.constexpr,
              BS: tl.constexpr, TMA: tl.constexpr, rows_ok=None, ROWS_MASK: tl.constexpr = False):
    k, v = _load_kv_tile(k_base, v_base, s_kt, s_vt, kd, vd, b, h, n0, offs_n, offs_d, T, CAUSAL_MASK or KV_MASK,
                         TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if CAUSAL_MASK:
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
    if KV_MASK:
        qk = tl.where(((offs_n >= kv_lo) & (offs_n < kv_hi))[None, :], qk, float("-inf"))
    if WIN_MASK:
        qk = tl.where(offs_n[None, :] > offs_m[:, None] - win, qk, float("-inf"))
    if ROWS_MASK:  # pair programs: the rows whose query block did not keep this key block
        qk = tl.where(rows_ok[:, None], qk, float("-inf"))
    NS: tl.constexpr = offs_n.shape[0] // BS
    if STATS and not STAT_SUM:  # per row and key block: its max score, and the row's max from those
        stat = tl.max(tl.reshape(qk, (offs_m.shape[0], NS, BS)), axis=2)
        m_new = tl.maximum(m_i, tl.max(stat, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    if CAUSAL_MASK or KV_MASK or WIN_MASK or ROWS_MASK:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row so far
    else:
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    if STATS:  # per row and key block of the tile: its max score (above), or the log2 of its exp2-sum
        if STAT_SUM:
            stat = m_use[:, None] + tl.math.log2(tl.sum(tl.reshape(p, (offs_m.shape[0], NS, BS)), axis=2))
        tl.store(scr_rows[:, None] + (blk0 + tl.arange(0, NS))[None, :].to(tl.int64) * scr_stride, stat)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, POOL, SCR, IDX, CNT, BOUNDS, KD, VD, KD1, VD1, qk_scale,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
    HQ, T, NB, WIN, BH0, T_PAD,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BS: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, POOLING: tl.constexpr,
    POOL_SUM: tl.constexpr, HAS_BOUNDS: tl.constexpr, EVEN_T: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr, PAIR: tl.constexpr = False,
):
    # the last query rows (the most key blocks under a causal mask) start first: the GPU's
    # last wave then holds the shortest programs
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = BH0 + tl.program_id(1)  # pooling launches a few heads at a time (its scratch)
    b, hq, h = _program_heads(pid_bh, HQ, GROUP)
    RB: tl.constexpr = BLOCK_M // BS  # query blocks per program
    NSUB: tl.constexpr = BLOCK_N // BS  # key blocks per full tile
    MASK_KV: tl.constexpr = HAS_BOUNDS or ((not CAUSAL) and (not EVEN_T))
    m0 = pid_m * BLOCK_M
    qb0 = pid_m * RB
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = _head_base(K, b, h, s_kb, s_kh)
    v_base = _head_base(V, b, h, s_vb, s_vh)
    q = _load_rows(_head_base(Q, b, hq, s_qb, s_qh), s_qt, offs_m, offs_d, T)
    kv_lo, kv_hi = _seq_bounds(BOUNDS, b, T, HAS_BOUNDS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    win_lo, win_full = _window_key_blocks(m0, BLOCK_M, BS, WIN)
    # pooling: row r's statistic for key block j goes to SCR[program's head, j, r]
    scr_rows = SCR + tl.program_id(1).to(tl.int64) * NB * T_PAD + offs_m

    if PAIR:  # query blocks qb0, qb0 + 1 over the union of their lists, each half masked apart
        idx_row, cnt, n_off = _pair_list(IDX, CNT, pid_bh, pid_m, NB, qb0, CAUSAL)
        half = tl.arange(0, BLOCK_M) < BS
        for p in range(0, n_off):
            acc, l_i, m_i = _pair_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h,
                                       tl.load(idx_row + p), half, offs_m, offs_d, qk_scale, T, kv_lo, kv_hi,
                                       False, MASK_KV, PREC, BS, TMA)
        for p in range(n_off, cnt):  # causal: blocks qb0 and qb0 + 1, the causal mask inside
            acc, l_i, m_i = _pair_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h,
                                       tl.load(idx_row + p), half, offs_m, offs_d, qk_scale, T, kv_lo, kv_hi,
                                       True, MASK_KV, PREC, BS, TMA)
    else:
        idx_row, n_off, has_diag = _query_block_list(IDX, CNT, pid_bh, qb0, NB, SPARSE, CAUSAL)
        p0 = qb0 * 0  # first list position of the unmasked walk
        if HAS_WINDOW:
            # lists ascend: blocks wholly outside the window (skipped), then those the window
            # cuts (masked, one at a time), then the unmasked ones
            if not SPARSE:
                p0 = tl.minimum(win_lo, n_off)
            nxt = _list_entry(idx_row, p0, n_off, win_full, SPARSE)
            while nxt < win_full:
                if nxt >= win_lo:
                    offs_n = nxt * BS + tl.arange(0, BS)
                    acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h, nxt * BS,
                                              offs_m, offs_n, offs_d, qk_scale, T, kv_lo, kv_hi, WIN, scr_rows, nxt,
                                              T_PAD, False, MASK_KV, True, PREC, POOLING, POOL_SUM, BS, TMA)
                p0 += 1
                nxt = _list_entry(idx_row, p0, n_off, win_full, SPARSE)
        # blocks strictly below the diagonal band: no causal mask, NSUB blocks per tile
        n_full = (n_off - p0) // NSUB
        for t in range(0, n_full):
            offs_n = _tile_offsets(idx_row, p0 + t * NSUB, BLOCK_N, BS, SPARSE)
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, KD, VD, b, h,
                                      _tile_start(idx_row, p0 + t * NSUB, BS, SPARSE, TMA), offs_m, offs_n, offs_d,
                                      qk_scale, T, kv_lo, kv_hi, WIN, scr_rows, p0 + t * NSUB, T_PAD, False, MASK_KV,
                                      False, PREC, POOLING, POOL_SUM, BS, TMA)
        for p in range(p0 + n_full * NSUB, n_off):
            offs_n = _tile_offsets(idx_row, p, BS, BS, SPARSE)
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h,
                                      _tile_start(idx_row, p, BS, SPARSE, TMA), offs_m, offs_n, offs_d, qk_scale, T,
                                      kv_lo, kv_hi, WIN, scr_rows, p, T_PAD, False, MASK_KV, False, PREC, POOLING,
                                      POOL_SUM, BS, TMA)
        # the diagonal band, causal (and window) mask inside
        if CAUSAL:
            if SPARSE:
                if has_diag:
                    offs_n = qb0 * BS + tl.arange(0, BS)
                    acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h, qb0 * BS,
                                              offs_m, offs_n, offs_d, qk_scale, T, kv_lo, kv_hi, WIN, scr_rows, qb0,
                                              T_PAD, True, MASK_KV, HAS_WINDOW, PREC, POOLING, POOL_SUM, BS, TMA)
            else:
                for jb in range(qb0, tl.minimum(qb0 + RB, NB)):
                    offs_n = jb * BS + tl.arange(0, BS)
                    acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h, jb * BS,
                                              offs_m, offs_n, offs_d, qk_scale, T, kv_lo, kv_hi, WIN, scr_rows, jb,
                                              T_PAD, True, MASK_KV, HAS_WINDOW, PREC, POOLING, POOL_SUM, BS, TMA)

    row_ok = offs_m < T
    if HAS_BOUNDS:
        row_ok = row_ok & (offs_m >= kv_lo) & (offs_m < kv_hi)
    empty = (l_i == 0.0) | (~row_ok)  # rows that attend no key output zeros
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    _store_rows(_head_base(O, b, hq, s_ob, s_oh), s_ot, offs_m, offs_d, out, T)
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)

    if POOLING:
        # With the final log-sum-exp known, exp2(stat - lse) turns each row's statistic into
        # the block max (or mass) of its softmax probabilities; reduce over the rows of each
        # query block. Only the blocks this program visited were written (the others pool to 0).
        pool_base = POOL + pid_bh.to(tl.int64) * NB * NB
        rows_b = qb0 + tl.arange(0, RB)
        if CAUSAL:
            c_hi = tl.minimum(qb0 + RB, NB)
        else:
            c_hi = NB
        if HAS_WINDOW:
            c_lo = win_lo
        else:
            c_lo = 0
        tl.debug_barrier()  # the statistics were stored by other threads of this program
        for c0 in range(0, NB, BS):
            cols = c0 + tl.arange(0, BS)
            seen = (cols >= c_lo) & (cols < c_hi)
            st = tl.load(scr_rows[:, None] + cols[None, :].to(tl.int64) * T_PAD, mask=seen[None, :],
                         other=float("-inf"))
            s = st - lse[:, None]
            if POOL_SUM:
                blk = tl.sum(tl.reshape(tl.math.exp2(s), (RB, BS, BS)), axis=1)
            else:
                blk = tl.math.exp2(tl.max(tl.reshape(s, (RB, BS, BS)), axis=1))
            tl.store(pool_base + rows_b[:, None] * NB + cols[None, :], blk,
                     mask=(rows_b < NB)[:, None] & (cols < NB)[None, :])


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, s_ob, s_oh, s_ot, s_db, s_dh, s_dt, HQ, T,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hq, _ = _program_heads(pid_bh, HQ, 1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(_head_base(O, b, hq, s_ob, s_oh), s_ot, offs_m, offs_d, T)
    do = _load_rows(_head_base(DO, b, hq, s_db, s_dh), s_dt, offs_m, offs_d, T)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, s_kt, s_vt, kd, vd, b, h, n0, offs_m, offs_n, offs_d,
                 qk_scale, T, kv_lo, kv_hi, win, CAUSAL_MASK: tl.constexpr, KV_MASK: tl.constexpr,
                 WIN_MASK: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    k, v = _load_kv_tile(k_base, v_base, s_kt, s_vt, kd, vd, b, h, n0, offs_n, offs_d, T, CAUSAL_MASK or KV_MASK,
                         TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if CAUSAL_MASK:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    if KV_MASK:
        p = tl.where(((offs_n >= kv_lo) & (offs_n < kv_hi))[None, :], p, 0.0)
    if WIN_MASK:
        p = tl.where(offs_n[None, :] > offs_m[:, None] - win, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, IDX, CNT, BOUNDS, KD, VD, KD1, VD1, qk_scale, sm_scale,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_gb, s_gh, s_gt,
    HQ, T, NB, WIN,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BS: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BOUNDS: tl.constexpr,
    EVEN_T: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first, as in the forward
    pid_bh = tl.program_id(1)
    b, hq, h = _program_heads(pid_bh, HQ, GROUP)
    RB: tl.constexpr = BLOCK_M // BS
    NSUB: tl.constexpr = BLOCK_N // BS
    MASK_KV: tl.constexpr = HAS_BOUNDS or ((not CAUSAL) and (not EVEN_T))
    qb0 = pid_m * RB
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(_head_base(Q, b, hq, s_qb, s_qh), s_qt, offs_m, offs_d, T)
    do = _load_rows(_head_base(DO, b, hq, s_db, s_dh), s_dt, offs_m, offs_d, T)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = _head_base(K, b, h, s_kb, s_kh)
    v_base = _head_base(V, b, h, s_vb, s_vh)
    kv_lo, kv_hi = _seq_bounds(BOUNDS, b, T, HAS_BOUNDS)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    idx_row, n_off, has_diag = _query_block_list(IDX, CNT, pid_bh, qb0, NB, SPARSE, CAUSAL)
    p0 = qb0 * 0
    if HAS_WINDOW:  # as in the forward: skip, then mask, the blocks the window excludes or cuts
        win_lo, win_full = _window_key_blocks(pid_m * BLOCK_M, BLOCK_M, BS, WIN)
        if not SPARSE:
            p0 = tl.minimum(win_lo, n_off)
        nxt = _list_entry(idx_row, p0, n_off, win_full, SPARSE)
        while nxt < win_full:
            if nxt >= win_lo:
                offs_n = nxt * BS + tl.arange(0, BS)
                dq = _bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h, nxt * BS,
                                  offs_m, offs_n, offs_d, qk_scale, T, kv_lo, kv_hi, WIN, False, MASK_KV, True, PREC,
                                  TMA)
            p0 += 1
            nxt = _list_entry(idx_row, p0, n_off, win_full, SPARSE)
    n_full = (n_off - p0) // NSUB
    for t in range(0, n_full):
        offs_n = _tile_offsets(idx_row, p0 + t * NSUB, BLOCK_N, BS, SPARSE)
        dq = _bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, s_kt, s_vt, KD, VD, b, h,
                          _tile_start(idx_row, p0 + t * NSUB, BS, SPARSE, TMA), offs_m, offs_n, offs_d, qk_scale, T,
                          kv_lo, kv_hi, WIN, False, MASK_KV, False, PREC, TMA)
    for p in range(p0 + n_full * NSUB, n_off):
        offs_n = _tile_offsets(idx_row, p, BS, BS, SPARSE)
        dq = _bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h,
                          _tile_start(idx_row, p, BS, SPARSE, TMA), offs_m, offs_n, offs_d, qk_scale, T,
                          kv_lo, kv_hi, WIN, False, MASK_KV, False, PREC, TMA)
    if CAUSAL:
        if SPARSE:
            if has_diag:
                offs_n = qb0 * BS + tl.arange(0, BS)
                dq = _bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h, qb0 * BS,
                                  offs_m, offs_n, offs_d, qk_scale, T, kv_lo, kv_hi, WIN, True, MASK_KV, HAS_WINDOW,
                                  PREC, TMA)
        else:
            for jb in range(qb0, tl.minimum(qb0 + RB, NB)):
                offs_n = jb * BS + tl.arange(0, BS)
                dq = _bwd_dq_step(dq, q, do, lse, delta, k_base, v_base, s_kt, s_vt, KD1, VD1, b, h, jb * BS,
                                  offs_m, offs_n, offs_d, qk_scale, T, kv_lo, kv_hi, WIN, True, MASK_KV, HAS_WINDOW,
                                  PREC, TMA)
    dq = dq * sm_scale
    _store_rows(_head_base(DQ, b, hq, s_gb, s_gh), s_gt, offs_m, offs_d, dq, T)


@triton.jit
def _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qt, s_dt, qd, dod, b, hq, m0, offs_m,
                   offs_n, offs_d, qk_scale, T, win, CAUSAL_MASK: tl.constexpr, ROW_MASK: tl.constexpr,
                   WIN_MASK: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    # the Q and dO tile of query rows ``offs_m`` (contiguous from ``m0`` when ``TMA``)
    if TMA:
        q = desc_rows(qd, b, hq, m0, offs_m.shape[0], offs_d.shape[0])
        do = desc_rows(dod, b, hq, m0, offs_m.shape[0], offs_d.shape[0])
    if CAUSAL_MASK or ROW_MASK:
        rin = offs_m < T
        if not TMA:
            q = tl.load(q_base + offs_m[:, None] * s_qt + offs_d[None, :], mask=rin[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_dt + offs_d[None, :], mask=rin[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rin, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=rin, other=0.0)
    else:
        if not TMA:
            q = tl.load(q_base + offs_m[:, None] * s_qt + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * s_dt + offs_d[None, :])
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    pT = tl.math.exp2(qkT - lse[None, :])
    if CAUSAL_MASK:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    if WIN_MASK:
        pT = tl.where(offs_m[None, :] - offs_n[:, None] < win, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, IDXT, CNTT, BOUNDS, SYNC, SDK, SDV, QD, DOD, QD1, DOD1, qk_scale, sm_scale,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
    s_kgb, s_kgh, s_kgt, s_vgb, s_vgh, s_vgt,
    HQ, H, T, NB, WIN, NSPLIT, CHUNK,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BS: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, HAS_BOUNDS: tl.constexpr,
    EVEN_T: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
):
    # one program: BLOCK_N keys of one KV head; loops over the GROUP query heads that share it.
    # Sparse: one key block, whose transposed lists (over the GROUP heads: W entries) may be
    # far longer than the average one (module docstring, "Long key-block lists"). Entries
    # [s * CHUNK, (s + 1) * CHUNK) go to split s of the column (programs past a column's
    # last split exit at once); the splits add their partial dK/dV in order s = 0, 1, ...
    # through a float32 scratch (the same sum every run), the last one stores. A split
    # waits only for the split launched just before it (the program ids run split-fastest).
    RK: tl.constexpr = BLOCK_N // BS  # key blocks per program
    MSUB: tl.constexpr = BLOCK_M // BS  # query blocks per full tile
    ROW_MASK: tl.constexpr = not EVEN_T
    if SPARSE:
        pid = tl.program_id(0)
        pid_bh = pid // (NB * NSPLIT)
        pid_n = (pid // NSPLIT) % NB
        split = pid % NSPLIT
        b = pid_bh // H
        h = pid_bh % H
        work = 0
        for g in range(0, GROUP):
            work += tl.load(CNTT + (b * HQ + h * GROUP + g) * NB + pid_n)
        n_split = tl.maximum(tl.cdiv(work, CHUNK), 1)
        if split >= n_split:
            return
        lo = split * CHUNK
        hi = lo + CHUNK
    else:
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        split = 0
        n_split = 1
        lo = 0
        hi = NB
    kb0 = pid_n * RK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_rows(_head_base(K, b, h, s_kb, s_kh), s_kt, offs_n, offs_d, T)
    v = _load_rows(_head_base(V, b, h, s_vb, s_vh), s_vt, offs_n, offs_d, T)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    kv_lo, kv_hi = _seq_bounds(BOUNDS, b, T, HAS_BOUNDS)
    kv_ok = (offs_n < T) & (offs_n >= kv_lo) & (offs_n < kv_hi)
    # sliding window: query blocks from q_cut on see some key of this program only in part
    # (masked); from q_end on, none (skipped)
    q_cut = (kb0 * BS + WIN) // BS
    q_end = (kb0 * BS + BLOCK_N - 1 + WIN + BS - 1) // BS

    seen = 0  # list entries of the previous heads (the split's range counts across heads)
    for g in range(0, GROUP):
        hq = h * GROUP + g
        bhq = b * HQ + hq
        q_base = _head_base(Q, b, hq, s_qb, s_qh)
        do_base = _head_base(DO, b, hq, s_db, s_dh)
        lse_base = LSE + bhq.to(tl.int64) * T
        delta_base = DELTA + bhq.to(tl.int64) * T
        idx_row = IDXT
        has_diag = False
        if SPARSE:
            row = bhq * NB + kb0
            idx_row = IDXT + row.to(tl.int64) * NB
            cnt = tl.load(CNTT + row)
            p0 = 0
            if CAUSAL:  # transposed lists are ascending: the diagonal, if kept, is first
                first = tl.load(idx_row)
                has_diag = (cnt > 0) & (first == kb0)
                p0 = has_diag.to(tl.int32)
            p1 = cnt
            # this split's share of the head's list: positions [a, z)
            a = tl.minimum(tl.maximum(lo - seen, 0), cnt)
            z = tl.minimum(tl.maximum(hi - seen, 0), cnt)
            seen += cnt
        else:
            if CAUSAL:
                p0 = tl.minimum(kb0 + RK, NB)
            else:
                p0 = 0
            p1 = NB
            a = 0
            z = NB
        if CAUSAL:
            if SPARSE:
                if has_diag & (a == 0) & (z > 0):
                    offs_m = kb0 * BS + tl.arange(0, BS)
                    dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qt, s_dt,
                                            QD1, DOD1, b, hq, kb0 * BS, offs_m, offs_n, offs_d, qk_scale, T, WIN,
                                            True, ROW_MASK, HAS_WINDOW, PREC, TMA)
            else:
                for ib in range(kb0, tl.minimum(kb0 + RK, NB)):
                    offs_m = ib * BS + tl.arange(0, BS)
                    dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qt, s_dt,
                                            QD1, DOD1, b, hq, ib * BS, offs_m, offs_n, offs_d, qk_scale, T, WIN,
                                            True, ROW_MASK, HAS_WINDOW, PREC, TMA)
        p_end = p1  # end of the unmasked walk
        if HAS_WINDOW:
            # transposed lists ascend: unmasked query blocks, then those the window cuts,
            # then those wholly outside it
            if SPARSE:
                prv = _list_entry(idx_row, tl.where(p_end > p0, p_end - 1, p1), p1, q_cut - 1, SPARSE)
                while prv >= q_cut:
                    p_end -= 1
                    prv = _list_entry(idx_row, tl.where(p_end > p0, p_end - 1, p1), p1, q_cut - 1, SPARSE)
            else:
                p1 = tl.maximum(tl.minimum(p1, q_end), p0)
                p_end = tl.minimum(tl.maximum(q_cut, p0), p1)
        w0 = tl.maximum(p0, a)  # the unmasked walk within this split's share
        w1 = tl.maximum(tl.minimum(p_end, z), w0)
        n_full = (w1 - w0) // MSUB
        for t in range(0, n_full):
            offs_m = _tile_offsets(idx_row, w0 + t * MSUB, BLOCK_M, BS, SPARSE)
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qt, s_dt,
                                    QD, DOD, b, hq, _tile_start(idx_row, w0 + t * MSUB, BS, SPARSE, TMA), offs_m,
                                    offs_n, offs_d, qk_scale, T, WIN, False, ROW_MASK, False, PREC, TMA)
        for p in range(w0 + n_full * MSUB, w1):
            offs_m = _tile_offsets(idx_row, p, BS, BS, SPARSE)
            dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qt, s_dt,
                                    QD1, DOD1, b, hq, _tile_start(idx_row, p, BS, SPARSE, TMA), offs_m, offs_n,
                                    offs_d, qk_scale, T, WIN, False, ROW_MASK, False, PREC, TMA)
        if HAS_WINDOW:
            for p in range(tl.maximum(p_end, a), tl.minimum(p1, z)):
                ib = _list_entry(idx_row, p, p1, q_end, SPARSE)
                if ib < q_end:
                    offs_m = ib * BS + tl.arange(0, BS)
                    dk, dv = _bwd_dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qt, s_dt,
                                            QD1, DOD1, b, hq, ib * BS, offs_m, offs_n, offs_d, qk_scale, T, WIN,
                                            False, ROW_MASK, True, PREC, TMA)

    if SPARSE:
        if n_split > 1:  # add the earlier splits' sum, in split order
            col = pid_bh * NB + pid_n
            scr = col.to(tl.int64) * BLOCK_N * HEAD_DIM + tl.arange(0, BLOCK_N)[:, None] * HEAD_DIM + offs_d[None, :]
            if split > 0:
                turn = tl.atomic_add(SYNC + col, 0, sem="acquire")
                while turn < split:
                    turn = tl.atomic_add(SYNC + col, 0, sem="acquire")
                dk += tl.load(SDK + scr, cache_modifier=".cg")
                dv += tl.load(SDV + scr, cache_modifier=".cg")
            if split < n_split - 1:
                tl.store(SDK + scr, dk, cache_modifier=".cg")
                tl.store(SDV + scr, dv, cache_modifier=".cg")
                tl.debug_barrier()  # every thread's partial is written before the next split's turn
                tl.atomic_add(SYNC + col, 1, sem="release")
    if split == n_split - 1:
        # padded keys receive no gradient (their probabilities were masked in the forward)
        dk = tl.where(kv_ok[:, None], dk * sm_scale, 0.0)
        dv = tl.where(kv_ok[:, None], dv, 0.0)
        _store_rows(_head_base(DK, b, h, s_kgb, s_kgh), s_kgt, offs_n, offs_d, dk, T)
        _store_rows(_head_base(DV, b, h, s_vgb, s_vgh), s_vgt, offs_n, offs_d, dv, T)


# ----------------------------------------------------------------------------- launchers

#: Per-kernel launch configurations ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` keyed by
#: ``(kernel, sparse, head_dim)``; benchmarks may override entries to tune.
CONFIG_OVERRIDES: dict = {}

#: Sparse dK/dV: a key block's transposed lists (all query heads of its KV head) are cut
#: into pieces of at least this many entries, at most ``DKDV_MAX_SPLITS`` of them, each its
#: own program (module docstring, "Long key-block lists").
DKDV_SPLIT_BLOCKS = 64
DKDV_MAX_SPLITS = 8

#: Forward-kernel options. ``tma``: load K/V tiles through tensor descriptors (Hopper's TMA)
#: where the GPU and the tensors allow it: True, False or "auto" (head_dim >= 128). On an H200
#: (docs/experiments/tma_variants.md) TMA took the d128 sparse forward to 0.84-0.89x and the
#: dense one to 0.89-0.91x of pointer loads at 8k-128k; at head_dim 64 it gained nothing and
#: the descriptors' host work showed at 8k.
#: ``pair_rows``: sparse programs of 128 query rows, two 64-row query blocks over the union of
#: their key-block lists with each half's rows masked where its block did not keep the key
#: block (``block_mask_to_indices(..., pairs=True)``): the dense kernel's 128-row tiles where
#: adjacent rows' lists overlap, twice the work per block where they do not. True or False
#: (no windows, no pooling, 64-token blocks; the rows path serves the rest). Off until measured.
FWD_OPTIONS = {"tma": "auto", "pair_rows": False}

#: Backward-kernel options. ``tma``: as in the forward, for the dQ kernel's K/V tiles and the
#: dK/dV kernel's Q/dO tiles (the vectors beside them, log-sum-exp and delta, keep pointer
#: loads). Off by default: on an H200 (docs/experiments/tma_variants.md) the kernels gained
#: nothing dense and 3-4% sparse at 32k, and the host-bound backward at 8k and density 0.1
#: took 0.85 ms against 0.62 with pointer loads in one of two runs.
BWD_OPTIONS = {"tma": False}

#: Most bytes of the pooling pass's float32 scratch (``NB x T`` per head); above it the
#: heads are launched a few at a time. At 128k tokens one head needs 1 GiB.
POOL_SCRATCH_BYTES = 4 << 30


def _config(kernel, sparse, head_dim, on_gpu, dtype=torch.bfloat16, tma=False):
    key = (kernel, sparse, head_dim)
    if key in CONFIG_OVERRIDES:
        return CONFIG_OVERRIDES[key]
    if kernel == "fwd_pair":  # two 64-row query blocks per program, one key block per step
        if not on_gpu:
            return (128, 64, 4, 1)
        return (128, 64, 8, 2 if dtype == torch.float32 else (4 if tma else 3))
    if on_gpu and dtype == torch.float32:  # 4-byte tiles: the 16-bit configs overflow shared memory
        return (64, 64, 4, 2)
    if not on_gpu:  # interpreter: small tiles, but still exercising gathered multi-block tiles
        return {"fwd": (64 if sparse else 128, 128, 4, 1), "dq": (64 if sparse else 128, 128, 4, 1),
                "dkdv": (128, 64 if sparse else 128, 4, 1)}[kernel]
    # Measured on an H100 (eval/bench_kernels.py --tune, bf16, d=128): sparse rows run best
    # one 64-key block per step; gathered 128-key tiles were 35% slower. Sparse dK/dV
    # (H200, docs/experiments/d64_training_kernels.py): one-block query tiles and 4 warps
    # halve its time at d128 (32 / 8 heads, 32k, random masks: the backward at density 0.1
    # 11.5 -> 5.9 ms) and at d64 (SmolLM2's fine-tuning masks); at d <= 64 3 stages help the
    # forward (0.377 -> 0.356 ms).
    # With K/V through tensor descriptors (TMA) the sparse forward at d128 runs best with 5
    # stages (H200, docs/experiments/tma_variants.py: 0.84-0.88x of 4 stages at 32k / 128k).
    if kernel == "fwd":
        if sparse:
            return (64, 64, 4, 3 if head_dim <= 64 else (5 if tma else 4))
        return (128, 128, 8, 3)
    # Dense backward at d128 (H200, docs/experiments/tma_variants.py --backward, 32k): dQ
    # 128x64 with 3 stages (24.1 -> 18.9 ms), dK/dV in 64-row query tiles over 128 keys
    # (41.4 -> 34.2 ms); the whole backward 65.7 -> 53.5 ms. With TMA tiles sparse dK/dV
    # runs best with 3 stages (0.97x).
    wide = head_dim >= 128
    if kernel == "dq":
        return (64, 64, 4, 3) if sparse else (128, 64, 8, 3 if wide else 2)
    if sparse:
        return (64, 64, 4, 3 if tma else 2)
    return (64, 128, 8, 3) if wide else (128, 128, 8, 2)


def _tma_ok(options, *tensors):
    """Whether tiles of ``tensors`` may be loaded through tensor descriptors: asked for
    (``options["tma"]``, ``FWD_OPTIONS`` or ``BWD_OPTIONS``), a Hopper-or-newer GPU or the
    interpreter, 16-bit tensors whose base and outer strides are 16-byte aligned (TMA's rules)."""
    want = options["tma"]
    if not (isinstance(want, bool) or want == "auto"):  # 1 == True: a plain `in` lets 0 / 1 through
        name = "FWD_OPTIONS" if options is FWD_OPTIONS else "BWD_OPTIONS"
        raise ValueError(f"{name}['tma'] must be True, False or 'auto', got {want!r}")
    if want == "auto":
        want = tensors[0].shape[-1] >= 128
    return bool(want) and tma_capable(*tensors)


def _pair_rows(block_mask, block_size, pooling, window):
    """Whether a sparse forward runs pair programs (``FWD_OPTIONS["pair_rows"]``)."""
    want = FWD_OPTIONS["pair_rows"]
    if not isinstance(want, bool):
        raise ValueError(f"FWD_OPTIONS['pair_rows'] must be True or False, got {want!r}")
    return want and block_mask is not None and block_size == 64 and not pooling and window is None


def _row_descriptors(tensors, rows, one_block):
    """Tensor descriptors of each ``[B, H, T, D]`` tensor whose loads return ``rows``
    consecutive rows of one head, then those returning ``one_block`` rows (the same
    descriptors where the two agree)."""
    def build(n):
        return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, n, t.shape[-1]]) for t in tensors]
    tiles = build(rows)
    return tiles + (tiles if one_block == rows else build(one_block))


def _launch_tiles(kernel, options, sparse, q, tensors, block_size, walked):
    """One launch's ``(BLOCK_M, BLOCK_N, warps, stages)`` from :func:`_config`, whether its
    tiles of ``tensors`` load through tensor descriptors (``options`` and :func:`_tma_ok`), and
    the four tile arguments: descriptors of ``tensors`` at the walked tile's rows and at one
    block's, or the tensors themselves for pointer loads. ``walked``: 1 when the kernel walks
    key tiles (BLOCK_N), 0 for query tiles (BLOCK_M). TMA tiles are one block or, dense,
    contiguous blocks: a sparse tile of several blocks is a gather and keeps pointer loads."""
    tma = _tma_ok(options, *tensors)
    cfg = _config(kernel, sparse, q.shape[-1], q.is_cuda, q.dtype, tma)
    tma = tma and (not sparse or cfg[walked] == block_size)
    return cfg, tma, (_row_descriptors(tensors, cfg[walked], block_size) if tma else tuple(tensors) * 2)


def _bht_strides(*tensors):
    """The batch, head and token strides of each ``[B, H, T, D]`` tensor, in order: the
    launchers' shared argument list (every kernel takes its tensors' strides so)."""
    return [t.stride(i) for t in tensors for i in range(3)]


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _attn_fwd(q, k, v, idx, cnt, bounds, causal, sm_scale, block_size, pooling, pool_op="max", window=None,
              pairs=False):
    """``pairs``: ``idx``/``cnt`` are pair lists (``block_mask_to_indices(..., pairs=True)``)."""
    B, HQ, T, D = q.shape
    H = k.shape[1]
    NB = num_blocks(T, block_size)
    sparse = idx is not None
    (BLOCK_M, BLOCK_N, warps, stages), tma, (kd, vd, kd1, vd1) = _launch_tiles(
        "fwd_pair" if pairs else "fwd", FWD_OPTIONS, sparse, q, (k, v), block_size, 1)
    assert BLOCK_M % block_size == 0 and BLOCK_N % block_size == 0
    assert not sparse or BLOCK_M == (2 if pairs else 1) * block_size, (BLOCK_M, pairs)
    assert not pairs or (sparse and BLOCK_N == block_size and not pooling and window is None)
    o = new_output((B, HQ, T, D), q.dtype, q.device)
    lse = new_output((B, HQ, T), torch.float32, q.device)
    pool = new_output((B, HQ, NB, NB), torch.float32, q.device) if pooling else lse
    dummy = lse
    n_m = triton.cdiv(T, BLOCK_M)
    heads = B * HQ  # (batch, head) pairs per launch: all, or as many as the pooling scratch allows
    scratch = dummy
    if pooling:  # float32 [heads, NB, n_m * BLOCK_M]: every row's statistic per key block
        per_head = NB * n_m * BLOCK_M * 4
        heads = max(1, min(B * HQ, POOL_SCRATCH_BYTES // per_head))
        scratch = new_output((heads, NB, n_m * BLOCK_M), torch.float32, q.device)
    for bh0 in range(0, B * HQ, heads):
        _attn_fwd_kernel[(n_m, min(heads, B * HQ - bh0))](
            q, k, v, o, lse, pool, scratch, idx if sparse else dummy, cnt if sparse else dummy,
            bounds if bounds is not None else dummy, kd, vd, kd1, vd1, sm_scale * _LOG2E,
            *_bht_strides(q, k, v, o),
            HQ, T, NB, window or 0, bh0, n_m * BLOCK_M,
            GROUP=HQ // H, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BS=block_size, SPARSE=sparse,
            CAUSAL=causal, POOLING=pooling, POOL_SUM=pool_op == "sum", HAS_BOUNDS=bounds is not None,
            EVEN_T=T % block_size == 0, HAS_WINDOW=window is not None, PREC=_prec(q.dtype), TMA=tma, PAIR=pairs,
            num_warps=warps, num_stages=stages,
        )
    if pooling:
        pool.div_(pool.sum(-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny))
    return o, lse, (pool if pooling else None)


def _attn_bwd(do, q, k, v, o, lse, block_mask, bounds, causal, sm_scale, block_size, window=None):
    B, HQ, T, D = q.shape
    H = k.shape[1]
    NB = num_blocks(T, block_size)
    sparse = block_mask is not None
    do = _last_dim_contiguous(do)
    delta = torch.empty(B, HQ, T, dtype=torch.float32, device=q.device)
    _bwd_preprocess_kernel[(triton.cdiv(T, 64), B * HQ)](
        o, do, delta, *_bht_strides(o, do), HQ, T,
        HEAD_DIM=D, BLOCK=64)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    dummy = delta
    b_arg = bounds if bounds is not None else dummy
    common = dict(GROUP=HQ // H, HEAD_DIM=D, BS=block_size, SPARSE=sparse, CAUSAL=causal,
                  HAS_BOUNDS=bounds is not None, EVEN_T=T % block_size == 0, HAS_WINDOW=window is not None,
                  PREC=_prec(q.dtype))
    if sparse:
        idx, cnt = block_mask_to_indices(block_mask, causal=causal)
    (BM, BN, warps, stages), tma, descs = _launch_tiles("dq", BWD_OPTIONS, sparse, q, (k, v), block_size, 1)
    _attn_bwd_dq_kernel[(triton.cdiv(T, BM), B * HQ)](
        q, k, v, do, dq, lse, delta, idx if sparse else dummy, cnt if sparse else dummy, b_arg, *descs,
        sm_scale * _LOG2E, sm_scale,
        *_bht_strides(q, k, v, do, dq),
        HQ, T, NB, window or 0, BLOCK_M=BM, BLOCK_N=BN, TMA=tma, num_warps=warps, num_stages=stages, **common)
    if sparse:
        del idx, cnt
        idx, cnt = block_mask_to_indices(block_mask, causal=causal, transpose=True)
    (BM, BN, warps, stages), tma, descs = _launch_tiles("dkdv", BWD_OPTIONS, sparse, q, (q, do), block_size, 0)
    sync = sdk = sdv = dummy
    n_split, chunk = 1, NB
    if sparse:  # a key block's lists hold up to GROUP * NB entries: split the long ones
        assert BN == block_size, f"sparse dK/dV programs own one key block (BLOCK_N {BN})"
        chunk = max(DKDV_SPLIT_BLOCKS, triton.cdiv((HQ // H) * NB, DKDV_MAX_SPLITS))
        n_split = triton.cdiv((HQ // H) * NB, chunk)
        if n_split > 1:
            sync = torch.zeros(B * H * NB, dtype=torch.int32, device=q.device)
            sdk = torch.empty(B * H * NB * BN, D, dtype=torch.float32, device=q.device)
            sdv = torch.empty_like(sdk)
        grid = (B * H * NB * n_split,)
    else:
        grid = (triton.cdiv(T, BN), B * H)
    _attn_bwd_dkdv_kernel[grid](
        q, k, v, do, dk, dv, lse, delta, idx if sparse else dummy, cnt if sparse else dummy, b_arg, sync, sdk, sdv,
        *descs, sm_scale * _LOG2E, sm_scale,
        *_bht_strides(q, k, v, do, dk, dv),
        HQ, H, T, NB, window or 0, n_split, chunk, BLOCK_M=BM, BLOCK_N=BN, TMA=tma, num_warps=warps,
        num_stages=stages, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd

def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class _AttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_mask, bounds, causal, sm_scale, block_size, pooling, pool_op, window):
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        idx = cnt = None
        pairs = _pair_rows(block_mask, block_size, pooling, window)
        if block_mask is not None:
            idx, cnt = block_mask_to_indices(block_mask, causal=causal, pairs=pairs)
        o, lse, pooled = _attn_fwd(q, k, v, idx, cnt, bounds, causal, sm_scale, block_size, pooling, pool_op, window,
                                   pairs)
        ctx.save_for_backward(q, k, v, o, lse, block_mask, bounds)
        ctx.cfg = (causal, sm_scale, block_size, window)
        if pooled is not None:
            ctx.mark_non_differentiable(pooled)
        return o, pooled

    @staticmethod
    def backward(ctx, do, _dpooled):
        q, k, v, o, lse, block_mask, bounds = ctx.saved_tensors
        causal, sm_scale, block_size, window = ctx.cfg
        dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, block_mask, bounds, causal, sm_scale, block_size, window)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _use_triton(backend, q, what):
    check_backend(backend)
    return use_triton(backend, q, what)


# ----------------------------------------------------------------------------- public API

def block_sparse_attn(q, k, v, block_mask, causal=True, sm_scale=None, block_size=64, *, seq_bounds=None,
                      backend="auto", window=None):
    """Block-sparse attention: only the (query block, key block) pairs kept by ``block_mask``.

    Args:
        q: ``[B, HQ, T, D]`` fp16/bf16 (fp32 accepted for tests), D in 16/32/64/128.
        k, v: ``[B, H, T, D]`` with ``HQ % H == 0`` (GQA).
        block_mask: bool ``[B, HQ, NB, NB]``, NB = ceil(T / block_size); True = compute the
            block. With ``causal`` entries above the diagonal are ignored and the diagonal
            blocks are masked causally inside.
        causal: causal masking (a bool).
        sm_scale: softmax scale, default ``1 / sqrt(D)``; a real number in (0, 1e4]
            (``kernel_utils.MAX_SM_SCALE``: larger scales overflow the fp32 logits).
        block_size: 64 (the only supported value).
        seq_bounds: optional int ``[B, 2]`` of (start, end) for padded batches: keys outside
            [start, end) are never attended and query rows outside it output zeros.
            Left padding: (T - len, T); right padding: (0, len).
        backend: ``"auto"`` (Triton on CUDA, the torch reference elsewhere), ``"triton"``
            or ``"torch"``.
        window: None (full causal attention) or a sliding window of that many tokens (needs
            ``causal``): key j is visible to query i iff ``j <= i`` and ``i - j < window``,
            as in transformers. Kept blocks the window cuts are masked inside; kept blocks
            wholly outside it are skipped.

    Returns:
        ``[B, HQ, T, D]`` in q's dtype. A query row that attends no key (no selected block,
        or only padding) outputs zeros. Differentiable in q, k, v; the backward pass also
        skips unselected blocks.
    """
    B, HQ, H, T, D, scale = check_attention_inputs(q, k, v, sm_scale, block_size, causal=causal)
    check_block_mask(block_mask, B, HQ, num_blocks(T, block_size), q.device)
    bounds = check_seq_bounds(seq_bounds, B, T, q.device)
    window = check_window(window, causal)
    if not _use_triton(backend, q, "block_sparse_attn"):
        return block_sparse_attn_ref(q, k, v, block_mask, causal, scale, block_size, seq_bounds=bounds,
                                     window=window)
    out, _ = _AttnFunction.apply(q, k, v, block_mask, bounds, bool(causal), scale, block_size, False, "max", window)
    return out


def dense_attn(q, k, v, causal=True, sm_scale=None, block_size=64, *, seq_bounds=None, backend="auto",
               window=None):
    """Dense attention through the same kernels (every block kept); see :func:`block_sparse_attn`."""
    B, HQ, H, T, D, scale = check_attention_inputs(q, k, v, sm_scale, block_size, causal=causal)
    bounds = check_seq_bounds(seq_bounds, B, T, q.device)
    window = check_window(window, causal)
    if not _use_triton(backend, q, "dense_attn"):
        full = torch.ones(B, HQ, num_blocks(T, block_size), num_blocks(T, block_size), dtype=torch.bool,
                          device=q.device)
        return block_sparse_attn_ref(q, k, v, full, causal, scale, block_size, seq_bounds=bounds, window=window)
    out, _ = _AttnFunction.apply(q, k, v, None, bounds, bool(causal), scale, block_size, False, "max", window)
    return out


def attn_with_pooling(q, k, v, causal=True, sm_scale=None, block_size=64, *, seq_bounds=None, backend="auto",
                      pool_op="max", window=None):
    """Exact attention plus the 2D max-pooled attention map (distillation ground truth).

    Args:
        q, k, v, causal, sm_scale, block_size, seq_bounds, backend, window: as in
            :func:`block_sparse_attn` (no mask: every causal block the window reaches is
            computed; blocks wholly outside the window are skipped and pool to 0).
        pool_op: ``"max"`` (SeerAttention's target) or ``"sum"`` (probability mass per
            block instead of its maximum), then row-normalised either way.

    Returns:
        ``(out, pooled)``: ``out`` ``[B, HQ, T, D]`` is the exact attention output (q's dtype,
        differentiable); ``pooled`` is float32 ``[B, HQ, NB, NB]`` whose entry (i, j) is the
        maximum of softmax(q k^T * scale + mask)[r, c] over rows r of query block i and keys
        c of key block j, each row then divided by its sum (rows sum to 1; blocks above the
        diagonal are 0 when causal; a block of rows that attends nothing is all zero). With a
        window, only visible keys enter the softmax and the pool.
        No T x T matrix is materialised; extra memory is O(B * HQ * T).
    """
    B, HQ, H, T, D, scale = check_attention_inputs(q, k, v, sm_scale, block_size, causal=causal)
    bounds = check_seq_bounds(seq_bounds, B, T, q.device)
    if pool_op not in ("max", "sum"):
        raise ValueError(f"pool_op must be 'max' or 'sum', got {pool_op!r}")
    window = check_window(window, causal)
    if not _use_triton(backend, q, "attn_with_pooling"):
        return attn_with_pooling_ref(q, k, v, causal, scale, block_size, seq_bounds=bounds, pool_op=pool_op,
                                     window=window)
    return _AttnFunction.apply(q, k, v, None, bounds, bool(causal), scale, block_size, True, pool_op, window)
