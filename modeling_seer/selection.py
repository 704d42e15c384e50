"""Block selection, family-agnostic: the selector registry, block scores, keep rules, density.

A *selector* scores every (query block, key block) pair of a prefill; a *method*
(``threshold`` / ``nz_ratio`` / ``coverage`` / ``gain`` / ``density``) and the keep rules turn the scores into a
block mask (docs/design.md §2). A sliding-window layer passes its ``window``: blocks the
window does not reach are never selected and density counts only the blocks it reaches. Every selector is one :class:`Selector` entry of
:data:`SELECTORS`, read by config validation, the model's sparse attention, eval and the
CLI: adding a baseline is one :func:`register_selector` call.

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from seer_attn.kernels.block_mask import causal_block_density, window_block_mask
from seer_attn.kernels.block_sparse_attn import attn_with_pooling
from seer_attn.kernels.decode_select import EIGHT_BIT_KEYS, prior_mix

#: Logit given to blocks a selection must never pick (above the diagonal, padding-only keys).
#: Finite, so that KL terms with a zero target stay 0 instead of NaN.
MASKED_LOGIT = -1e9
SPARSITY_METHODS = ("threshold", "nz_ratio", "coverage", "gain", "density")
#: the config field that holds each method's parameter
METHOD_FIELD = {"threshold": "seer_threshold", "nz_ratio": "seer_nz_ratio", "coverage": "seer_coverage",
                "gain": "seer_gain", "density": "seer_density"}


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


def window_fill(scores, window, block_size=64):
    """``scores`` ``[..., NB, NB]`` with the blocks a sliding window of ``window`` tokens does
    not reach (:func:`~seer_attn.kernels.block_mask.window_block_mask`) set to
    :data:`MASKED_LOGIT`; unchanged when ``window`` is None."""
    if window is None:
        return scores
    return scores.masked_fill(~window_block_mask(scores.shape[-1], window, block_size, scores.device), MASKED_LOGIT)


def nz_ratio_k(nz_ratio, NB, window=None, block_size=64):
    """Blocks per row that ``nz_ratio`` keeps.

    Full causal (``window`` None, or a window reaching every causal block):
    k = max(1, int((1 - sqrt(1 - nz_ratio)) * NB)), which keeps about ``nz_ratio`` of the
    causal triangle. With a window, row i can keep at most the c_i blocks the window
    reaches; k is the count (>= 1) whose kept share of the reached blocks,
    sum_i min(k, c_i) / sum_i c_i, is closest to ``nz_ratio`` (the smaller k on a tie), so
    1.0 keeps every reached block.
    """
    c = None if window is None else window_block_mask(NB, window, block_size).sum(-1)  # reached blocks per row
    if c is None or int(c[-1]) == NB:
        return min(NB, max(1, int((1.0 - math.sqrt(1.0 - nz_ratio)) * NB)))
    ks = torch.arange(1, int(c.max()) + 1)
    share = torch.minimum(ks[:, None], c[None, :]).sum(-1).double() / c.sum().double()
    return int(ks[torch.argmin((share - nz_ratio).abs())])


def keep_rule_mask(NB, keep_diagonal=True, keep_sink=False, keep_local=0, dense_last_rows=2, window=None,
                   block_size=64, device="cpu"):
    """Bool ``[NB, NB]``: the blocks the keep rules add whatever the scores say (the diagonal,
    the sink block, the ``keep_local`` blocks before the diagonal, the ``dense_last_rows``
    last rows), within the causal blocks a ``window`` reaches (all causal blocks without one)."""
    i = torch.arange(NB, device=device)
    back = i[:, None] - i[None, :]  # how many blocks key j lies before query block i
    keep = (back == 0) if keep_diagonal else torch.zeros(NB, NB, dtype=torch.bool, device=device)
    if keep_sink:
        keep[:, 0] = True
    if keep_local > 0:
        keep |= (back >= 1) & (back <= keep_local)
    if dense_last_rows > 0:
        keep[-dense_last_rows:, :] = True
    return keep & window_block_mask(NB, window, block_size, device)


def density_budget(density, NB, forced, reached, heads=1):
    """Blocks the ``density`` method picks beyond the keep rules, per batch row of one layer.

    ``forced`` / ``reached``: bool ``[NB, NB]`` (:func:`keep_rule_mask`, the blocks a window
    reaches). The layer keeps round(density * heads * R) blocks (R = reached blocks per head),
    never fewer than the forced ones nor more than every reached one: the count returned is
    that total less the ``heads * |forced|`` blocks the keep rules add anyway."""
    n_reached, n_forced = int(reached.sum()), int((forced & reached).sum())
    total = min(heads * n_reached, max(heads * n_forced, math.floor(density * heads * n_reached + 0.5)))
    return total - heads * n_forced


def select_density(probs, density, forced, reached, masked=None):
    """The ``density`` method: per batch row, the most probable blocks of the whole layer.

    Args:
        probs: float ``[B, HQ, NB, NB]``, each row's softmaxed scores.
        density: target kept share of the reached causal blocks, in (0, 1].
        forced, reached: bool ``[NB, NB]``, see :func:`density_budget`.
        masked: optional bool ``[B, HQ, NB, NB]``, blocks whose score was masked (key blocks of
            padding only, every block of a padding-only query row): taken only once every
            other reached block is kept.

    Returns:
        bool ``[B, HQ, NB, NB]``: for each batch row on its own, the keep rules' blocks plus the
        :func:`density_budget` highest-probability other reached blocks over all heads and
        rows of the layer, i.e. a threshold on the probabilities solved per batch row so
        that the layer's density (mean over heads of the kept share) is ``density`` up to
        one block in ``HQ * R``, or the keep rules' floor, or 1. Ties at the cut are broken
        by position.
    """
    B, HQ, NB, _ = probs.shape
    m = density_budget(density, NB, forced, reached, HQ)
    mask = forced.expand(B, HQ, NB, NB).clone()
    if m > 0:
        cand = (reached & ~forced).expand(B, HQ, NB, NB)
        priority = probs.float()
        if masked is not None:
            priority = priority.masked_fill(masked, -1.0)  # probabilities are >= 0: after every real block
        priority = priority.masked_fill(~cand, -2.0).reshape(B, -1)
        idx = torch.topk(priority, m, dim=-1, sorted=False).indices
        mask.view(B, -1).scatter_(-1, idx, True)
    return mask


def select_gain(probs, gain, forced):
    """The ``gain`` method: per row, the free blocks (those ``forced`` does not hold) in falling
    probability while each would hold at least ``gain`` of the row's kept mass once added.

    A row keeping softmax mass M of the gate loses about -log M; adding a block of probability
    p gains log(1 + p / M). Along a row's sorted free blocks p falls and M (the forced blocks'
    mass plus the free blocks before) grows, so the gain falls and the kept blocks are a prefix;
    keeping every block whose p / (M + p) >= ``gain`` is the greedy spend of the blocks it keeps
    that maximises the summed log kept mass over the layer (one cut for all rows and heads).
    Between the threshold (confident peaks first, whatever the row keeps) and the coverage
    (unsure rows first): docs/experiments/gate_quality.md section 14.

    Args:
        probs: float ``[..., NB, NB]``, each row's softmaxed scores (0 where masked).
        gain: in (0, 1); smaller keeps more.
        forced: bool ``[NB, NB]``, the blocks the keep rules add whatever the scores say.

    Returns:
        bool ``[..., NB, NB]``: the free blocks kept (the forced ones are not set).
    """
    held = (probs * forced).sum(-1, keepdim=True)
    p, order = torch.sort(probs.masked_fill(forced, 0.0), dim=-1, descending=True)
    before = held + p.cumsum(-1) - p  # mass kept before each free block
    keep_sorted = (p > 0) & (p >= gain * (before + p))
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def select_blocks(scores, method, threshold=2e-3, nz_ratio=0.3, keep_diagonal=True, keep_sink=False,
                  dense_last_rows=2, coverage=0.9, keep_local=0, window=None, block_size=64, density=0.2,
                  gain=0.05):
    """Turn block logits ``[B, HQ, NB, NB]`` into a causal bool block mask of the same shape.

    Methods: ``threshold`` keeps blocks whose softmaxed score is >= ``threshold``;
    ``nz_ratio`` keeps the top k (:func:`nz_ratio_k`) blocks of every row; ``coverage``
    keeps, per row, the fewest highest-scoring blocks whose softmaxed scores sum to >=
    ``coverage``; ``gain`` keeps, per row, the free blocks that would each hold >= ``gain`` of the
    row's kept mass (:func:`select_gain`). Then the keep-options are applied (the diagonal block, the sink block, the
    ``keep_local`` blocks just before the diagonal, the ``dense_last_rows`` last rows) and
    everything above the diagonal is dropped.

    ``window``: a sliding window in tokens (None: full causal). The scores of blocks the
    window does not reach are masked before the method runs (softmax and top-k see only
    reached blocks) and, after the keep-options, every such block is dropped (the sink
    block too when the window has left it behind).
    """
    NB = scores.shape[-1]
    scores = window_fill(scores, window, block_size)
    if method == "threshold":
        mask = torch.softmax(scores.float(), dim=-1) >= threshold
    elif method == "nz_ratio":
        k = nz_ratio_k(nz_ratio, NB, window, block_size)
        idx = torch.topk(scores, k, dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    elif method == "coverage":
        p, order = torch.sort(torch.softmax(scores.float(), dim=-1), dim=-1, descending=True)
        before = p.cumsum(-1) - p  # mass of the strictly better blocks
        keep_sorted = before < coverage
        mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    elif method == "gain":
        forced = keep_rule_mask(NB, keep_diagonal, keep_sink, keep_local, 0, window, block_size, scores.device)
        mask = select_gain(torch.softmax(scores.float(), dim=-1), gain, forced)
    elif method == "density":
        forced = keep_rule_mask(NB, keep_diagonal, keep_sink, keep_local, dense_last_rows, window, block_size,
                                scores.device)
        reached = window_block_mask(NB, window, block_size, scores.device)
        mask = select_density(torch.softmax(scores.float(), dim=-1), density, forced, reached,
                              masked=scores <= MASKED_LOGIT / 2)
    else:
        raise ValueError(f"sparsity method must be one of {SPARSITY_METHODS}, got {method!r}")
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
    if window is not None:
        return mask & window_block_mask(NB, window, block_size, mask.device)
    return mask.tril_()


def layer_density(cfg, layer_idx=None, NB=None):
    """The density knob's share for layer ``layer_idx``: ``seer_density`` without a profile or
    layer index; under ``seer_density_profile``, ``seer_density`` times the layer's entry times
    one scale for every layer, capped at 1. With ``NB`` (the layer's block count) the scale is
    solved so that the sparse layers (those after ``seer_dense_layers``) keep ``seer_density``
    on average even where the profile asks a layer for less than the keep rules' floor or more
    than every block (:func:`profile_scale`); without it the scale is 1."""
    profile = getattr(cfg, "seer_density_profile", None)
    if profile is None or layer_idx is None:
        return cfg.seer_density
    scale = 1.0
    if NB is not None:
        floor = keep_rule_floor(int(NB), cfg.seer_keep_diagonal, cfg.seer_keep_sink, cfg.seer_keep_local,
                                cfg.seer_dense_last_rows)
        scale = profile_scale(cfg.seer_density, tuple(profile[getattr(cfg, "seer_dense_layers", 0):]) or
                              tuple(profile), floor)
    return min(1.0, cfg.seer_density * profile[layer_idx] * scale)


@functools.lru_cache(maxsize=256)
def keep_rule_floor(NB, keep_diagonal, keep_sink, keep_local, dense_last_rows) -> float:
    """Share of the causal blocks of an ``NB``-block layer (no sliding window) that the keep
    rules keep whatever the scores say: the density no selection goes below."""
    forced = keep_rule_mask(NB, keep_diagonal, keep_sink, keep_local, dense_last_rows)
    return int(forced.sum()) / (NB * (NB + 1) // 2)


@functools.lru_cache(maxsize=256)
def profile_scale(density, profile, floor) -> float:
    """The factor s for which the layers' shares ``clip(s * density * p, floor, 1)`` over the
    entries p of ``profile`` average ``density`` (0 when ``density`` is at or below the floor:
    every layer keeps the floor, as the plain knob; 1 when every layer is at every block): what
    the profile takes from a layer the floor holds up, or gives to a layer already at every
    block, the others make up. Bisection on the (monotone) mean."""
    target = min(1.0, max(density, floor))
    if target <= floor:  # asked for the floor or less: every layer keeps the floor, as the plain knob does
        return 0.0
    if density * min(profile) >= 1.0:
        return 1.0

    def mean(s):
        return sum(min(1.0, max(floor, s * density * p)) for p in profile) / len(profile)
    lo, hi = 0.0, 1.0 / (density * min(profile))  # mean(lo) = floor <= target <= mean(hi) = 1
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


def select_blocks_for(scores, cfg, window=None, layer_idx=None):
    """:func:`select_blocks` with the method, parameter and keep-options of a Seer config:
    the one place that maps config fields to the selection. ``window``: the layer's sliding
    window in tokens (None: full causal); ``layer_idx``: the layer (its share of the density
    knob under ``seer_density_profile``)."""
    return select_blocks(scores, cfg.seer_sparsity_method, threshold=cfg.seer_threshold, nz_ratio=cfg.seer_nz_ratio,
                         keep_diagonal=cfg.seer_keep_diagonal, keep_sink=cfg.seer_keep_sink,
                         dense_last_rows=cfg.seer_dense_last_rows, coverage=cfg.seer_coverage,
                         keep_local=cfg.seer_keep_local, window=window, block_size=cfg.seer_block_size,
                         density=layer_density(cfg, layer_idx, scores.shape[-1]), gain=cfg.seer_gain)


def causal_density(mask, window=None, block_size=64):
    """Kept share of causal blocks per (batch, head): float ``[B, HQ]``. With a sliding
    ``window`` (tokens): kept share of the blocks the window reaches (all reached blocks
    kept = 1), see :func:`~seer_attn.kernels.block_mask.causal_block_density`."""
    return causal_block_density(mask, per_head=True, window=window, block_size=block_size)


def selection_density(scores, cfg, window=None, layer_idx=None):
    """Kept share of causal blocks per (batch, head), float ``[B, HQ]``, of the selection
    :func:`select_blocks_for` makes from ``scores`` under ``cfg`` for a layer with sliding
    ``window`` (tokens, or None): what a sparse prefill of that layer reports (1 for a layer
    ``layer_idx`` among the first ``seer_dense_layers``, which reads every block)."""
    if layer_idx is not None and layer_idx < getattr(cfg, "seer_dense_layers", 0):
        return torch.ones(scores.shape[:2], dtype=torch.float32, device=scores.device)
    return causal_density(select_blocks_for(scores, cfg, window, layer_idx), window, cfg.seer_block_size)


def causal_fill(scores):
    """``scores`` ``[..., NB, NB]`` with the entries above the diagonal set to :data:`MASKED_LOGIT`."""
    NB = scores.shape[-1]
    tril = torch.ones(NB, NB, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~tril, MASKED_LOGIT)


def streaming_scores(B, HQ, NB, device):
    """Block logits of the "streaming" baseline (attention sink + most recent blocks): the
    sink block first, then blocks ranked by recency, so top-k keeps sink + k-1 recent."""
    i = torch.arange(NB, device=device)
    s = (i[None, :] - i[:, None]).float()  # 0 on the diagonal, more negative further back
    s[:, 0] = 1.0
    return causal_fill(s.expand(B, HQ, NB, NB))


def meanpool_scores(q, k, block_size, valid=None):
    """MoBA-like baseline: mean-pooled (post-RoPE) q . k per block pair, GQA-expanded."""
    qp = block_pool(q.float(), block_size, ("avg",), valid)
    kp = block_pool(k.float(), block_size, ("avg",), valid)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        kp = kp.repeat_interleave(group, dim=1)
    return causal_fill(torch.matmul(qp, kp.transpose(-1, -2)) / math.sqrt(q.shape[-1]))


def with_meanpool_prior(gate_logits, q, k, block_size, weight, valid=None):
    """The gate's block logits mixed with a training-free prior (``seer_meanpool_prior``):
    ``(1 - a) * log_softmax(gate) + a * log_softmax(mean-pooled q . k)`` per row, ``a = weight``
    in [0, 1]: the log of the geometric mixture of the gate's and the MoBA-like baseline's row
    distributions, so a block both rank high comes first and the scores every method reads keep
    the temperature of one distribution (a plain product is sharper: it starves the rules that
    read probabilities). ``a`` 0 returns the gate's logits unchanged, 1 ranks by the prior
    alone; the entries the gate masks stay masked. ``q`` / ``k`` after RoPE, as
    :func:`meanpool_scores` takes them (docs/experiments/gate_quality.md section 15)."""
    if not weight:
        return gate_logits
    prior = meanpool_scores(q, k, block_size, valid)
    out = (1 - weight) * torch.log_softmax(gate_logits.float(), -1) + weight * torch.log_softmax(prior, -1)
    return out.masked_fill(gate_logits <= MASKED_LOGIT / 2, MASKED_LOGIT)


def oracle_scores(pooled):
    """Oracle baselines: log of the true pooled attention map, so that the softmax used by
    the selection methods gives back the (row-normalised) map itself."""
    return causal_fill(torch.log(pooled.float().clamp_min(1e-30)))


# -- the selector registry ---------------------------------------------------------------

@dataclass
class ScoreInputs:
    """What a selector may read, for one layer's prefill.

    ``q`` ``[B, HQ, T, D]``, ``k`` / ``v`` ``[B, H, T, D]`` after RoPE; ``q_pre`` / ``k_pre``
    the same before RoPE (what the gate sees); ``block_size``; ``scale`` the softmax scale;
    ``gate`` the layer's AttnGate; ``valid`` bool ``[B, T]``, ``seq_bounds`` int32 ``[B, 2]``
    and ``gate_rope`` from the forward context (None without padding / gate RoPE);
    ``window`` the layer's sliding window in tokens (None: full causal); ``meanpool_prior``
    the prior's share in :func:`with_meanpool_prior` (the gate selector's; 0: the gate alone).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pre: torch.Tensor
    k_pre: torch.Tensor
    block_size: int
    scale: float
    gate: torch.nn.Module | None = None
    valid: torch.Tensor | None = None
    seq_bounds: torch.Tensor | None = None
    gate_rope: tuple | None = None
    window: int | None = None
    meanpool_prior: float = 0.0

    @property
    def num_blocks(self):
        return (self.q.shape[2] + self.block_size - 1) // self.block_size


