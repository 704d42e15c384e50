"""The KV blocks a decode step reads: the decode gate's block scores and, per (sequence, KV
head), the ``cnt`` best-scoring blocks (docs/design.md §2, "Decode"), one launch each.

``gate_scores(y, keys, rope)`` returns float32 ``[B, H, N]``: the projected query of each
(sequence, KV head), rotated by RoPE when ``rope`` is given (``y * cos + rotate_half(y) * sin``,
the partner columns read from ``y``'s own with a sign; or, for a ``y`` of width 2G,
``y[..., :G] * cos + y[..., G:] * sin``, the partner columns made by the projection), dotted with
each of its ``N`` block keys. One program per (row, chunk of 64 blocks): the three elementwise ops and the batched
matmul of the torch path become one launch, in float32 throughout. 8-bit keys (float8 e4m3 or int8,
``eight_bit_keys``) come with one float32 scale per block (``key_scales``), which multiplies the block's
logit: half the bytes of 16-bit keys, the read that dominates the launch at B = 16 (session 45:
docs/experiments/decode_host_time.md; the pooled-K cache still keeps 16-bit keys).

``top_blocks(scores, bias, counts, k)`` returns int32 ``[B, H, k]``: the indices of the
``counts[b, h]`` largest entries of ``scores + bias`` (ties: the lower index first), in
increasing block order, then -1. The decode kernel reads the first ``counts`` entries of a
row, so the kept set needs no sort.

``gate_top_blocks(y, keys, rope, bias, counts, k)`` is ``top_blocks(gate_scores(y, keys, rope),
bias, counts, k)`` in one launch: one program per row scores the row's keys
(:data:`FUSED_CHUNK` at a time) into a float32 scratch row, then selects from it as top_blocks
does (with :data:`FUSED_SPLIT` > 1, that many programs per row score a part each and the last
to finish, counted by an atomic, selects). The graph decode step can run it for the gate alone
(no prior) with a budget or a share (``decode_graph.ONE_LAUNCH_GATE``), off by default: on an H100
it measured slower than the two launches it replaces (docs/experiments/decode_host_time.md).

``prior_mix(logits, q, means, full, scale, weight)`` returns float32 ``[B, H, N]``: the gate's
logits mixed with the training-free mean-pooled prior, ``(1 - weight) log p_gate + weight log
p_meanpool`` over each sequence's full blocks, 0 on the others (``seer_decode_meanpool_prior``;
the math in :func:`~.reference.prior_mix_ref`). Two launches of one program per (row, chunk of
64 blocks): the first scores the chunk's mean keys against the group's query heads (16-bit
means: one ``tl.dot``, the heads padded to 16 rows; a broadcast product and sum took 3x as long
at 16 x 128k on an H100), keeps the scores and each head's (max, sum of exponentials) of the
chunk; the second merges a row's chunk statistics into the log-sum-exps and writes its chunk of
the mixture (the torch path took ~15 small launches, ~85 us a layer in a CUDA-graph step at
4 x 128k on an H100).

top_blocks kernel: one program per row holds the row's scores as order-preserving int32 keys in
registers, finds the ``cnt``-th largest key by a search over the 32-bit key range that settles
:data:`TOP_BLOCKS_BITS` bits per counting pass over the registers (1: bisection, at most 32
passes, or with :data:`TOP_BLOCKS_EARLY_STOP` ending as soon as exactly ``cnt`` keys are at or
above the candidate (session 41, the default since session 42); 4:
8 passes of 16 counts each; 8: a radix select, 4 passes of one 256-bin ``tl.histogram`` of a key
byte over the keys that match the bytes settled so far; compares and counts in int32: a GPU runs 64-bit integer
ops as pairs of 32-bit ones), then writes the indices of the keys above it and of
the first ones equal to it at positions given by a prefix sum. Rows of up to
:data:`MAX_BLOCKS` blocks (64k-token blocks: a 1M-token cache); longer rows and CPU tensors
take the torch reference (:func:`~.reference.top_blocks_ref`).
"""
import torch

from .kernel_utils import check_backend, tl, triton, use_triton
from .reference import decode_window_ref, gate_scores_ref, prior_mix_ref, top_blocks_ref

