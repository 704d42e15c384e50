"""Block-sparse decode attention: one new query token per sequence against a KV cache,
reading only the selected 64-token KV blocks (SeerAttention's decode sparsity, docs/design.md §2).

Layout: q ``[B, HQ, 1, D]``, k/v cache ``[B, H, S, D]`` with ``HQ % H == 0``. The block
selection is made per KV head and shared by the ``HQ // H`` query heads of its group, so
one program loads each selected K/V block once for all of them (K/V are never repeated in
memory).

Structure (one file per op): ``@triton.jit`` kernels -> launcher (allocation, grid,
strides) -> one public function; no autograd (decode is inference). On CPU the public
function dispatches to the torch reference ``block_sparse_decode_ref`` (``reference.py``).

Kernel design (flash-decoding, split-KV). The work of one (sequence, KV head) pair is its
list of selected blocks; the list is cut into ``NSPLIT`` contiguous parts and one program
per (pair, part) runs the online softmax over its blocks for the group's query heads at
once (the group's rows padded to 16 for ``tl.dot``), writing an unnormalised partial output
with its row max and sum. A second kernel merges the parts of each query head; with one
part per list (``NSPLIT == 1``, a large batch) the first writes the output and the second
is not launched. Each list
is split by its own length, so rows with short selections do little work; a block outside
``[0, NB)`` is skipped, and keys outside ``[seq_start, seq_len)`` (left padding, the unfilled
rest of the current block, unwritten slots of a static cache) are masked. Scores live in
the log2 domain (``qk_scale = sm_scale * log2(e)``).
"""
import torch