@dataclass(frozen=True)
class Selector:
    """One entry of :data:`SELECTORS`.

    Args:
        name: the ``seer_selector`` value.
        scores: ``fn(ScoreInputs) -> float [B, HQ, NB, NB]`` block logits (causal; masked
            entries at :data:`MASKED_LOGIT`).
        label: its name in tables and plots.
        trained: it reads the learned gate (False: a training-free baseline).
        exact_pass: it costs one exact attention pass (the oracles).
        content_free: its scores depend on the block count only, so its density follows
            without a forward pass.
        baseline_methods: methods with which eval compares it at equal density.
    """

    name: str
    scores: Callable
    label: str
    trained: bool = False
    exact_pass: bool = False
    content_free: bool = False
    baseline_methods: tuple = ()


#: name -> :class:`Selector`, in table order.
SELECTORS: dict = {}


def register_selector(selector: Selector, replace=False) -> Selector:
    """Add ``selector`` to :data:`SELECTORS`; ValueError if its name is taken (unless
    ``replace``) or a baseline method is unknown."""
    if not isinstance(selector, Selector):
        raise TypeError(f"expected a Selector, got {type(selector).__name__}")
    if selector.name in SELECTORS and not replace:
        raise ValueError(f"selector {selector.name!r} is already registered")
    bad = [m for m in selector.baseline_methods if m not in SPARSITY_METHODS]
    if bad:
        raise ValueError(f"baseline_methods {bad} of selector {selector.name!r} are invalid: expected "
                         f"methods from {SPARSITY_METHODS}")
    SELECTORS[selector.name] = selector
    return selector


