"""AttnGate, block selection and the distillation loss (SeerAttention, arXiv 2410.13276).

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from seer_attn.kernels.block_mask import causal_block_density

#: Logit given to blocks a gate must never pick (above the diagonal, padding-only keys).
#: Finite, so that KL terms with a zero target stay 0 instead of NaN.
MASKED_LOGIT = -1e9


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def block_pool(x, block_size, kinds, valid=None):
    """Pool ``x`` ``[B, H, T, D]`` over blocks of ``block_size`` tokens (last one partial).

    Args:
        kinds: pooling types from {"avg", "max", "min"}, concatenated on the channel axis.
        valid: optional bool ``[B, T]``; invalid (padding) tokens are left out of every pool,
            and a block without valid tokens pools to 0.

    Returns:
        ``[B, H, ceil(T / block_size), D * len(kinds)]``.
    """
    B, H, T, D = x.shape
    NB = (T + block_size - 1) // block_size
    pad = NB * block_size - T
    if valid is None and pad == 0:  # fast path (prefill of full blocks): views, no copies of x
        xb = x.view(B, H, NB, block_size, D)
        red = {"avg": lambda: xb.mean(dim=3), "max": lambda: xb.amax(dim=3), "min": lambda: xb.amin(dim=3)}
        for kind in kinds:
            if kind not in red:
                raise ValueError(f"unknown pooling type {kind!r}; expected avg, max or min")
        return torch.cat([red[kind]() for kind in kinds], dim=-1)
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
    v = F.pad(valid, (0, pad), value=False).view(B, 1, NB, block_size, 1)
    xb = F.pad(x, (0, 0, 0, pad)).view(B, H, NB, block_size, D)
    any_valid = v.any(dim=3)
    outs = []
    for kind in kinds:
        if kind == "avg":
            cnt = v.sum(dim=3).clamp_min(1)
            outs.append((xb * v).sum(dim=3) / cnt)
        elif kind == "max":
            outs.append(torch.where(any_valid, xb.masked_fill(~v, float("-inf")).amax(dim=3), 0.0))
        elif kind == "min":
            outs.append(torch.where(any_valid, xb.masked_fill(~v, float("inf")).amin(dim=3), 0.0))
        else:
            raise ValueError(f"unknown pooling type {kind!r}; expected avg, max or min")
    return torch.cat(outs, dim=-1)


class AttnGate(nn.Module):
    """Predicts block-level attention scores from block-pooled, pre-RoPE Q and K.

    Per-head linear maps without bias or activation: ``q_weight`` ``[HQ, D*|q_pool|, G]``
    (one map per query head) and ``k_weight`` ``[H, D*|k_pool|, G]`` (one per KV head,
    shared by the query heads of its GQA group). RoPE (a table sized for G) is applied to
    the projected blocks at their first-token positions; scores are ``q k^T / sqrt(G)``
    with a block-causal mask.
    """

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size=128, block_size=64,
                 q_pooling=("avg",), k_pooling=("max", "min", "avg"), use_rope=True):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.hidden_size, self.block_size = hidden_size, block_size
        self.q_pooling, self.k_pooling = tuple(q_pooling), tuple(k_pooling)
        self.use_rope = use_rope
        self.q_weight = nn.Parameter(torch.empty(num_heads, head_dim * len(self.q_pooling), hidden_size))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * len(self.k_pooling), hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # Like nn.Linear's default (uniform, bound 1/sqrt(fan_in)), per head. transformers'
        # init functions skip tensors it has just loaded from a checkpoint.
        for w in (self.q_weight, self.k_weight):
            bound = 1.0 / math.sqrt(w.shape[1])
            hf_init.uniform_(w, -bound, bound)

    def forward(self, q, k, rope=None, valid=None):
        """Gate logits.

        Args:
            q: pre-RoPE queries ``[B, HQ, T, D]``; k: pre-RoPE keys ``[B, H, T, D]``.
            rope: ``(cos, sin)`` each ``[B, NB, G]`` at the blocks' first-token positions.
            valid: optional bool ``[B, T]`` marking real (non-padding) tokens.

        Returns:
            float32 ``[B, HQ, NB, NB]``; entries above the diagonal and key blocks without
            any real token hold :data:`MASKED_LOGIT`.
        """
        w_dtype = self.q_weight.dtype
        qp = block_pool(q, self.block_size, self.q_pooling, valid).to(w_dtype)
        kp = block_pool(k, self.block_size, self.k_pooling, valid).to(w_dtype)
        qg = torch.einsum("bhnd,hdg->bhng", qp, self.q_weight).float()
        kg = torch.einsum("bhnd,hdg->bhng", kp, self.k_weight).float()
        if self.use_rope and rope is not None:
            cos, sin = (t.float().unsqueeze(1) for t in rope)
            qg = qg * cos + _rotate_half(qg) * sin
            kg = kg * cos + _rotate_half(kg) * sin
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            kg = kg.repeat_interleave(group, dim=1)  # NB-sized, cheap
        scores = torch.matmul(qg, kg.transpose(-1, -2)) / math.sqrt(self.hidden_size)
        NB = scores.shape[-1]
        allowed = torch.ones(NB, NB, dtype=torch.bool, device=scores.device).tril()[None, None]
        if valid is not None:
            B, T = valid.shape
            vb = F.pad(valid, (0, NB * self.block_size - T)).view(B, NB, self.block_size).any(-1)
            allowed = allowed & vb[:, None, None, :]
        return scores.masked_fill(~allowed, MASKED_LOGIT)


def select_blocks(scores, method, threshold=2e-3, nz_ratio=0.3, keep_diagonal=True, keep_sink=False,
                  dense_last_rows=2, coverage=0.9, keep_local=0):
    """Turn block logits ``[B, HQ, NB, NB]`` into a causal bool block mask of the same shape.

    Methods: ``threshold`` keeps blocks whose softmaxed score is >= ``threshold``;
    ``nz_ratio`` keeps the top k = max(1, int((1 - sqrt(1 - nz_ratio)) * NB)) blocks of
    every row; ``coverage`` keeps, per row, the fewest highest-scoring blocks whose
    softmaxed scores sum to >= ``coverage``. Then the keep-options are applied (the
    diagonal block, the sink block, the ``keep_local`` blocks just before the diagonal, the
    ``dense_last_rows`` last rows) and everything above the diagonal is dropped.
    """
    NB = scores.shape[-1]
    if method == "threshold":
        mask = torch.softmax(scores.float(), dim=-1) >= threshold
    elif method == "nz_ratio":
        k = min(NB, max(1, int((1.0 - math.sqrt(1.0 - nz_ratio)) * NB)))
        idx = torch.topk(scores, k, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    elif method == "coverage":
        p, order = torch.sort(torch.softmax(scores.float(), dim=-1), dim=-1, descending=True)
        before = p.cumsum(-1) - p  # mass of the strictly better blocks
        keep_sorted = before < coverage
        mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    else:
        raise ValueError(f"sparsity method must be 'threshold', 'nz_ratio' or 'coverage', got {method!r}")
    if keep_diagonal:
        mask |= torch.eye(NB, dtype=torch.bool, device=mask.device)
    if keep_sink:
        mask[..., 0] = True
    if keep_local > 0:
        i = torch.arange(NB, device=mask.device)
        back = i[:, None] - i[None, :]  # how many blocks key j lies before query block i
        mask |= (back >= 1) & (back <= keep_local)
    if dense_last_rows > 0:
        mask[..., -dense_last_rows:, :] = True
    return mask.tril_()


def select_blocks_for(scores, cfg):
    """:func:`select_blocks` with the method, parameter and keep-options of a
    ``SeerLlamaConfig``: the one place that maps config fields to the selection."""
    return select_blocks(scores, cfg.seer_sparsity_method, threshold=cfg.seer_threshold, nz_ratio=cfg.seer_nz_ratio,
                         keep_diagonal=cfg.seer_keep_diagonal, keep_sink=cfg.seer_keep_sink,
                         dense_last_rows=cfg.seer_dense_last_rows, coverage=cfg.seer_coverage,
                         keep_local=cfg.seer_keep_local)


def _causal_fill(scores):
    NB = scores.shape[-1]
    tril = torch.ones(NB, NB, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~tril, MASKED_LOGIT)


def streaming_scores(B, HQ, NB, device):
    """Block logits of the "streaming" baseline (attention sink + most recent blocks): the
    sink block first, then blocks ranked by recency, so top-k keeps sink + k-1 recent."""
    i = torch.arange(NB, device=device)
    s = (i[None, :] - i[:, None]).float()  # 0 on the diagonal, more negative further back
    s[:, 0] = 1.0
    return _causal_fill(s.expand(B, HQ, NB, NB))


def meanpool_scores(q, k, block_size, valid=None):
    """MoBA-like baseline: mean-pooled (post-RoPE) q . k per block pair, GQA-expanded."""
    qp = block_pool(q.float(), block_size, ("avg",), valid)
    kp = block_pool(k.float(), block_size, ("avg",), valid)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        kp = kp.repeat_interleave(group, dim=1)
    return _causal_fill(torch.matmul(qp, kp.transpose(-1, -2)) / math.sqrt(q.shape[-1]))


def oracle_scores(pooled):
    """Oracle baselines: log of the true pooled attention map, so that the softmax used by
    the selection methods gives back the (row-normalised) map itself."""
    return _causal_fill(torch.log(pooled.float().clamp_min(1e-30)))


def causal_density(mask):
    """Kept share of causal blocks per (batch, head): float ``[B, HQ]``."""
    return causal_block_density(mask, per_head=True)


def gate_distill_loss(scores, target, skip_fraction=0.25):
    """KL(target || softmax(scores)) averaged over elements, skipping the first block rows.

    Args:
        scores: gate logits ``[B, HQ, NB, NB]``.
        target: row-normalised pooled attention ``[B, HQ, NB, NB]`` (ground truth).
        skip_fraction: share of leading block rows left out (the paper skips a quarter
            for stability: early rows have few blocks and trivial targets).
    """
    r0 = int(scores.shape[2] * skip_fraction)
    logp = F.log_softmax(scores[:, :, r0:].float(), dim=-1)
    t = target[:, :, r0:].detach().float()  # the target trains the gate, never the base model
    # elementwise mean, as torch.nn.KLDivLoss() in the reference; xlogy makes 0 * log 0 = 0
    return (torch.xlogy(t, t) - t * logp).mean()
