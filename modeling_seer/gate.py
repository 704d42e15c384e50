"""AttnGate and the distillation loss (SeerAttention, arXiv 2410.13276).

Block pooling, selection and density live in :mod:`.selection` (re-exported here).
Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from .selection import (MASKED_LOGIT, block_pool, causal_density, select_blocks,  # noqa: F401 (re-exported)
                        select_blocks_for)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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


def gate_distill_loss(scores, target, skip_fraction=0.25, peak_weight=0.0):
    """KL(target || softmax(scores)) averaged over elements, skipping the first block rows.

    Args:
        scores: gate logits ``[B, HQ, NB, NB]``.
        target: row-normalised pooled attention ``[B, HQ, NB, NB]`` (ground truth).
        skip_fraction: share of leading block rows left out (the paper skips a quarter
            for stability: early rows have few blocks and trivial targets).
        peak_weight: w >= 0; each row's KL weighs 1 + w * (its target's largest entry), so
            rows whose true map is peaked on few blocks count more; the weighted mean over
            rows (0: the plain mean, the paper's loss).
    """
    r0 = int(scores.shape[2] * skip_fraction)
    logp = F.log_softmax(scores[:, :, r0:].float(), dim=-1)
    t = target[:, :, r0:].detach().float()  # the target trains the gate, never the base model
    # elementwise mean, as torch.nn.KLDivLoss() in the reference; xlogy makes 0 * log 0 = 0
    kl = torch.xlogy(t, t) - t * logp
    if not peak_weight:
        return kl.mean()
    w = 1.0 + peak_weight * t.amax(dim=-1, keepdim=True)  # [B, HQ, rows, 1]
    return (kl * w).sum() / (w.sum() * kl.shape[-1])