def get_selector(name) -> Selector:
    """The registered selector ``name``; ValueError naming the known ones otherwise."""
    if name not in SELECTORS:
        raise ValueError(f"selector {name!r} is not registered: expected one of {tuple(SELECTORS)}")
    return SELECTORS[name]


def baseline_pairs() -> tuple:
    """``(selector, method)`` of every baseline comparison, in table order: by method
    (:data:`SPARSITY_METHODS` order), then by registration."""
    pairs = [(s.name, m) for s in SELECTORS.values() for m in s.baseline_methods]
    return tuple(sorted(pairs, key=lambda p: SPARSITY_METHODS.index(p[1])))


def _oracle(pool_op):
    def scores(x):
        _, pooled = attn_with_pooling(x.q, x.k, x.v, True, x.scale, x.block_size, seq_bounds=x.seq_bounds,
                                      pool_op=pool_op, window=x.window)
        return oracle_scores(pooled)
    return scores


register_selector(Selector("gate", lambda x: with_meanpool_prior(
    x.gate(x.q_pre, x.k_pre, rope=x.gate_rope, valid=x.valid), x.q, x.k, x.block_size, x.meanpool_prior, x.valid),
    "Seer gate", trained=True))
register_selector(Selector("streaming", lambda x: streaming_scores(x.q.shape[0], x.q.shape[1], x.num_blocks,
                                                                   x.q.device),
                           "sink + recent blocks (streaming)", content_free=True, baseline_methods=("nz_ratio",)))