#: the longest row (blocks) the kernel holds in registers
MAX_BLOCKS = 16384
#: block keys scored per gate_scores program (and blocks per prior_mix program)
SCORE_CHUNK = 64
#: the largest query heads x channels x blocks product a prior_mix program holds at once (without DOT)
PRIOR_TILE = 8192
#: blocks per prior_mix program (a power of two >= 16); benchmarks may override it
PRIOR_CHUNK = SCORE_CHUNK
#: prior_mix scores 16-bit means with tl.dot (the query heads padded to 16 rows); benchmarks may override it
PRIOR_DOT = True
#: launch warps of top_blocks by padded row length (the smallest bound at or above it); benchmarks
#: may override entries (docs/experiments/decode_step_sweep.py). One warp for rows of up to 512 blocks
#: (32k tokens; its counts need no cross-warp reduction) since session 44: a graph-replayed layer
#: 0.35-0.5 us faster at 1 / 16 x 32k on an H100, 2-11 us slower at 2048 blocks
#: (results/decode/h100_gate_rot_sweep.json)
TOP_BLOCKS_WARPS = {512: 1, 2048: 4, 8192: 8, MAX_BLOCKS: 16}
#: key bits each selection pass settles (1: bisection, 32 passes; 2 / 4: 16 / 8 passes of 4 / 16
#: counts each; 8: 4 passes of a 256-bin histogram, a radix select); benchmarks may override it. 1
#: measured fastest on the H100 (sessions 39 and 41: results/decode/h100_gate_select_sweep*.json)
TOP_BLOCKS_BITS = 1
#: whether the bisection (1 bit a pass) stops once exactly cnt keys are at or above its candidate (the same
#: kept set; session 41; on since session 42: with the one-launch window 0.10 ms off a 4.96 ms sparse token,
#: H100, 16 layers, 4 x 128k, results/decode/h100_e2e_profile_early.json)
TOP_BLOCKS_EARLY_STOP = True
#: block keys scored per step of gate_top_blocks' loop, and its warps; benchmarks may override them
FUSED_CHUNK = 64
FUSED_WARPS = 4
#: programs per row of gate_top_blocks (> 1: each scores a part, the row's last to finish selects)
FUSED_SPLIT = 1


