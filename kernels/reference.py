"""Torch references of the attention kernels: same signatures, explicit masks, fp32 math.

They are the CPU code path (model on CPU, demo, tests) and the ground truth the Triton
kernels are tested against. Work is chunked along the query axis so a 16k-token call
never holds a T x T matrix: memory is O(chunk * T) per head.

``upcast=False`` runs the same math in the inputs' own precision; tests use it to measure
how much error low precision alone causes, and bound the kernels' error by it.
"""
import torch

from .kernel_utils import check_attention_inputs, check_block_mask, check_seq_bounds, check_window, num_blocks

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