register_selector(Selector("oracle_max", _oracle("max"), "true max-pooled map", exact_pass=True,
                           baseline_methods=("nz_ratio",)))
register_selector(Selector("oracle_mass", _oracle("sum"), "true block attention mass", exact_pass=True,
                           baseline_methods=("nz_ratio", "coverage")))
register_selector(Selector("meanpool", lambda x: meanpool_scores(x.q, x.k, x.block_size, x.valid),
                           "mean-pooled q.k (MoBA-like)", baseline_methods=("nz_ratio",)))


# -- decode steps ------------------------------------------------------------------------

#: How a decode step picks its KV blocks: a token budget, a share of the sequence's blocks,
#: a threshold on the decode gate's softmaxed scores, or the best blocks until their softmaxed
#: scores (the predicted attention mass) reach a target.
DECODE_METHODS = ("budget", "share", "threshold", "mass")
#: The methods whose kept count is decided per row from the scores (the others fix it per step).
DECODE_SCORE_METHODS = ("threshold", "mass")
#: What scores the cache's blocks at a decode step: the decode gate, or for comparison the
#: step's true attention (:func:`decode_oracle_scores`) or recency (:func:`decode_recency_scores`).
DECODE_SELECTORS = ("gate", "oracle", "streaming")
#: How the pooled-K cache stores the decode gate's block keys: in the model's dtype, or in 8 bits with one float32
#: scale per block (float8 e4m3 or int8: the formats of ``kernels.decode_select.EIGHT_BIT_KEYS``): half the bytes
#: the gate's scoring reads at every decode step, within 0.06% of the 16-bit keys' decode perplexity on a CPU screen
#: (docs/experiments/decode_host_time.md, session 45)
DECODE_KEY_FORMATS = ("model", *EIGHT_BIT_KEYS)
#: ``seer_decode_key_format``'s default since session 47: int8 (any device; float8 needs float8 loads), within 0.04%
#: of the 16-bit keys' decode perplexity at issue 15's protocol on an H100 and the same passkey (lost 0 of 75), the
#: 15% gate bound met at 16 x 32k there (14.2%) (docs/experiments/decode_quality.md, session 47)
DEFAULT_DECODE_KEY_FORMAT = "i8"