@triton.jit
def _gate_query(y_row, cos, sin, offs_g, G: tl.constexpr, ROPE: tl.constexpr, PARTNER: tl.constexpr):
    """The row's projected query in float32, rotated by RoPE: the partner columns after the map's
    (``PARTNER``) or made from the map's own columns as ``_rotate_half`` makes them
    (``[-y[G/2:], y[:G/2]]``)."""
    q = tl.load(y_row + offs_g).to(tl.float32)
    if ROPE:
        if PARTNER:
            p = tl.load(y_row + G + offs_g).to(tl.float32)
        else:
            p = tl.load(y_row + (offs_g + G // 2) % G).to(tl.float32)
            p = tl.where(offs_g < G // 2, -p, p)
        q = q * tl.load(cos + offs_g).to(tl.float32) + p * tl.load(sin + offs_g).to(tl.float32)
    return q


@triton.jit
def _gate_scores_kernel(Y, COS, SIN, KEYS, SCALES, OUT, N, H, s_yb, s_yh, s_cb, s_sb, s_kb, s_kh, s_kn, s_ob, s_oh,
                        s_xb, s_xh, G: tl.constexpr, ROPE: tl.constexpr, PARTNER: tl.constexpr, CHUNK: tl.constexpr,
                        SCALED: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_g = tl.arange(0, G)
    q = _gate_query(Y + b * s_yb + h * s_yh, COS + b * s_cb, SIN + b * s_sb, offs_g, G, ROPE, PARTNER)
    offs_n = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    m = offs_n < N
    k = tl.load(KEYS + b * s_kb + h * s_kh + offs_n.to(tl.int64)[:, None] * s_kn + offs_g[None, :],
                mask=m[:, None], other=0.0).to(tl.float32)
    score = tl.sum(k * q[None, :], 1)
    if SCALED:  # 8-bit keys: each block's logit times its key's scale
        score *= tl.load(SCALES + b * s_xb + h * s_xh + offs_n, mask=m, other=0.0)
    tl.store(OUT + b * s_ob + h * s_oh + offs_n, score, mask=m)


@triton.jit
def _select_row(x, m, cnt, offs, out, K, BLOCK: tl.constexpr, BITS: tl.constexpr, EARLY: tl.constexpr):
    """Write the indices of the ``cnt`` largest of ``x`` (float32 ``[BLOCK]``, ``m`` its valid
    entries) in increasing order at ``out``, then -1 up to ``K`` (top_blocks' contract)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32, increasing with x (-inf lowest)
    # the largest t with count(key >= t) >= cnt: 2^BITS candidates per pass over the 32-bit key
    # range (BITS = 1: bisection); the bounds are int64 scalars, the per-block compares and
    # counts int32. Candidate 0 is the range's low end, which always qualifies.
    lo = tl.full((), -2147483648, tl.int64)
    step = tl.full((), 1 << (32 - BITS), tl.int64)
    if BITS == 8:  # radix select: one 256-bin histogram per key byte, high byte first (4 passes)
        ukey = key ^ -2147483648  # sign bit flipped: the bytes, read as unsigned, increase with key
        bins = tl.arange(0, 256)
        need = cnt  # of the candidates (keys matching the bytes settled so far), the largest still to take
        cand = m
        t = tl.full((), 0, tl.int32)  # the settled bytes, in ukey's order
        for p in tl.static_range(4):
            digit = (ukey >> (24 - 8 * p)) & 255
            hist = tl.histogram(digit, 256, mask=cand)
            ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # candidates whose byte is >= each bin
            d = tl.max(tl.where(ge >= need, bins, 0), 0)  # the largest byte still holding `need` (0: none)
            need = need - tl.sum(tl.where(bins > d, hist, 0), 0)
            cand = cand & (digit == d)
            t = t | (d << (24 - 8 * p))
        lo = (t ^ -2147483648).to(tl.int64)
    elif BITS == 1 and EARLY:  # bisection, stopping once exactly cnt keys are >= the candidate
        c = tl.full((), -1, tl.int32)
        i = tl.full((), 0, tl.int32)
        while (i < 32) & (c != cnt):
            mid = lo + step
            c = tl.sum(((key >= mid.to(tl.int32)) & m).to(tl.int32), 0)
            lo = tl.where(c >= cnt, mid, lo)
            step = step // 2
            i += 1
        # (an early stop leaves lo below the cnt-th largest key, but with exactly cnt keys >= lo:
        # the placement below takes those above it and every one equal to it, the same set)
    elif BITS == 1:
        for _ in range(32):
            mid = lo + step
            ok = tl.sum(((key >= mid.to(tl.int32)) & m).to(tl.int32), 0) >= cnt
            lo = tl.where(ok, mid, lo)
            step = step // 2
    else:
        offs_t = tl.arange(0, 1 << BITS).to(tl.int64)
        for _ in range(32 // BITS):
            mids = (lo + offs_t * step).to(tl.int32)
            n_ge = tl.sum(((key[None, :] >= mids[:, None]) & m[None, :]).to(tl.int32), 1)
            lo = lo + (tl.sum((n_ge >= cnt).to(tl.int64), 0) - 1) * step
            step = step >> BITS
    t = lo.to(tl.int32)
    gt = (key > t) & m
    eq = (key == t) & m
    need = cnt - tl.sum(gt.to(tl.int32), 0)
    take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= need))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(out + pos, offs, mask=take & (pos < K))
    tl.store(out + offs, tl.full([BLOCK], -1, tl.int32), mask=(offs >= cnt) & (offs < K))


@triton.jit
def _decode_window_kernel(FIRST, CUR, BIAS, CNT, NB, H, local, least, k, share, HAS_SHARE: tl.constexpr,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0)
    first = tl.load(FIRST + b).to(tl.int64)
    cur = tl.load(CUR).to(tl.int64)
    for c in range(0, NB, BLOCK):
        j = c + tl.arange(0, BLOCK)
        inside = (j >= first) & (j <= cur)
        forced = ((j == first) | (j >= cur - local)) & inside
        x = tl.where(inside, tl.where(forced, float("inf"), 0.0), float("-inf"))
        tl.store(BIAS + b.to(tl.int64) * NB + j, x, mask=j < NB)
    n = (cur + 1 - first).to(tl.float64)
    if HAS_SHARE:  # least, k, share: float64 scalars (as the reference's double ceilings)
        now = (cur + 1).to(tl.float64)
        k_now = tl.minimum(tl.maximum(tl.ceil(share * now), least), now)
        cnt = tl.minimum(tl.minimum(tl.maximum(tl.ceil(share * n), least), n), k_now)
    else:
        cnt = tl.minimum(n, k)
    offs_h = tl.arange(0, 16)
    for h0 in range(0, H, 16):
        tl.store(CNT + b * H + h0 + offs_h, tl.full([16], 0, tl.int32) + cnt.to(tl.int32), mask=h0 + offs_h < H)


@triton.jit
def _top_blocks_kernel(S, BIAS, CNT, OUT, N, K, H, s_sb, s_sh, s_bb, s_ob, s_oh, BLOCK: tl.constexpr,
                       BITS: tl.constexpr, EARLY: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    cnt = tl.load(CNT + pid)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(S + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh + offs, mask=m, other=0.0).to(tl.float32)
    x += tl.load(BIAS + b.to(tl.int64) * s_bb + offs, mask=m, other=0.0)
    _select_row(x, m, cnt, offs, OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh, K, BLOCK, BITS, EARLY)


@triton.jit
def _gate_top_blocks_kernel(Y, COS, SIN, KEYS, S, BIAS, CNT, OUT, ARRIVED, N, K, H, s_yb, s_yh, s_cb, s_sb, s_kb,
                            s_kh, s_kn, s_bb, s_ob, s_oh, G: tl.constexpr, ROPE: tl.constexpr,
                            PARTNER: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                            SPLIT: tl.constexpr, EARLY: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_g = tl.arange(0, G)
    q = _gate_query(Y + b * s_yb + h * s_yh, COS + b * s_cb, SIN + b * s_sb, offs_g, G, ROPE, PARTNER)
    s_row = S + pid.to(tl.int64) * N  # the row's scores, written chunk by chunk, read back whole
    part = tl.cdiv(tl.cdiv(N, CHUNK), SPLIT) * CHUNK  # the keys each of the row's SPLIT programs scores
    start = tl.program_id(1) * part
    for c in range(start, tl.minimum(start + part, N), CHUNK):
        offs_n = c + tl.arange(0, CHUNK)
        ok = offs_n < N
        k = tl.load(KEYS + b * s_kb + h * s_kh + offs_n.to(tl.int64)[:, None] * s_kn + offs_g[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(s_row + offs_n, tl.sum(k * q[None, :], 1), mask=ok)
    tl.debug_barrier()  # the program's own stores, visible to all its threads (and, through the
    # release below, to the row's last program)
    last = True
    if SPLIT > 1:  # the row's last program to finish selects; it resets the counter for the next call
        last = tl.atomic_add(ARRIVED + pid, 1, sem="acq_rel") == SPLIT - 1
    if last:
        if SPLIT > 1:
            tl.atomic_xchg(ARRIVED + pid, 0)
        cnt = tl.load(CNT + pid)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(s_row + offs, mask=m, other=0.0, cache_modifier=".cg") \
            + tl.load(BIAS + b * s_bb + offs, mask=m, other=0.0)
        _select_row(x, m, cnt, offs, OUT + b * s_ob + h * s_oh, K, BLOCK, BITS, EARLY)


@triton.jit
def _prior_scores_kernel(Q, MEANS, LOGITS, FULL, S, STATS, N, H, NCH, scale,
                         s_qb, s_qh, s_mb, s_mh, s_mn, s_lb, s_lh, s_fb,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, SUB: tl.constexpr,
                         CHUNK: tl.constexpr, HALF: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    c = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < GROUP
    q = tl.load(Q + b * s_qb + (h * GROUP + offs_g)[:, None].to(tl.int64) * s_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0).to(tl.float32) * scale
    if HALF:  # the reference scores the query rounded to the means' dtype
        q = q.to(MEANS.dtype.element_ty).to(tl.float32)
    if DOT:  # 16-bit means: one tensor-core product per SUB blocks (products exact, float32 sums)
        qh = q.to(MEANS.dtype.element_ty)
    m_h = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_h = tl.zeros([BLOCK_G], tl.float32)
    for i in range(0, CHUNK, SUB):
        offs_n = c * CHUNK + i + tl.arange(0, SUB)
        ok = offs_n < N
        f = (tl.load(FULL + b * s_fb + offs_n, mask=ok, other=0) != 0) & ok
        mk = tl.load(MEANS + b * s_mb + h * s_mh + offs_n.to(tl.int64)[:, None] * s_mn + offs_d[None, :],
                     mask=ok[:, None], other=0.0)
        if DOT:
            s = tl.dot(qh, tl.trans(mk))  # [BLOCK_G, SUB]
        else:
            s = tl.sum(q[:, None, :] * mk.to(tl.float32)[None, :, :], 2)
        tl.store(S + (pid * GROUP + offs_g).to(tl.int64)[:, None] * N + offs_n[None, :], s,
                 mask=g_ok[:, None] & ok[None, :])
        sm = tl.where(f[None, :], s, float("-inf"))
        m_new = tl.maximum(m_h, tl.max(sm, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_h = l_h * tl.exp(m_h - m_safe) + tl.sum(tl.exp(sm - m_safe[:, None]), 1)
        m_h = m_new
    offs_n = c * CHUNK + tl.arange(0, CHUNK)
    ok = offs_n < N
    f = (tl.load(FULL + b * s_fb + offs_n, mask=ok, other=0) != 0) & ok
    lg = tl.where(f, tl.load(LOGITS + b * s_lb + h * s_lh + offs_n, mask=ok, other=0.0).to(tl.float32),
                  float("-inf"))
    m_g = tl.max(lg, 0)
    l_g = tl.sum(tl.exp(lg - tl.where(m_g == float("-inf"), 0.0, m_g)), 0)
    # per (row, chunk): BLOCK_G + 1 (max, sum) pairs, the gate's last
    st = STATS + (pid * NCH + c).to(tl.int64) * (2 * (BLOCK_G + 1))
    tl.store(st + 2 * offs_g, m_h)
    tl.store(st + 2 * offs_g + 1, l_h)
    tl.store(st + 2 * BLOCK_G, m_g)
    tl.store(st + 2 * BLOCK_G + 1, l_g)


@triton.jit
def _merge_lse(st, offs_c, c_ok, j, W: tl.constexpr):
    m = tl.load(st + offs_c * W + 2 * j, mask=c_ok, other=float("-inf"))
    l = tl.load(st + offs_c * W + 2 * j + 1, mask=c_ok, other=0.0)
    mx = tl.max(m, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.sum(l * tl.exp(m - mx_safe), 0))  # -inf without a full block


@triton.jit
def _prior_mix_kernel(LOGITS, FULL, S, STATS, OUT, N, H, NCH, weight, s_lb, s_lh, s_fb, s_ob, s_oh,
                      GROUP: tl.constexpr, BLOCK_G: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    W: tl.constexpr = 2 * (BLOCK_G + 1)
    st = STATS + (pid * NCH).to(tl.int64) * W
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < NCH
    offs_n = c * CHUNK + tl.arange(0, CHUNK)
    ok = offs_n < N
    f = (tl.load(FULL + b * s_fb + offs_n, mask=ok, other=0) != 0) & ok
    p = tl.zeros([CHUNK], tl.float32)
    for j in range(GROUP):
        lse = _merge_lse(st, offs_c, c_ok, j, W)
        s = tl.load(S + (pid * GROUP + j).to(tl.int64) * N + offs_n, mask=ok, other=0.0)
        p += tl.exp(s - lse)
    prior = tl.log(tl.maximum(p / GROUP, 1.1754943508222875e-38))
    gate = tl.load(LOGITS + b * s_lb + h * s_lh + offs_n, mask=ok, other=0.0).to(tl.float32) \
        - _merge_lse(st, offs_c, c_ok, BLOCK_G, W)
    out = tl.where(f, (1 - weight) * gate + weight * prior, 0.0)
    tl.store(OUT + b * s_ob + h * s_oh + offs_n, out, mask=ok)


def _use_triton_width(backend, t, what, name, n):
    """:func:`~.kernel_utils.use_triton` for a kernel whose channel width ``n`` (named ``name``) must be a power
    of two >= 16: ``backend='triton'`` with another width is an error, ``'auto'`` takes the torch
    reference then."""
    pow2 = n >= 16 and n & (n - 1) == 0
    if backend == "triton" and not pow2:
        raise ValueError(f"backend='triton' needs {name} a power of two >= 16, got {n}")
    return pow2 and use_triton(backend, t, what)


def _check_gate_query(y, rope, B, H, G):
    """gate_scores' query arguments against the keys' ``B, H, G``; returns whether ``y`` carries
    the RoPE partner columns (``[B, H, 2G]``)."""
    if rope is None and tuple(y.shape) != (B, H, G):
        raise ValueError(f"y must have shape [B, H, G] = {(B, H, G)} without rope, got {tuple(y.shape)}")
    if rope is not None and tuple(y.shape) not in ((B, H, G), (B, H, 2 * G)):
        raise ValueError(f"y must have shape [B, H, G] = {(B, H, G)} or [B, H, 2G] = {(B, H, 2 * G)} with rope, "
                         f"got {tuple(y.shape)}")
    if rope is not None and any(tuple(t.shape) != (B, G) for t in rope):
        raise ValueError(f"rope must be (cos, sin) of shape [B, G] = {(B, G)}, got {[tuple(t.shape) for t in rope]}")
    return rope is not None and y.shape[-1] == 2 * G


def _check_selection(bias, counts, k, B, H, N):
    """top_blocks' selection arguments against the scores' ``B, H, N``."""
    if tuple(bias.shape) != (B, 1, N):
        raise ValueError(f"bias must have shape [B, 1, N] = {(B, 1, N)}, got {tuple(bias.shape)}")
    if tuple(counts.shape) != (B, H):
        raise ValueError(f"counts must have shape [B, H] = {(B, H)}, got {tuple(counts.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an integer in [1, N={N}], got {k!r}")


#: 8-bit block key formats: the torch dtype and the largest magnitude a key row is scaled to
EIGHT_BIT_KEYS = {"f8": (torch.float8_e4m3fn, 448.0), "i8": (torch.int8, 127.0)}


def eight_bit_keys(keys, fmt):
    """Block keys ``[..., G]`` in 8 bits: ``(keys8, scales)`` with ``keys8`` in ``fmt``'s dtype
    (:data:`EIGHT_BIT_KEYS`: ``"f8"`` float8 e4m3, ``"i8"`` int8 rounded to nearest) and float32
    ``scales`` ``[...]``, one per key row (its largest magnitude over the format's), so that
    ``keys8.float() * scales[..., None]`` approximates ``keys``; what :func:`gate_scores` scores
    with ``key_scales``."""
    if fmt not in EIGHT_BIT_KEYS:
        raise ValueError(f"8-bit key format must be one of {sorted(EIGHT_BIT_KEYS)}, got {fmt!r}")
    dtype, top = EIGHT_BIT_KEYS[fmt]
    x = keys.float()
    scales = x.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / top
    x = x / scales[..., None]
    return (x if fmt == "f8" else x.round().clamp(-top, top)).to(dtype), scales


def gate_scores(y, keys, rope=None, backend="auto", key_scales=None):
    """The decode gate's block logits of one step (module docstring).

    Args:
        y: ``[B, H, G]`` projected queries (with ``rope``, their RoPE partners are made from them as
            ``_rotate_half`` makes them), or ``[B, H, 2G]``, the map's columns then their partners;
            any strides with the last one 1.
        keys: ``[B, H, N, G]`` block keys (may be a slice of a larger buffer; last stride 1): 16 or
            32-bit floats, or 8-bit (float8 e4m3 or int8, :func:`eight_bit_keys`) with ``key_scales``.
        rope: optional ``(cos, sin)``, each ``[B, G]``, at the token's position.
        backend: ``"auto"`` (Triton on CUDA when G is a power of two), ``"triton"`` or ``"torch"``.
        key_scales: float ``[B, H, N]`` (last stride 1), each block's scale: required with 8-bit
            keys (multiplies the block's logit), None otherwise.

    Returns:
        float32 ``[B, H, N]``.
    """
    check_backend(backend)
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, H, N, G], got shape {tuple(keys.shape)}")
    B, H, N, G = keys.shape
    partner = _check_gate_query(y, rope, B, H, G)
    eight = keys.element_size() == 1
    if eight and keys.dtype not in [d for d, _ in EIGHT_BIT_KEYS.values()]:
        raise ValueError(f"8-bit keys must be float8_e4m3fn or int8, got {keys.dtype}")
    if eight != (key_scales is not None):
        raise ValueError(f"key_scales goes with 8-bit keys and only with them; keys are {keys.dtype}, key_scales "
                         f"is {'given' if key_scales is not None else 'None'}")
    if key_scales is not None and (tuple(key_scales.shape) != (B, H, N) or not key_scales.is_floating_point()):
        raise ValueError(f"key_scales must be float [B, H, N] = {(B, H, N)}, got {key_scales.dtype} "
                         f"{tuple(key_scales.shape)}")
    if not _use_triton_width(backend, keys, "gate_scores", "G", G):
        return gate_scores_ref(y, keys, rope, key_scales)
    y, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (y, keys))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in rope) if rope is not None else (y, y)
    scales = key_scales.float() if key_scales is not None else keys
    scales = scales if scales.stride(-1) == 1 else scales.contiguous()
    out = torch.empty(B, H, N, dtype=torch.float32, device=keys.device)
    _gate_scores_kernel[(B * H, triton.cdiv(N, SCORE_CHUNK))](
        y, cos, sin, keys, scales, out, N, H, y.stride(0), y.stride(1), cos.stride(0), sin.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0), out.stride(1),
        scales.stride(0) if eight else 0, scales.stride(1) if eight else 0,
        G=G, ROPE=rope is not None, PARTNER=partner, CHUNK=SCORE_CHUNK, SCALED=eight, num_warps=4)
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
    check_backend(backend)
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H, N], got shape {tuple(scores.shape)}")
    B, H, N = scores.shape
    _check_selection(bias, counts, k, B, H, N)
    if backend == "triton" and N > MAX_BLOCKS:
        raise ValueError(f"rows of {N} blocks exceed the kernel's {MAX_BLOCKS}; use backend='torch'")
    if not (N <= MAX_BLOCKS and use_triton(backend, scores, "top_blocks")):
        return top_blocks_ref(scores, bias, counts, k)
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    bias = bias.float().contiguous()
    counts = counts.to(torch.int32).contiguous()
    out = torch.empty(B, H, k, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(N))
    _top_blocks_kernel[(B * H,)](scores, bias, counts, out, N, k, H, scores.stride(0), scores.stride(1),
                                 bias.stride(0), out.stride(0), out.stride(1), BLOCK=block, BITS=TOP_BLOCKS_BITS,
                                 EARLY=TOP_BLOCKS_EARLY_STOP,
                                 num_warps=TOP_BLOCKS_WARPS[min(b for b in TOP_BLOCKS_WARPS if b >= block)])
    return out


def decode_window(first_block, cur, num_blocks, keep_local, num_heads, k, share=None, backend="auto"):
    """A graph decode step's selection window for the top-k methods in one launch: the bias
    float32 ``[B, 1, num_blocks]`` that ``top_blocks`` adds (-inf outside each sequence's blocks
    ``[first_block, cur]``, +inf on its sink, the ``keep_local`` blocks before ``cur`` and
    ``cur`` itself) and the kept counts int32 ``[B, num_heads]`` (``share`` None: a budget of
    ``k`` blocks; else a share of each sequence's blocks, floored at the forced ones and capped
    as the fixed top-k width ``k`` needs). Exactly :func:`~.reference.decode_window_ref` (the
    ~20 small launches it replaces; float64 for the share's ceiling, as there).

    Args:
        first_block: long ``[B]``, each sequence's sink block; cur: long one-element tensor, the
            current block (the same for every sequence: a static cache's slot).
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.
    """
    check_backend(backend)
    if first_block.dim() != 1 or cur.numel() != 1:
        raise ValueError(f"first_block must be [B] and cur one element, got {tuple(first_block.shape)} and "
                         f"{tuple(cur.shape)}")
    if not use_triton(backend, first_block, "decode_window"):
        return decode_window_ref(first_block, cur.reshape(()), num_blocks, keep_local, num_heads, k, share)
    B = first_block.shape[0]
    bias = torch.empty(B, 1, num_blocks, dtype=torch.float32, device=first_block.device)
    cnt = torch.empty(B, num_heads, dtype=torch.int32, device=first_block.device)
    _decode_window_kernel[(B,)](first_block.contiguous(), cur, bias, cnt, num_blocks, num_heads, keep_local,
                                float(2 + keep_local), float(k), 0.0 if share is None else float(share),
                                HAS_SHARE=share is not None,
                                BLOCK=min(4096, max(16, triton.next_power_of_2(num_blocks))), num_warps=4)
    return bias, cnt


def gate_top_blocks(y, keys, rope, bias, counts, k, backend="auto"):
    """``top_blocks(gate_scores(y, keys, rope), bias, counts, k)`` in one launch (module
    docstring): one program per (sequence, KV head) scores the row's block keys chunk by chunk
    into a float32 scratch row, then selects from it (:data:`FUSED_SPLIT` programs per row: the
    last to finish selects). Arguments as those two functions take them (``rope`` may be None).
    Returns int32 ``[B, H, k]``. Slower than the two launches on an H100 (session 39): a measured
    option."""
    check_backend(backend)
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, H, N, G], got shape {tuple(keys.shape)}")
    B, H, N, G = keys.shape
    if keys.element_size() == 1:
        raise ValueError(f"gate_top_blocks takes 16 or 32-bit keys, got {keys.dtype}; score 8-bit keys with "
                         "gate_scores(..., key_scales=...)")
    fused = N <= MAX_BLOCKS and _use_triton_width(backend, keys, "gate_top_blocks", "G", G)
    if not fused:
        return top_blocks(gate_scores(y, keys, rope, backend=backend), bias, counts, k, backend=backend)
    partner = _check_gate_query(y, rope, B, H, G)
    _check_selection(bias, counts, k, B, H, N)
    y, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (y, keys))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in rope) if rope is not None else (y, y)
    bias = bias.float().contiguous()
    counts = counts.to(torch.int32).contiguous()
    scratch = torch.empty(B * H, N, dtype=torch.float32, device=keys.device)
    out = torch.empty(B, H, k, dtype=torch.int32, device=keys.device)
    split = max(1, min(FUSED_SPLIT, triton.cdiv(N, FUSED_CHUNK)))
    # the rows' arrival counters (one zeroing launch), read only when a row has several programs
    arrived = torch.zeros(B * H, dtype=torch.int32, device=keys.device) if split > 1 else counts
    _gate_top_blocks_kernel[(B * H, split)](
        y, cos, sin, keys, scratch, bias, counts, out, arrived, N, k, H, y.stride(0), y.stride(1), cos.stride(0),
        sin.stride(0), keys.stride(0), keys.stride(1), keys.stride(2), bias.stride(0), out.stride(0), out.stride(1),
        G=G, ROPE=rope is not None, PARTNER=partner, CHUNK=FUSED_CHUNK, BLOCK=max(16, triton.next_power_of_2(N)),
        BITS=TOP_BLOCKS_BITS, EARLY=TOP_BLOCKS_EARLY_STOP, SPLIT=split, num_warps=FUSED_WARPS)
    return out


def prior_mix(logits, q, means, full, scale, weight, backend="auto"):
    """The decode gate's logits mixed with the mean-pooled prior (module docstring).

    Args:
        logits: float ``[B, H, N]``, the decode gate's.
        q: the new token's post-RoPE queries ``[B, HQ, 1, D]`` (``HQ % H == 0``).
        means: ``[B, H, N, D]``, each block's mean post-RoPE key (may be a slice of a larger
            buffer; last stride 1).
        full: bool ``[B, 1, N]``, each sequence's full blocks (the distributions' support).
        scale: the attention's softmax scale; weight: the prior's share, in [0, 1].
        backend: ``"auto"`` (Triton on CUDA when D is a power of two), ``"triton"`` or ``"torch"``.

    Returns:
        float32 ``[B, H, N]``.
    """
    check_backend(backend)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, H, N], got shape {tuple(logits.shape)}")
    B, H, N = logits.shape
    if q.dim() != 4 or q.shape[0] != B or q.shape[2] != 1 or q.shape[1] % H:
        raise ValueError(f"q must be [B, HQ, 1, D] with B = {B} and HQ a multiple of H = {H}, got {tuple(q.shape)}")
    D = q.shape[3]
    if tuple(means.shape) != (B, H, N, D):
        raise ValueError(f"means must have shape [B, H, N, D] = {(B, H, N, D)}, got {tuple(means.shape)}")
    if tuple(full.shape) != (B, 1, N) or full.dtype != torch.bool:
        raise ValueError(f"full must be bool of shape [B, 1, N] = {(B, 1, N)}, got {full.dtype} {tuple(full.shape)}")
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    if not _use_triton_width(backend, logits, "prior_mix", "D", D):
        return prior_mix_ref(logits, q, means, full, scale, weight)
    out, scores, mix = _prior_mix_launches(logits, q, means, full, scale, weight)
    scores()
    mix()
    return out


def _prior_mix_launches(logits, q, means, full, scale, weight):
    """prior_mix's output buffer and its two launches as calls (checked arguments, Triton on CUDA):
    ``scores()`` fills the scores and chunk statistics, ``mix()`` then writes the output. Separate
    so that a benchmark can time each (docs/experiments/prior_mix_sweep.py)."""
    B, H, N = logits.shape
    D = q.shape[3]
    group = q.shape[1] // H
    half = means.dtype in (torch.float16, torch.bfloat16)
    dot = PRIOR_DOT and half and D >= 16
    block_g = max(16 if dot else 2, triton.next_power_of_2(group))
    chunk = PRIOR_CHUNK
    sub = min(chunk, 64) if dot else max(2, min(chunk, PRIOR_TILE // (block_g * D)))
    nch = triton.cdiv(N, chunk)
    qv = q[:, :, 0]
    qv, means, logits = (t if t.stride(-1) == 1 else t.contiguous() for t in (qv, means, logits))
    fb = full[:, 0].to(torch.uint8)
    dev = logits.device
    s = torch.empty(B * H * group, N, dtype=torch.float32, device=dev)
    stats = torch.empty(B * H * nch, 2 * (block_g + 1), dtype=torch.float32, device=dev)
    out = torch.empty(B, H, N, dtype=torch.float32, device=dev)

    def scores():
        _prior_scores_kernel[(B * H, nch)](
            qv, means, logits, fb, s, stats, N, H, nch, float(scale), qv.stride(0), qv.stride(1), means.stride(0),
            means.stride(1), means.stride(2), logits.stride(0), logits.stride(1), fb.stride(0),
            GROUP=group, BLOCK_G=block_g, D=D, SUB=sub, CHUNK=chunk, HALF=half, DOT=dot, num_warps=4)

    def mix():
        _prior_mix_kernel[(B * H, nch)](
            logits, fb, s, stats, out, N, H, nch, float(weight), logits.stride(0), logits.stride(1), fb.stride(0),
            out.stride(0), out.stride(1), GROUP=group, BLOCK_G=block_g, CHUNK=chunk,
            BLOCK_C=max(2, triton.next_power_of_2(nch)), num_warps=4)
    return out, scores, mix
