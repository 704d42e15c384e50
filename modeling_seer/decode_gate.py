"""The decode gate: which KV-cache blocks a new token reads (docs/design.md §2, "Decode").

One :class:`DecodeGate` per attention layer (``attn_gate.decode_gate``, built when
``seer_decode_gate=True``) scores the current token's query against the cache's blocks of 64
tokens: one score vector per KV head, shared by the query heads of its GQA group, so the
sparse decode kernel reads each selected block once for the whole group. Its K side sees a
block's pre-RoPE keys pooled as the prefill gate's (``seer_k_pooling``), kept in the
pooled-K cache (:mod:`.decode_cache`) and projected once, when the block fills.

Distillation target (:func:`decode_block_target`): for sampled query rows t of a training
sequence, the frozen model's attention probabilities of row t (causal, after RoPE), summed
per key block and over the query heads of the group, divided by the group size; the loss
(:func:`decode_distill_loss`) is the KL divergence between that distribution restricted to
the candidate blocks (full blocks before t's own block, holding a real token) and the gate's
softmax over the same blocks. Only ``R`` rows per sequence are scored
(``seer_decode_distill_rows``), so the target costs O(R * T) memory, never ``[B, H, T, NB]``.

Copied flat into saved model folders (remote code): imports only torch/transformers and the
kernels (rewritten flat by the bundle writer).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from seer_attn.kernels.decode_select import gate_scores

from .gate import _rotate_half
from .selection import MASKED_LOGIT


#: whether :meth:`DecodeGate.step_query`'s matmul also makes the query's RoPE partner columns (``[H, group * D,
#: 2G]``: twice the weight read; the way up to session 44) instead of leaving them to the scoring kernel, which
#: reads them from the map's own columns (``_rotate_half`` is a signed permutation); benchmarks may override it.
#: Off since session 44: a graph-replayed layer 0.2-1.2 us faster at 1 / 16 x 32k / 128k on an H100, the same
#: blocks kept (results/decode/h100_gate_rot_sweep.json)
STEP_PARTNER_COLUMNS = False


def _rope(x, rope):
    cos, sin = (t.float().unsqueeze(1) for t in rope)
    return x * cos + _rotate_half(x) * sin


class DecodeGate(nn.Module):
    """Block scores for decode steps: ``q_weight`` ``[H, group * D, G]`` maps the group's
    pre-RoPE queries (concatenated) to one G-vector per KV head; ``k_weight``
    ``[H, D * |k_pool|, G]`` maps a block's pooled pre-RoPE keys. RoPE (a table sized for G)
    is applied to the query at its token position and to each block at its first token's;
    scores are ``q k^T / sqrt(G)``.
    """

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size=128, k_pooling=("max", "min", "avg"),
                 use_rope=True):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.hidden_size, self.k_pooling, self.use_rope = hidden_size, tuple(k_pooling), use_rope
        group = num_heads // num_kv_heads
        self.q_weight = nn.Parameter(torch.empty(num_kv_heads, group * head_dim, hidden_size))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * len(self.k_pooling), hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for w in (self.q_weight, self.k_weight):  # as nn.Linear's default, per head
            bound = 1.0 / math.sqrt(w.shape[1])
            hf_init.uniform_(w, -bound, bound)

    def block_keys(self, pooled_k, rope=None):
        """Projected block keys, float32 ``[B, H, N, G]``, from pooled pre-RoPE keys
        ``[B, H, N, D * |k_pool|]`` and ``rope`` ``(cos, sin)`` ``[B, N, G]`` at the blocks'
        first-token positions."""
        kg = torch.einsum("bhnd,hdg->bhng", pooled_k.to(self.k_weight.dtype), self.k_weight).float()
        return _rope(kg, rope) if self.use_rope and rope is not None else kg

    def query(self, q, rope=None):
        """Projected queries, float32 ``[B, H, T, G]``, from pre-RoPE queries ``[B, HQ, T, D]``
        (one per token; the group's heads concatenated) and ``rope`` ``[B, T, G]``."""
        B, HQ, T, D = q.shape
        H = self.num_kv_heads
        x = q.reshape(B, H, HQ // H, T, D).permute(0, 1, 3, 2, 4).reshape(B, H, T, (HQ // H) * D)
        qg = torch.einsum("bhtd,hdg->bhtg", x.to(self.q_weight.dtype), self.q_weight).float()
        return _rope(qg, rope) if self.use_rope and rope is not None else qg

    def scores(self, qg, kg):
        """Logits ``[B, H, T, N]`` of projected queries ``[B, H, T, G]`` against block keys ``[B, H, N, G]``."""
        # in the keys' dtype (a decode step's cached keys are in the model's dtype: no float copy of them)
        return torch.matmul(qg.to(kg.dtype), kg.transpose(-1, -2)).float() / math.sqrt(self.hidden_size)

    def _step_weight(self, dtype, partner=None):
        """``q_weight`` for :meth:`step_logits` in ``dtype``, times ``1 / sqrt(G)``: ``[H, group * D, G]``,
        or with :data:`STEP_PARTNER_COLUMNS` and RoPE ``[H, group * D, 2G]``, the map and its RoPE
        partner side by side. RoPE is linear: ``rope(x W) = (x W) cos + (x W_rot) sin`` with
        ``W_rot`` the columns of ``W`` rotated as ``_rotate_half`` rotates channels. Rebuilt when
        ``q_weight`` changes (its version counter, storage, device or dtype) or the flag does;
        ``partner`` True / False overrides the flag (benchmarks)."""
        w = self.q_weight
        partner = (STEP_PARTNER_COLUMNS if partner is None else partner) and self.use_rope
        key = (w._version, w.data_ptr(), w.device, w.dtype, partner, dtype)
        cached = getattr(self, "_step_weight_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                wf = w.detach().float() / math.sqrt(self.hidden_size)
                if partner:
                    half = wf.shape[-1] // 2
                    wf = torch.cat([wf, -wf[..., half:], wf[..., :half]], dim=-1)
            cached = (key, wf.to(dtype).contiguous())
            self._step_weight_cache = cached  # a plain attribute: not in the state dict
        return cached[1]

    @torch.no_grad()
    def step_query(self, q_pre, dtype, rope=None):
        """``(y, rope)`` for :func:`~seer_attn.kernels.decode_select.gate_scores` (or its fused
        selection, :func:`~seer_attn.kernels.decode_select.gate_top_blocks`) at a decode step: one
        matmul projects the query (see :meth:`_step_weight`; the scale is folded in) in ``dtype``
        (:meth:`step_dtype`: the model's); ``y`` is ``[B, H, G]``
        (``[B, H, 2G]``, the RoPE partner columns made too, with :data:`STEP_PARTNER_COLUMNS` and
        ``rope``), and ``rope`` None for a gate without RoPE or when none is given.

        Args:
            q_pre: pre-RoPE queries of the new token ``[B, HQ, 1, D]``.
            rope: ``(cos, sin)`` ``[B, G]`` in ``dtype`` at the token's position.
        """
        B, HQ, _, D = q_pre.shape
        H, G = self.num_kv_heads, self.hidden_size
        x = q_pre.reshape(B, H, (HQ // H) * D).transpose(0, 1).to(dtype)  # [H, B, group * D] (a view)
        w = self._step_weight(dtype)
        if w.shape[-1] > G and (not self.use_rope or rope is None):
            w = w[..., :G]  # no rotation: the partner columns are not needed
        y = torch.bmm(x, w).transpose(0, 1)  # [B, H, G or 2G] (a view)
        return (y, rope) if self.use_rope and rope is not None else (y, None)

    @staticmethod
    def step_dtype(q_pre, keys):
        """The dtype a decode step's query is projected in (:meth:`step_query`): the cached keys'
        (the model's), or the query's own with 8-bit keys."""
        return q_pre.dtype if keys.element_size() == 1 else keys.dtype

    @torch.no_grad()
    def step_logits(self, q_pre, keys, rope=None, key_scales=None):
        """A decode step's logits, float32 ``[B, H, 1, N]``: ``scores(query(q_pre, rope), keys)``
        in two launches on a GPU: :meth:`step_query`'s matmul, then
        :func:`~seer_attn.kernels.decode_select.gate_scores` rotates the query and scores the
        blocks in float32 (its torch reference off a GPU).

        Args:
            q_pre: pre-RoPE queries of the new token ``[B, HQ, 1, D]``.
            keys: block keys ``[B, H, N, G]`` (:meth:`block_keys`, as the pooled-K cache keeps them:
                in the model's dtype, or 8-bit with ``key_scales`` ``[B, H, N]``,
                ``seer_decode_key_format``).
            rope: ``(cos, sin)`` ``[B, G]`` in :meth:`step_dtype` at the token's position.
        """
        y, rope = self.step_query(q_pre, self.step_dtype(q_pre, keys), rope)
        return gate_scores(y, keys, rope, key_scales=key_scales).unsqueeze(2)


def sample_decode_rows(bounds, num_rows, block_size, min_blocks=2):
    """``num_rows`` query rows per sequence to distil the decode gate on, long ``[B, R]``.

    ``bounds``: long ``[B, 2]`` real-token (start, end) of each row of the batch. Rows are
    drawn stratified (one uniform draw per equal share) from the part of the sequence whose
    own block has at least ``min_blocks - 1`` full blocks before it and that follows the first
    quarter (as the prefill loss skips its first quarter of block rows). Sequences too short
    for that get rows equal to -1 (no loss). Uses torch's default CPU generator (seeded runs
    give the same rows).
    """
    B = bounds.shape[0]
    start, end = bounds[:, 0].cpu(), bounds[:, 1].cpu()
    first = (start // block_size + min_blocks - 1) * block_size  # first row with enough blocks before it
    lo = torch.maximum(first, start + (end - start) // 4)
    span = (end - lo).clamp_min(0)
    u = (torch.arange(num_rows, dtype=torch.float64)[None, :] + torch.rand(B, num_rows, dtype=torch.float64)) \
        / num_rows
    rows = lo[:, None] + (u * span[:, None].double()).long().clamp_max((span - 1).clamp_min(0)[:, None])
    return torch.where(span[:, None] > 0, rows, torch.full_like(rows, -1))


@torch.no_grad()
def decode_block_target(q, k, rows, scale, block_size, bounds=None):
    """The decode gate's distillation target (module docstring) for rows ``rows``.

    Args:
        q: post-RoPE queries ``[B, HQ, T, D]``; k: post-RoPE keys ``[B, H, T, D]``.
        rows: long ``[B, R]`` query rows (-1: none).
        scale: the softmax scale of the attention.
        bounds: optional ``[B, 2]`` real-token (start, end); keys outside are never attended.

    Returns:
        float32 ``[B, H, R, NB]``: per row, the attention mass of each key block summed over
        the group's query heads and divided by the group size (rows sum to 1; a -1 row is 0).
        Memory: one KV head's ``[B, group, R, T]`` logits at a time.
    """
    B, HQ, T, D = q.shape
    H = k.shape[1]
    g = HQ // H
    NB = -(-T // block_size)
    R = rows.shape[1]
    safe = rows.clamp_min(0).to(q.device)
    key = torch.arange(T, device=q.device)
    allowed = key[None, None, :] <= safe[:, :, None]  # [B, R, T]
    if bounds is not None:
        bd = bounds.to(q.device).long()
        allowed = allowed & (key[None, None, :] >= bd[:, :1, None]) & (key[None, None, :] < bd[:, 1:, None])
    allowed = allowed & (rows >= 0).to(q.device)[:, :, None]
    target = torch.zeros(B, H, R, NB, dtype=torch.float32, device=q.device)
    for h in range(H):
        qr = q[:, h * g:(h + 1) * g].gather(2, safe[:, None, :, None].expand(B, g, R, D)).float()  # [B, g, R, D]
        s = torch.matmul(qr * scale, k[:, h:h + 1].float().transpose(-1, -2))  # [B, g, R, T]
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a row without keys: zeros
        p = F.pad(p, (0, NB * block_size - T)).view(B, g, R, NB, block_size).sum(-1)
        target[:, h] = p.sum(1) / g
    return target


def decode_candidates(rows, first_block, num_blocks, block_size):
    """Bool ``[B, 1, R, NB]``: the blocks a decode step at row t chooses among, the full blocks
    before t's own block from the sequence's first real block on (``first_block`` long ``[B]``)."""
    j = torch.arange(num_blocks, device=rows.device)
    cur = (rows // block_size)[:, :, None]
    return ((j[None, None, :] < cur) & (j[None, None, :] >= first_block.to(rows.device)[:, None, None])
            & (rows >= 0)[:, :, None])[:, None]


def decode_forced_blocks(rows, first_block, num_blocks, block_size, keep_local=0):
    """Bool ``[B, 1, R, NB]``: the full blocks a decode step at row t reads whatever the gate scores,
    the sequence's sink (``first_block``) and the ``keep_local`` blocks before t's own
    (``seer_decode_distill_forced=False`` leaves them out of :func:`decode_candidates`)."""
    j = torch.arange(num_blocks, device=rows.device)
    cur = (rows // block_size)[:, :, None]
    sink = j[None, None, :] == first_block.to(rows.device)[:, None, None]
    return (sink | ((j[None, None, :] < cur) & (j[None, None, :] >= cur - keep_local)))[:, None]


def decode_distill_loss(scores, target, candidates):
    """KL(target || softmax(scores)) over the candidate blocks, per row, averaged over the rows
    (and heads) that have a candidate holding attention mass.

    Args:
        scores: gate logits ``[B, H, R, NB]``; target: ``[B, H, R, NB]`` (:func:`decode_block_target`);
        candidates: bool, broadcastable to the scores (:func:`decode_candidates`).
    """
    cand = candidates.expand_as(scores)
    t = target.detach().float() * cand
    mass = t.sum(-1, keepdim=True)
    t = t / mass.clamp_min(torch.finfo(torch.float32).tiny)
    logp = F.log_softmax(scores.float().masked_fill(~cand, MASKED_LOGIT), dim=-1)
    kl = (torch.xlogy(t, t) - t * logp).sum(-1)  # [B, H, R]
    used = (mass.squeeze(-1) > 0) & cand.any(-1)
    return (kl * used).sum() / used.sum().clamp_min(1)