from .kernel_utils import TensorDescriptor, check_backend, desc_rows, new_output, tl, tma_capable, triton, use_triton
from .reference import block_sparse_decode_ref, check_decode_inputs

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _decode_split_kernel(
    Q, K, V, KD, VD, IDX, CNT, LENS, STARTS, PO, PML, O, qk_scale,
    s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ib, s_ih, s_ob, s_oh,
    H, NSPLIT,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, NSUB: tl.constexpr,
    HAS_STARTS: tl.constexpr, PREC: tl.constexpr, DIRECT: tl.constexpr, TMA: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # b * H + h
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cnt = tl.load(CNT + pid_bh)
    per = (cnt + NSPLIT - 1) // NSPLIT
    lo = tl.minimum(split * per, cnt)
    hi = tl.minimum(lo + per, cnt)
    seq_len = tl.load(LENS + b)
    if HAS_STARTS:
        start = tl.load(STARTS + b)
    else:
        start = 0

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < GROUP
    q = tl.load(Q + b.to(tl.int64) * s_qb + (h * GROUP + offs_g)[:, None].to(tl.int64) * s_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    idx_row = IDX + b.to(tl.int64) * s_ib + h.to(tl.int64) * s_ih

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    BLOCK_N: tl.constexpr = NSUB * BS
    r = tl.arange(0, BLOCK_N)
    for p in range(lo, hi, NSUB):
        if NSUB == 1:
            j = tl.load(idx_row + p).to(tl.int64)
            offs_n = j * BS + r
        else:  # NSUB blocks gathered into one tile (list positions past hi are masked)
            pos = p + r // BS
            j = tl.load(idx_row + pos, mask=pos < hi, other=-1).to(tl.int64)
            offs_n = j * BS + r % BS
        # a block outside [0, NB) has every slot outside [start, seq_len) (0 <= start, seq_len <= S)
        ok = (offs_n >= start) & (offs_n < seq_len) & (offs_n >= 0)
        if TMA:  # one block through the descriptors (NSUB == 1); a block past NB reads zeros
            n0 = (tl.maximum(j, 0) * BS).to(tl.int32)
            k = desc_rows(KD, b, h, n0, BS, HEAD_DIM)
            # masked slots are real cache memory here (unwritten static slots, another
            # sequence's padding): zero them so that 0 * V stays 0 whatever they hold
            v = tl.where(ok[:, None], desc_rows(VD, b, h, n0, BS, HEAD_DIM), 0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * s_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * s_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing attended so far
        pr = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(pr.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new

    if DIRECT:  # one part per list (NSPLIT == 1): the output itself, no partials to merge
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = tl.where(l_i[:, None] > 0.0, acc / l_safe[:, None], 0.0)  # a head that attends no key outputs zeros
        o_ptr = O + b.to(tl.int64) * s_ob + (h * GROUP + offs_g)[:, None].to(tl.int64) * s_oh + offs_d[None, :]
        tl.store(o_ptr, o.to(O.dtype.element_ty), mask=g_ok[:, None])
    else:
        # partials of row g: PO[(pid_bh * NSPLIT + split) * GROUP + g, :], PML[..., 0] = max, [..., 1] = sum
        row = (pid_bh * NSPLIT + split).to(tl.int64) * GROUP + offs_g
        tl.store(PO + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(PML + row * 2, m_i, mask=g_ok)
        tl.store(PML + row * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _decode_combine_kernel(PO, PML, O, s_ob, s_oh, HQ, H, NSPLIT,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # b * HQ + hq
    b = pid // HQ
    hq = pid % HQ
    h = hq // GROUP
    g = hq % GROUP
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NSPLIT
    row = ((b * H + h) * NSPLIT + offs_s).to(tl.int64) * GROUP + g
    m = tl.load(PML + row * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(PML + row * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_use)  # 0 for parts that attended nothing
    l_tot = tl.sum(l * w, 0)
    acc = tl.load(PO + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0)
    l_safe = tl.where(l_tot > 0.0, l_tot, 1.0)
    out = tl.where(l_tot > 0.0, out / l_safe, 0.0)  # a head that attends no key outputs zeros
    tl.store(O + b.to(tl.int64) * s_ob + hq.to(tl.int64) * s_oh + offs_d, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------- launcher

#: Launch configuration ``(NSUB, num_warps, num_stages)`` keyed by head_dim; benchmarks may
#: override entries to tune (``eval/bench_decode.py --tune``).
CONFIG_OVERRIDES: dict = {}
#: Kernel options. ``tma``: load each selected K/V block through tensor descriptors (Hopper's
#: TMA) instead of pointer loads, where the GPU and the cache tensors allow it (16-bit, 16-byte
#: aligned strides) and the launch reads one block per step (NSUB 1): True or False. Off: on an
#: H100 (docs/experiments/decode_host_time.md, session 43) the best TMA launch was within 1% of
#: pointer loads at 1 / 4 / 16 x 128k and 16 x 32k, and more stages were slower.
DECODE_OPTIONS = {"tma": False}
#: programs to aim for per launch when choosing the number of splits (a few per SM)
_TARGET_PROGRAMS_PER_SM = 4
MAX_SPLITS = 64
_SM_COUNT = {}


def _config(head_dim, on_gpu, dtype):
    if head_dim in CONFIG_OVERRIDES:
        return CONFIG_OVERRIDES[head_dim]
    if not on_gpu:  # interpreter: exercise the two-block gather
        return (2, 4, 1)
    # fp16 / bf16: two stages (H200 sweep, docs/experiments/decode_step_sweep.py: 3-9% faster
    # than three at 1 / 4 / 16 x 128k and 16 x 32k with 4 programs per SM)
    return (1, 4, 2)


def _sm_count(device):
    if device.type != "cuda":
        return 8
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def num_decode_splits(B, H, max_blocks, device):
    """How many parts each (sequence, KV head) block list is cut into: enough programs to
    fill the GPU (:data:`_TARGET_PROGRAMS_PER_SM` per SM), at least 2 blocks per part, at
    most :data:`MAX_SPLITS`."""
    want = -(-(_TARGET_PROGRAMS_PER_SM * _sm_count(device)) // max(1, B * H))
    return int(max(1, min(want, MAX_SPLITS, -(-max_blocks // 2))))


def _decode_tma(nsub, k, v):
    """Whether this launch loads its K/V blocks through tensor descriptors (``DECODE_OPTIONS``)."""
    want = DECODE_OPTIONS["tma"]
    if not isinstance(want, bool):  # 1 == True: a plain `in` lets 0 / 1 through
        raise ValueError(f"DECODE_OPTIONS['tma'] must be True or False, got {want!r}")
    return want and nsub == 1 and tma_capable(k, v)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# torch.compile (e.g. transformers' auto-compiled decode loop) must not trace into the launch:
# inductor re-analyses user-defined Triton kernels and refused this one's ``tl.dot`` with an
# accumulator. Dynamo calls the launcher as it is, between graphs.
@torch.compiler.disable
def _decode_fwd(q, k, v, idx, cnt, lens, starts, sm_scale, block_size, num_splits):
    B, HQ, _, D = q.shape
    H = k.shape[1]
    group = HQ // H
    nsplit = num_splits or num_decode_splits(B, H, idx.shape[-1], q.device)
    nsub, warps, stages = _config(D, q.is_cuda, q.dtype)
    tma = _decode_tma(nsub, k, v)
    if tma:
        kd, vd = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_size, D]) for t in (k, v))
    else:
        kd, vd = k, v
    out = new_output((B, HQ, 1, D), q.dtype, q.device)
    direct = nsplit == 1  # one launch: the split kernel writes the output
    if direct:
        po = pml = out  # unused
    else:
        po = torch.empty(B * H * nsplit * group, D, dtype=torch.float32, device=q.device)
        pml = torch.empty(B * H * nsplit * group, 2, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B * H, nsplit)](
        q, k, v, kd, vd, idx, cnt, lens, starts if starts is not None else lens, po, pml, out, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), H, nsplit,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BS=block_size, NSUB=nsub,
        HAS_STARTS=starts is not None, PREC=_prec(q.dtype), DIRECT=direct, TMA=tma, num_warps=warps,
        num_stages=stages,
    )
    if not direct:
        _decode_combine_kernel[(B * HQ,)](
            po, pml, out, out.stride(0), out.stride(1), HQ, H, nsplit,
            GROUP=group, HEAD_DIM=D, BLOCK_S=max(2, triton.next_power_of_2(nsplit)), num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------- public API

def block_sparse_decode(q, k_cache, v_cache, block_index_or_mask, seq_lens, sm_scale=None, block_size=64, *,
                        seq_starts=None, block_counts=None, num_splits=None, check_lengths=True, backend="auto"):
    """Attention of one new token per sequence over the selected blocks of a KV cache.

    Args:
        q: ``[B, HQ, 1, D]`` fp16/bf16 (fp32 accepted for tests), after RoPE; D in 16/32/64/128.
        k_cache, v_cache: ``[B, H, S, D]`` with ``HQ % H == 0`` (GQA; never repeated), after RoPE;
            S is the cache's slot count (a DynamicCache's length or a StaticCache's capacity).
        block_index_or_mask: the KV blocks each (sequence, KV head) reads, shared by the
            head's query group; blocks are ``block_size`` cache slots, NB = ceil(S / block_size):
            a bool mask ``[B, H, NB]``, or int block indices ``[B, H, K]`` (distinct per row;
            entries outside ``[0, NB)``, e.g. -1 padding, are skipped).
        seq_lens: int ``[B]``: slots ``[0, seq_lens)`` hold the sequence, the new token's own
            key included (its slot is ``seq_lens - 1``); keys at later slots are ignored, so
            the current, partly filled block and a static cache's empty slots are handled.
        sm_scale: softmax scale, default ``1 / sqrt(D)``; a real number in (0, 1e4].
        block_size: 64 (the only supported value).
        seq_starts: optional int ``[B]``: the first real slot of each sequence. Left-padded
            batches (as ``generate`` makes them) give the padding length here; keys before
            it are never attended. Default: 0.
        block_counts: optional int ``[B, H]`` with int indices: only the first
            ``block_counts`` entries of each row are read (lists of unequal lengths).
        num_splits: parts each block list is cut into (default: enough to fill the GPU).
        check_lengths: check the values of ``seq_lens`` / ``seq_starts`` (one device sync) and
            clamp ``block_counts`` to K; a decode loop whose lengths and counts are right by
            construction passes False.
        backend: ``"auto"`` (Triton on CUDA, the torch reference elsewhere), ``"triton"``
            or ``"torch"``.

    Returns:
        ``[B, HQ, 1, D]`` in q's dtype. A head whose selection holds no real key outputs zeros.
    """
    check_backend(backend)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an integer in [1, {MAX_SPLITS}] or None, got {num_splits!r}")
    B, HQ, H, S, D, scale, idx, cnt, lens, starts = check_decode_inputs(
        q, k_cache, v_cache, block_index_or_mask, seq_lens, sm_scale, block_size, seq_starts, block_counts,
        check_lengths)
    if not use_triton(backend, q, "block_sparse_decode"):
        return block_sparse_decode_ref(q, k_cache, v_cache, idx, lens, scale, block_size, seq_starts=starts,
                                       block_counts=cnt)

    def last_dim_contiguous(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    return _decode_fwd(q, k_cache, v_cache, idx, cnt, lens, starts, scale, block_size, num_splits)