@torch.no_grad()
def decode_oracle_scores(q, k, lens, scale, block_size, num_blocks, seq_starts=None):
    """The oracle's decode logits ``[B, H, num_blocks]``: log of each block's attention mass at
    this step, the new token's softmax over the cache summed per block and over the query
    heads of each KV head's group (the decode gate's distillation target, exact).

    Args:
        q: the new token's post-RoPE queries ``[B, HQ, 1, D]``; k: the KV cache's keys
            ``[B, H, S, D]`` (slots from ``lens`` on are ignored).
        lens: int ``[B]`` cache length of each sequence (the new token included);
        seq_starts: int ``[B]`` first real slot (left padding before it), or None.
        num_blocks: the width of the logits (blocks past ``S`` score -inf).
    """
    B, HQ, _, D = q.shape
    H = k.shape[1]
    S = min(k.shape[2], num_blocks * block_size)
    pos = torch.arange(S, device=q.device)
    ok = pos[None, :] < lens.to(q.device).long()[:, None]
    if seq_starts is not None:
        ok = ok & (pos[None, :] >= seq_starts.to(q.device).long()[:, None])
    qg = q.reshape(B, H, HQ // H, D).float() * scale
    s = torch.matmul(qg, k[:, :, :S].float().transpose(-1, -2))  # [B, H, group, S]
    p = torch.softmax(s.masked_fill(~ok[:, None, None], float("-inf")), dim=-1).sum(2)
    p = torch.nn.functional.pad(p, (0, num_blocks * block_size - S)).view(B, H, num_blocks, block_size).sum(-1)
    return p.clamp_min(torch.finfo(torch.float32).tiny).log()  # finite: the selection's +-inf bias decides


def decode_recency_scores(B, H, num_blocks, device):
    """Streaming's decode logits ``[B, H, num_blocks]``: later blocks first."""
    return torch.arange(num_blocks, device=device, dtype=torch.float32).expand(B, H, num_blocks)


def decode_full_blocks(first_block, current, width):
    """Bool ``[B, 1, width]``: each sequence's full blocks at a decode step, from its sink block
    ``first_block`` (long ``[B]``) to the one before the current block ``current`` (an int, or a
    0-dim device tensor in graph mode): what :func:`with_decode_meanpool_prior`'s distributions span."""
    j = torch.arange(width, device=first_block.device)
    return ((j[None, :] >= first_block[:, None]) & (j[None, :] < current))[:, None]


def reads_every_block(cfg):
    """Whether ``cfg``'s decode selection keeps every block whatever the scores (``seer_decode_method``
    "share" at ``seer_decode_share >= 1``): the step then reads the whole cache without scoring
    (:func:`decode_every_block`), as dense decode through the sparse kernel."""
    return cfg.seer_decode_method == "share" and cfg.seer_decode_share >= 1.0


def decode_every_block(first_block, current, width, num_heads):
    """``(idx, cnt)`` of a decode step that reads every block of each sequence: int32 ``[B, num_heads,
    width]`` block indices from the sequence's sink block ``first_block`` (long ``[B]``) on, and int32
    ``[B, num_heads]`` counts up to the current block ``current`` (an int, or a 0-dim device tensor in
    graph mode) included; ``width``: the step's blocks (the current one + 1, or the cache's capacity)."""
    j = torch.arange(width, device=first_block.device)
    idx = (first_block[:, None] + j[None, :]).clamp_max(width - 1).to(torch.int32)
    cnt = (current + 1 - first_block).to(torch.int32)
    return idx[:, None].expand(-1, num_heads, -1).contiguous(), cnt[:, None].expand(-1, num_heads).contiguous()


def with_decode_meanpool_prior(logits, q, means, full, scale, weight):
    """A decode step's block logits mixed with the training-free mean-pooled prior
    (``seer_decode_meanpool_prior``): ``(1 - a) * log p_gate + a * log p_meanpool`` over the
    sequence's full blocks, ``a = weight`` in (0, 1]; ``p_gate`` the softmax of ``logits``, ``p_meanpool``
    each query head's softmax of ``q . (block's mean key) * scale`` averaged over the KV head's
    group (a MoBA-like score per KV head, as the gate's selection is shared by the group). The
    other blocks (padding, the current block, and in graph mode the ones past it) score 0:
    the selection's bias decides them. docs/experiments/decode_quality.md, session 36. Computed by
    :func:`~seer_attn.kernels.decode_select.prior_mix` (two launches on a GPU, its torch reference
    elsewhere).

    Args:
        logits: the decode gate's ``[B, H, N]``; q: the new token's post-RoPE queries ``[B, HQ, 1, D]``;
        means: the blocks' mean post-RoPE keys ``[B, H, N, D]`` (:func:`block_pool` ``("avg",)``, padding
            left out, as the pooled-K cache keeps them);
        full: bool ``[B, 1, N]``, the sequence's full blocks (:func:`decode_full_blocks`; none: every entry 0).
    """
    return prior_mix(logits, q, means, full, scale, weight)


def prepare_decode_selection(first_block, num_candidates, method, budget=2048, share=0.1, block_size=64,
                             num_heads=1, first_block_host=None, keep_local=0):
    """What :func:`select_decode_blocks` needs besides the scores, for one decode step of a
    batch: the same for every layer, so a model makes it once per step.

    Args:
        first_block: long ``[B]``, each sequence's sink block (its first block holding a real token).
        num_candidates: NC, the full blocks before the current block (whose index is NC).
        num_heads: KV heads (the width of ``cnt``).
        first_block_host: ``first_block`` as a list of ints (optional, no device sync): when
            every row keeps all ``k`` top-k entries, the top-k need not sort them.
        keep_local: the full blocks before the current one that are always kept, as the sink.

    Returns a dict: ``bias`` float32 ``[B, 1, NC + 1]`` added to the scores (-inf on
    left-padding blocks; for the top-k methods +inf on the sink, the ``keep_local`` blocks and
    the current block, which top-k then lists first; for ``threshold`` and ``mass`` -inf on
    the current block, left out of the softmax), ``forced`` bool ``[B, 1, NC + 1]`` (those
    blocks; ``threshold`` and ``mass`` only), ``k``
    the top-k width, ``cnt`` int32 ``[B, num_heads]`` the blocks each row keeps (top-k
    methods; ``threshold`` and ``mass`` count per head) and ``sorted``: whether the top-k must list its
    entries best first (a row keeps fewer than ``k``: its kept ones must come first)."""
    NC = num_candidates
    dev = first_block.device
    first_block = first_block.long()
    j = torch.arange(NC + 1, device=dev)
    padding = (j[None, :] < first_block[:, None])[:, None]  # [B, 1, NC + 1]
    forced = ((j[None, :] == first_block[:, None]) | (j[None, :] >= NC - keep_local))[:, None] & ~padding
    bias = torch.zeros(padding.shape, device=dev).masked_fill_(padding, float("-inf"))
    out = {"method": method, "k": NC + 1, "cnt": None, "forced": None, "sorted": True}
    n = NC + 1 - first_block  # the sequence's blocks, the current one included
    least = 2 + keep_local  # the forced blocks: sink, local, current
    if method == "budget":
        out["k"] = min(NC + 1, max(least, budget // block_size))
        cnt = n.clamp_max(out["k"])
    elif method == "share":
        out["k"] = min(NC + 1, max(least, math.ceil(share * (NC + 1))))
        cnt = torch.minimum(torch.ceil(share * n.double()).long().clamp_min(least), n).clamp_max(out["k"])
    elif method in DECODE_SCORE_METHODS:
        out["forced"] = forced
        bias.masked_fill_(j == NC, float("-inf"))
    else:
        raise ValueError(f"decode method must be one of {DECODE_METHODS}, got {method!r}")
    if method not in DECODE_SCORE_METHODS:
        bias.masked_fill_(forced, float("inf"))
        out["cnt"] = cnt.to(torch.int32)[:, None].expand(-1, num_heads).contiguous()
        if first_block_host is not None:  # the same counts on the host: does every row keep all k?
            ns = [NC + 1 - f for f in first_block_host]
            keep = [min(n, out["k"]) for n in ns] if method == "budget" else \
                [min(max(least, math.ceil(share * n)), n, out["k"]) for n in ns]
            out["sorted"] = min(keep) < out["k"]
    out["bias"] = bias
    return out


def mass_counts(s, forced, idx, mass):
    """The kept count per row ``[B, H]`` (int32) of the ``mass`` method: the forced blocks, then
    the best-ranked others while the softmaxed scores of the blocks ranked before them sum to
    less than ``mass``.

    Args:
        s: biased logits ``[B, H, NB]`` (-inf on the blocks never kept: padding, the current block).
        forced: bool ``[B, 1, NB]`` the blocks always kept.
        idx: ``[B, H, NB]`` the blocks ranked forced first, then by ``s`` (a sorted top-k).
    """
    n_forced = forced.sum(-1, dtype=torch.int32)  # [B, 1]
    rank = torch.arange(s.shape[-1], device=s.device)
    more = (s.gather(-1, idx) > float("-inf")) & (rank >= n_forced[..., None])  # never padding or current
    if mass < 1.0:  # 1 reads every block (the float32 sum may reach 1 before the last)
        prob = torch.softmax(s, dim=-1).gather(-1, idx)  # a row without a full block: NaN, keeps the forced
        more &= prob.cumsum(-1) - prob < mass  # the predicted mass of the better-ranked blocks
    return n_forced + more.sum(-1, dtype=torch.int32)


def select_decode_blocks(scores, first_block, method, budget=2048, share=0.1, threshold=1e-3, block_size=64,
                         prepared=None, keep_local=0, mass=0.9):
    """The KV blocks one decode step reads, per KV head (shared by its query group).

    Args:
        scores: float ``[B, H, NC + 1]`` decode-gate logits of the blocks ``0 .. NC``: the full
            blocks before the current block, then the current block (index NC; its value is
            ignored: the block is always read).
        first_block: long ``[B]``, each sequence's first block holding a real token (blocks
            before it are left padding): the sink block.
        method: ``"budget"`` keeps ``max(2, budget // block_size)`` blocks; ``"share"`` keeps
            ``max(2, ceil(share * n))`` of the sequence's n blocks (the current one included);
            ``"threshold"`` keeps the blocks whose score, softmaxed over the full blocks, is
            >= ``threshold``; ``"mass"`` keeps the best-scoring blocks until their softmaxed
            scores (the predicted share of the step's attention) reach ``mass``, so a row with
            concentrated scores reads few blocks and a flat one many. The sink and the current
            block are always kept (and count in the budget, the share and the mass), and so are
            the ``keep_local`` full blocks before the current one.
        prepared: :func:`prepare_decode_selection` of the same step (made here when None).

    Returns:
        ``(idx, cnt)``: long ``[B, H, K]`` block lists for :func:`block_sparse_decode` and int32
        ``[B, H]`` the number of kept blocks: the first ``cnt`` entries of a row are its kept
        blocks (the sink and the current block among them), the entries after them are not read.
    """
    B, H, NC1 = scores.shape
    if prepared is None:
        prepared = prepare_decode_selection(first_block.to(scores.device), NC1 - 1, method, budget, share,
                                            block_size, H, keep_local=keep_local)
    s = scores + prepared["bias"]  # float32 (the bias's dtype wins)
    if method not in DECODE_SCORE_METHODS:
        return torch.topk(s, prepared["k"], dim=-1, sorted=prepared["sorted"]).indices, prepared["cnt"]
    return score_selection(s, prepared["forced"], prepared["k"], method, threshold, mass)


def score_selection(s, forced, k, method, threshold, mass):
    """``(idx, cnt)`` of the methods that count per row (``threshold``, ``mass``) from the biased
    logits ``s`` ``[B, H, NB]`` (float32) and the forced blocks ``[B, 1, NB]``: the kept blocks
    are the best-scoring ones, so a sort (forced first) lists them first."""
    idx = torch.topk(s.masked_fill(forced, float("inf")), k, dim=-1, sorted=True).indices
    if method == "mass":
        return idx, mass_counts(s, forced, idx, mass)
    keep = (torch.softmax(s, dim=-1) >= threshold) | forced  # NaN (no full block) keeps nothing
    return idx, keep.sum(-1, dtype=torch.int32)
