"""Torch references of the attention kernels: same signatures, explicit masks, fp32 math.

They are the CPU code path (model on CPU, demo, tests) and the ground truth the Triton
kernels are tested against. Work is chunked along the query axis so a 16k-token call
never holds a T x T matrix: memory is O(chunk * T) per head.

``upcast=False`` runs the same math in the inputs' own precision; tests use it to measure
how much error low precision alone causes, and bound the kernels' error by it.
"""
import torch

from .kernel_utils import (check_attention_inputs, check_block_mask, check_heads_and_sizes, check_qkv_types,
                           check_seq_bounds, check_window, num_blocks, resolve_sm_scale)

_CHUNK_ELEMS = 1 << 26  # ~256 MB of fp32 scores per chunk
_CAUSAL_CHUNK = 256  # causal: query rows per chunk, each reading only the keys up to its last row


def _chunk_rows(B, HQ, T):
    return max(1, min(T, _CHUNK_ELEMS // max(1, B * HQ * T)))


def _expand_kv(k, group):
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def _allowed(r0, r1, T, causal, seq_bounds, block_mask, block_size, device, window=None):
    """Boolean [B or 1, HQ or 1, r1-r0, T]: which keys each query row may attend."""
    rows = torch.arange(r0, r1, device=device)
    cols = torch.arange(T, device=device)
    allowed = torch.ones(r1 - r0, T, dtype=torch.bool, device=device)
    if causal:
        allowed = cols[None, :] <= rows[:, None]
    if window is not None:  # transformers' sliding window: i - j < window
        allowed = allowed & (cols[None, :] > rows[:, None] - window)
    allowed = allowed[None, None]
    if seq_bounds is not None:
        start = seq_bounds[:, 0].view(-1, 1, 1, 1).long()
        end = seq_bounds[:, 1].view(-1, 1, 1, 1).long()
        col_ok = (cols.view(1, 1, 1, -1) >= start) & (cols.view(1, 1, 1, -1) < end)
        row_ok = (rows.view(1, 1, -1, 1) >= start) & (rows.view(1, 1, -1, 1) < end)
        allowed = allowed & col_ok & row_ok
    if block_mask is not None:
        bm = block_mask[:, :, r0 // block_size:(r1 - 1) // block_size + 1]  # [B, HQ, nrb, NB]
        bm = bm.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
        off = r0 - (r0 // block_size) * block_size
        allowed = allowed & bm[:, :, off:off + (r1 - r0), :T]
    return allowed


def _attention(q, k, v, causal, sm_scale, block_size, block_mask, seq_bounds, upcast, pooled_out, pool_op="max",
               window=None):
    B, HQ, H, T, D, scale = check_attention_inputs(q, k, v, sm_scale, block_size, causal=causal)
    seq_bounds = check_seq_bounds(seq_bounds, B, T, q.device)
    window = check_window(window, causal)
    dt = torch.float32 if upcast else q.dtype
    group = HQ // H
    qf, kf, vf = q.to(dt), _expand_kv(k.to(dt), group), _expand_kv(v.to(dt), group)
    out = torch.empty(B, HQ, T, D, dtype=dt, device=q.device)
    rows = _chunk_rows(B, HQ, T)
    if causal:  # smaller chunks skip the masked upper triangle: about half the work
        rows = min(rows, _CAUSAL_CHUNK)
    rows = max(block_size, rows // block_size * block_size) if pooled_out is not None else rows
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        n = r1 if causal else T  # keys that any row of the chunk may attend: [lo, n)
        lo = 0 if window is None else max(0, r0 - window + 1) // block_size * block_size  # block-aligned
        allowed = _allowed(r0, r1, T, causal, seq_bounds, block_mask, block_size, q.device, window)[..., lo:n]
        empty = ~allowed.any(-1, keepdim=True)  # rows with no allowed key output zeros
        has_empty = bool(empty.any())
        kc, vc = kf[:, :, lo:n], vf[:, :, lo:n]
        if pooled_out is None and upcast and not has_empty:
            # the same fp32 math and explicit mask through torch's fused kernel (much faster on CPU)
            out[:, :, r0:r1] = torch.nn.functional.scaled_dot_product_attention(
                qf[:, :, r0:r1], kc, vc, attn_mask=allowed, scale=scale)
            continue
        s = torch.matmul(qf[:, :, r0:r1] * scale, kc.transpose(-1, -2))
        s.masked_fill_(~allowed, float("-inf"))
        p = torch.softmax(s.float(), dim=-1)
        if has_empty:
            p = p.masked_fill(empty, 0.0)
        out[:, :, r0:r1] = torch.matmul(p.to(dt), vc)
        if pooled_out is not None:
            # max- (or sum-) pool the probabilities over 64x64 tiles (partial tiles padded with 0;
            # key blocks outside [lo, n) keep the zeros they were initialised with)
            nbk = num_blocks(n - lo, block_size)
            pad_r = (-(r1 - r0)) % block_size
            pp = torch.nn.functional.pad(p, (0, nbk * block_size - (n - lo), 0, pad_r))
            nrb = pp.shape[2] // block_size
            pp = pp.view(B, HQ, nrb, block_size, nbk, block_size)
            pp = pp.amax(dim=(3, 5)) if pool_op == "max" else pp.sum(dim=(3, 5))
            c0 = lo // block_size
            pooled_out[:, :, r0 // block_size:r0 // block_size + nrb, c0:c0 + nbk] = pp
    return out.to(q.dtype)


def attn_with_pooling_ref(q, k, v, causal=True, sm_scale=None, block_size=64, *, seq_bounds=None, upcast=True,
                          pool_op="max", window=None):
    """Reference of :func:`attn_with_pooling` (see there for shapes); fp32 math by default.
    The pooled map is a target, not differentiable (as in the Triton path)."""
    B, HQ, _, T, _, _ = check_attention_inputs(q, k, v, sm_scale, block_size, causal=causal)
    NB = num_blocks(T, block_size)
    pooled = torch.zeros(B, HQ, NB, NB, dtype=torch.float32, device=q.device)
    if pool_op not in ("max", "sum"):
        raise ValueError(f"pool_op must be 'max' or 'sum', got {pool_op!r}")
    out = _attention(q, k, v, causal, sm_scale, block_size, None, seq_bounds, upcast, pooled, pool_op, window)
    pooled = pooled.detach()
    pooled = pooled / pooled.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return out, pooled


def block_sparse_attn_ref(q, k, v, block_mask, causal=True, sm_scale=None, block_size=64, *, seq_bounds=None,
                          upcast=True, window=None):
    """Reference of :func:`block_sparse_attn` (see there for shapes); fp32 math by default."""
    B, HQ, _, T, _, _ = check_attention_inputs(q, k, v, sm_scale, block_size, causal=causal)
    check_block_mask(block_mask, B, HQ, num_blocks(T, block_size), q.device)
    return _attention(q, k, v, causal, sm_scale, block_size, block_mask, seq_bounds, upcast, None, window=window)


# ----------------------------------------------------------------------------- sparse decode

def check_decode_inputs(q, k_cache, v_cache, block_index_or_mask, seq_lens, sm_scale, block_size, seq_starts,
                        block_counts, check_lengths=True):
    """Validate the arguments of :func:`block_sparse_decode` (see there) and bring the block
    selection to its one internal form, per-row block lists.

    Returns ``(B, HQ, H, S, D, scale, idx, cnt, lens, starts)``: ``idx`` int32 or int64 ``[B, H, K]``
    block indices of which the first ``cnt`` (int32 ``[B, H]``) entries are read (entries
    outside ``[0, NB)`` are skipped), ``lens`` / ``starts`` int32 ``[B]`` (``starts`` None when
    not given). Raises TypeError / ValueError naming the offending argument and value;
    ``check_lengths=False`` trusts the values of ``seq_lens`` / ``seq_starts`` / ``block_counts`` (their
    checks cost a device sync and kernels on a decode loop's hot path).
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, H, T, D], got shape {tuple(t.shape)}")
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query token per sequence, [B, HQ, 1, D], got shape {tuple(q.shape)}")
    if k_cache.shape[0] != q.shape[0] or k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"k_cache shape {tuple(k_cache.shape)} does not match q shape {tuple(q.shape)} in batch or "
                         "head_dim")
    B, HQ, H, S, D, scale = _check_decode_tensors(q, k_cache, v_cache, sm_scale, block_size)
    NB = num_blocks(S, block_size)
    sel = block_index_or_mask
    if not isinstance(sel, torch.Tensor):
        raise TypeError(f"block_index_or_mask must be a torch.Tensor, got {type(sel).__name__}")
    if sel.device != q.device:
        raise ValueError(f"block_index_or_mask is on {sel.device}, q is on {q.device}")
    if sel.dtype == torch.bool:
        if tuple(sel.shape) != (B, H, NB):
            raise ValueError(f"a bool block_index_or_mask must have shape [B, H, NB] = {(B, H, NB)}, got "
                             f"{tuple(sel.shape)}")
        if block_counts is not None:
            raise ValueError("block_counts goes with block indices, not with a bool block mask")
        cnt = sel.sum(-1, dtype=torch.int32)
        pos = (sel.cumsum(-1) - 1).masked_fill(~sel, NB)  # unselected -> spill column NB
        idx = torch.full((B, H, NB + 1), -1, dtype=torch.int32, device=sel.device)
        idx.scatter_(-1, pos.long(), torch.arange(NB, dtype=torch.int32, device=sel.device).expand(B, H, NB))
        idx = idx[..., :NB].contiguous()
    elif sel.dtype.is_floating_point or sel.dtype.is_complex:
        raise TypeError(f"block_index_or_mask must be a bool mask or an integer tensor of block indices, got "
                        f"{sel.dtype}")
    else:
        if sel.dim() != 3 or tuple(sel.shape[:2]) != (B, H):
            raise ValueError(f"block indices must have shape [B, H, K] = ({B}, {H}, K), got {tuple(sel.shape)}")
        idx = (sel if sel.dtype in (torch.int32, torch.int64) else sel.to(torch.int32)).contiguous()
        if block_counts is None:
            cnt = torch.full((B, H), idx.shape[-1], dtype=torch.int32, device=q.device)
        else:
            if not isinstance(block_counts, torch.Tensor) or block_counts.dtype.is_floating_point \
                    or block_counts.dtype == torch.bool:
                raise TypeError(f"block_counts must be an integer torch.Tensor [B, H], got "
                                f"{getattr(block_counts, 'dtype', type(block_counts).__name__)}")
            if tuple(block_counts.shape) != (B, H):
                raise ValueError(f"block_counts must have shape [B, H] = {(B, H)}, got {tuple(block_counts.shape)}")
            cnt = block_counts.to(device=q.device, dtype=torch.int32).contiguous()
            if check_lengths:
                cnt = cnt.clamp(0, idx.shape[-1])
    lens = _check_lengths("seq_lens", seq_lens, B, S, q.device, check_lengths)
    starts = None if seq_starts is None else _check_lengths("seq_starts", seq_starts, B, S, q.device, check_lengths)
    if check_lengths:
        if bool((lens < 1).any()):
            raise ValueError(f"seq_lens must be >= 1 (the new token's own key is in the cache), got {lens.tolist()}")
        if starts is not None and bool((starts >= lens).any()):
            raise ValueError(f"seq_starts must be < seq_lens, got seq_starts={starts.tolist()}, "
                             f"seq_lens={lens.tolist()}")
    return B, HQ, H, S, D, scale, idx, cnt, lens, starts


def _check_decode_tensors(q, k, v, sm_scale, block_size):
    """The prefill kernels' checks of dtypes, devices, GQA, head_dim, scale and block size
    (the pieces of :func:`~.kernel_utils.check_attention_inputs`, same messages) for one query
    token against S cache slots, without building tensors: this runs on every decode step of
    every layer. Returns ``(B, HQ, H, S, D, scale)``."""
    check_qkv_types(q, k, v)
    B, HQ, _, D = q.shape
    H, S = k.shape[1], k.shape[2]
    check_heads_and_sizes(HQ, H, S, D, block_size)
    return B, HQ, H, S, D, resolve_sm_scale(sm_scale, D)


def _check_lengths(name, t, B, S, device, check_values):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [B], got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape [B] = ({B},), got {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int32).contiguous()
    if check_values and bool(((t < 0) | (t > S)).any()):
        raise ValueError(f"{name} must lie in [0, S={S}] (S: cache slots), got {t.tolist()}")
    return t


def decode_key_mask(idx, cnt, lens, starts, S, block_size):
    """Bool ``[B, H, S]``: the cache slots a decode step attends, from block lists (as returned
    by :func:`check_decode_inputs`), ``lens`` and ``starts`` (None: 0)."""
    B, H, K = idx.shape
    NB = num_blocks(S, block_size)
    listed = torch.arange(K, device=idx.device)[None, None, :] < cnt[..., None].long()
    ok = listed & (idx >= 0) & (idx < NB)
    blocks = torch.zeros(B, H, NB + 1, dtype=torch.bool, device=idx.device)
    blocks.scatter_(-1, torch.where(ok, idx.long(), NB), True)  # invalid entries land in the spill column
    keys = blocks[..., :NB].repeat_interleave(block_size, dim=-1)[..., :S]
    slot = torch.arange(S, device=idx.device)
    real = slot[None, :] < lens[:, None].long()
    if starts is not None:
        real = real & (slot[None, :] >= starts[:, None].long())
    return keys & real[:, None, :]


def block_sparse_decode_ref(q, k_cache, v_cache, block_index_or_mask, seq_lens, sm_scale=None, block_size=64, *,
                            seq_starts=None, block_counts=None, upcast=True):
    """Reference of :func:`block_sparse_decode` (see there for shapes): the allowed keys as an
    explicit mask ``[B, H, S]``, softmax in fp32 (``upcast=False``: in the inputs' precision)."""
    B, HQ, H, S, D, scale, idx, cnt, lens, starts = check_decode_inputs(
        q, k_cache, v_cache, block_index_or_mask, seq_lens, sm_scale, block_size, seq_starts, block_counts)
    dt = torch.float32 if upcast else q.dtype
    group = HQ // H
    allowed = decode_key_mask(idx, cnt, lens, starts, S, block_size)  # [B, H, S]
    qf = q.to(dt).view(B, H, group, D)
    s = torch.matmul(qf * scale, k_cache.to(dt).transpose(-1, -2))  # [B, H, group, S]
    s = s.masked_fill(~allowed[:, :, None, :], float("-inf"))
    p = torch.softmax(s.float(), dim=-1)
    p = p.masked_fill(~allowed.any(-1)[:, :, None, None], 0.0)  # nothing attended: zeros, not NaN
    out = torch.matmul(p.to(dt), v_cache.to(dt))  # [B, H, group, D]
    return out.reshape(B, HQ, 1, D).to(q.dtype)


def decode_window_masks(first_block, cur, num_blocks, keep_local):
    """Bool ``[B, num_blocks]`` masks of a decode step's window: ``outside`` each sequence's
    blocks ``[first_block, cur]``, and ``forced`` (inside it: the sink, the ``keep_local``
    blocks before ``cur`` and ``cur``); ``cur`` a long scalar tensor."""
    j = torch.arange(num_blocks, device=first_block.device)
    first = first_block.long()[:, None]
    outside = (j[None, :] < first) | (j[None, :] > cur)
    forced = ((j[None, :] == first) | (j[None, :] >= cur - keep_local)) & ~outside
    return outside, forced


def decode_window_ref(first_block, cur, num_blocks, keep_local, num_heads, k, share=None):
    """Torch reference of :func:`~.decode_select.decode_window`: the top-k methods' bias
    float32 ``[B, 1, num_blocks]`` (-inf outside ``[first_block, cur]``, +inf on the sink, the
    ``keep_local`` blocks before ``cur`` and ``cur``, 0 elsewhere) and counts int32
    ``[B, num_heads]``: with ``share`` None (a budget of ``k`` blocks) ``min(n, k)``, else
    ``min(ceil(share * n) floored at the forced blocks, n, the same of cur + 1)`` with ``n = cur
    + 1 - first_block``; ``cur`` a long scalar tensor."""
    outside, forced = decode_window_masks(first_block, cur, num_blocks, keep_local)
    bias = torch.zeros(outside.shape, device=outside.device).masked_fill_(outside, float("-inf"))
    bias.masked_fill_(forced, float("inf"))
    n = (cur + 1 - first_block.long()).double()
    least = 2 + keep_local  # sink, local, current
    if share is None:
        cnt = n.clamp_max(k)
    else:
        k_now = torch.ceil(share * (cur + 1).double()).clamp_min(least).clamp_max((cur + 1).double())
        cnt = torch.minimum(torch.minimum(torch.ceil(share * n).clamp_min(least), n), k_now)
    return bias[:, None], cnt.to(torch.int32)[:, None].expand(-1, num_heads).contiguous()


def top_blocks_ref(scores, bias, counts, k):
    """Torch reference of :func:`~.decode_select.top_blocks`: per row of ``scores + bias``
    (float32 ``[B, H, N]``) the indices of its ``counts`` largest entries (ties: the lower index
    first) in increasing order, then -1; int32 ``[B, H, k]``."""
    s = scores.float() + bias.float()
    B, H, N = s.shape
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # ties keep the lower index first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=s.device).expand(B, H, N))
    keep = rank < counts.to(s.device).long()[..., None]
    pos = (keep.cumsum(-1) - 1).masked_fill(~keep, N)  # the kept ones in block order, the rest -> spill column N
    idx = torch.full((B, H, N + 1), -1, dtype=torch.int32, device=s.device)
    idx.scatter_(-1, pos, torch.arange(N, dtype=torch.int32, device=s.device).expand(B, H, N))
    return idx[..., :k].contiguous()


def gate_scores_ref(y, keys, rope=None, key_scales=None):
    """Torch reference of :func:`~.decode_select.gate_scores`: float32 ``[B, H, N]`` logits of
    the projected queries ``y`` ``[B, H, G]`` (rotated by ``rope`` = (cos, sin) ``[B, G]``, the
    partner columns ``[-y[G/2:], y[:G/2]]``; with a ``y`` of width 2G, its second half) against
    block keys ``[B, H, N, G]``, each block's logit times ``key_scales`` ``[B, H, N]`` when given
    (8-bit keys: :func:`~.decode_select.eight_bit_keys`)."""
    G = keys.shape[-1]
    q = y.float()
    if rope is not None:
        cos, sin = (t.float()[:, None] for t in rope)
        partner = q[..., G:] if q.shape[-1] == 2 * G else torch.cat([-q[..., G // 2:], q[..., :G // 2]], -1)
        q = q[..., :G] * cos + partner * sin
    out = torch.einsum("bhg,bhng->bhn", q, keys.float())
    return out if key_scales is None else out * key_scales.float()


def prior_mix_ref(logits, q, means, full, scale, weight):
    """Torch reference of :func:`~.decode_select.prior_mix`: float32 ``[B, H, N]``,
    ``(1 - weight) * log p_gate + weight * log p_meanpool`` over each sequence's full blocks
    (``full`` bool ``[B, 1, N]``), 0 elsewhere. ``p_gate`` is the softmax of ``logits`` ``[B, H, N]``;
    ``p_meanpool`` each query head's softmax of ``q . mean key * scale`` (q ``[B, HQ, 1, D]``,
    means ``[B, H, N, D]``, the query rounded to the means' dtype) averaged over the KV head's
    group, floored at float32's smallest normal before the log."""
    B, H, N = logits.shape
    HQ, D = q.shape[1], q.shape[3]
    qs = (q.reshape(B, H, HQ // H, D).float() * scale).to(means.dtype)  # the means are read once, in their dtype
    s = torch.matmul(qs, means.transpose(-1, -2)).float()  # [B, H, g, N]
    p = torch.softmax(s.masked_fill(~full[:, :, None], float("-inf")), -1).mean(2)
    prior = p.clamp_min(torch.finfo(torch.float32).tiny).log()
    gate = torch.log_softmax(logits.float().masked_fill(~full, float("-inf")), -1)
    return ((1 - weight) * gate + weight * prior).masked_fill(~full, 0.0)
