"""The Seer layer tier: everything of SeerAttention that no model family owns.

A family (``configuration_seer_X.py`` + ``modeling_seer_X.py``, one row of
:mod:`.families`) composes transformers' own classes with these pieces:

- :class:`SeerAttentionMixin` on the attention module: its forward computes q/k/v
  ``[B, H, T, D]`` (keeping q/k before RoPE for the gate), applies RoPE and the cache, then
  calls :meth:`~SeerAttentionMixin.seer_attention`, the one place where the modes are
  dispatched (``config.seer_mode``):

  - ``dense``: the family's attention interface (same logits as the stock model);
  - ``distill``: prefill attention from :func:`attn_with_pooling`; the gate's KL loss
    against the pooled map is collected for ``outputs.gate_loss`` (LM loss unchanged);
  - ``sparse``: selector scores -> block mask -> :func:`block_sparse_attn` at prefill (at
    ``nz_ratio`` 1, every causal block: no scores, the same kernels' dense variant
    :func:`dense_attn`). The recompute of an activation-checkpointed layer reuses the mask
    of its forward (``SeerForwardContext.layer_masks``).
    Layers named in the context's ``gate_loss_layers`` also compute their gate's KL loss
    against the exact pooled map (fine-tuning with sparse attention while the gates learn).

  Decode steps and chunked prefill (queries shorter than keys) attend densely to the cache,
  unless ``config.seer_decode_sparsity``: then every forward with a KV cache records the
  pooled-K cache (:mod:`.decode_cache`) and a decode step (one new token) reads only the
  KV blocks its decode gate selects (:func:`block_sparse_decode`).
- :class:`SeerModelMixin` on the base model: builds the per-forward
  :class:`SeerForwardContext` (padding bounds, gate RoPE at block positions).
- :class:`SeerPreTrainedMixin` and :class:`SeerCausalLMMixin`: gate init, modes, density,
  gate save/load, ``gate_loss`` output, saving with the remote-code bundle and loading
  gates-only checkpoints onto their base (:mod:`.gates_only`).

Copied flat into saved folders (remote code): imports only torch/transformers; package
imports are rewritten flat by ``remote_bundle.py``.
"""
import functools
import inspect
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from seer_attn.kernels.block_mask import window_block_mask
from seer_attn.kernels.block_sparse_attn import attn_with_pooling, block_sparse_attn, dense_attn
from seer_attn.kernels.block_sparse_decode import block_sparse_decode

from .decode_cache import decode_step_for, prompt_padding
from .decode_graph import GraphDecodeStep, graph_generate
from .decode_gate import (DecodeGate, decode_block_target, decode_candidates, decode_distill_loss, decode_forced_blocks,
                          sample_decode_rows)
from .gate import AttnGate, gate_distill_loss
from .gates_only import is_gates_only, load_gates_only, peek_config
from .hub_utils import hub_call, resolve_source
from .merged_projections import merge as merge_projections, mlp_forward, qkv as project_qkv, still_merged
from .remote_bundle import write_remote_code
from .selection import (ScoreInputs, block_pool, causal_density, decode_oracle_scores, decode_recency_scores,
                        get_selector, keep_rule_floor, reads_every_block, select_blocks_for, window_fill,
                        with_decode_meanpool_prior, with_meanpool_prior)

logger = logging.getLogger(__name__)

GATES_FILE = "seer_gates.safetensors"
#: name of the decode gate module inside each layer's ``attn_gate``
DECODE_GATE = "decode_gate"


@dataclass
class SeerForwardContext:
    """Per-forward state shared by all layers (created by the model, passed as a kwarg).

    ``seq_bounds``: int32 ``[B, 2]`` real-token (start, end) per row, or None without
    padding; ``valid``: bool ``[B, T]`` or None; ``gate_rope``: ``(cos, sin)`` ``[B, NB, G]``.
    Layers append their gate losses (distill) and block densities ``[B, HQ]`` (sparse).
    ``decode``: the :class:`~.decode_cache.DecodeStep` of a forward with a KV cache under
    ``seer_decode_sparsity``; ``decode_rows`` long ``[B, R]`` and ``decode_rope`` ``(cos, sin)``
    ``[B, R, G]``: the query rows the decode gates are distilled on (distill mode, decode gates).
    ``gate_loss_layers``: in sparse mode, the layer indices whose gate also learns in this
    forward (its KL loss against the exact pooled map joins ``gate_losses``); the layers
    record themselves in ``gate_loss_done``, so that the recompute of a checkpointed layer
    runs no second exact pass. ``layer_masks``: layer index -> the block mask its sparse
    prefill used (None: every causal block), kept when the forward records a graph (q
    requires grad): the recompute of a checkpointed layer attends with that very mask instead
    of scoring and selecting again, and adds no second density. ``on_gate_scores``: called in
    distill mode by every layer with ``(layer index, block scores, window)``, the scores
    ``[B, HQ, NB, NB]`` detached and after the window fill, the window the layer's sliding
    window in tokens (None: full causal), which :func:`select_blocks_for` and
    :func:`causal_density` need. A context serves one forward pass (and the recompute of its
    checkpointed layers), never two. ``prefill_slots``: T when this forward is the prefill of
    T tokens into an empty static KV cache, whose layers return the whole cache: the prefill's
    keys are its first T slots.
    """

    seq_bounds: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    gate_rope: tuple | None = None
    gate_losses: list = field(default_factory=list)
    densities: list = field(default_factory=list)
    masks: list | None = None  # set to [] to record every layer's block mask
    forced_masks: list | None = None  # per-layer block masks to use instead of the selector
    decode: object = None
    decode_rows: torch.Tensor | None = None
    decode_rope: tuple | None = None
    gate_loss_layers: frozenset | None = None
    gate_loss_done: set = field(default_factory=set)
    layer_masks: dict = field(default_factory=dict)
    on_gate_scores: object = None
    prefill_slots: int | None = None


def padding_bounds(attention_mask, T):
    """From a 2D 0/1 mask, (valid [B, T], bounds [B, 2]) or (None, None) without padding."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != T:
        return None, None
    valid = attention_mask.bool()
    if bool(valid.all()):
        return None, None
    pos = torch.arange(T, device=valid.device)
    start = torch.where(valid, pos, T).amin(-1)
    end = torch.where(valid, pos + 1, 0).amax(-1)
    count = valid.sum(-1)
    holes = (count != (end - start).clamp_min(0)) & (count > 0)
    if bool(holes.any()):
        rows = holes.nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are not one contiguous run of ones; sparse/distill attention "
                         "supports left or right padding only")
    start = torch.where(count > 0, start, 0)
    end = torch.where(count > 0, end, 0)
    return valid, torch.stack([start, end], dim=-1).to(torch.int32)


def causal_sdpa(q, k, v, scaling):
    """Causal attention of ``q [B, HQ, T, D]`` over ``k, v [B, H, T, D]`` (GQA) through torch's SDPA:
    what density 1 runs when no sequence is padded and no window applies. On a GPU SDPA picks
    cuDNN or flash, which at small head sizes beat our dense kernel (SmolLM2, d64, H200: 0.64
    against 0.75 s per 32k-token fine-tuning step, results/finetune/h200_timing.json); the
    padded and windowed cases keep :func:`dense_attn`, whose bounds and window SDPA would need
    as a dense mask."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                            enable_gqa=q.shape[1] != k.shape[1])


#: torch.compile'd functions shared by every layer: ``(function, options) -> compiled``.
_COMPILED = {}


def compiled(fn, options):
    """``fn`` through ``torch.compile(dynamic=False, **options)``, compiled once per function and options."""
    key = (fn, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False, **options)
    return _COMPILED[key]


class SeerAttentionMixin:
    """Mixed into a family's attention module (before the stock class), which provides
    ``config``, ``layer_idx``, ``scaling`` and ``attention_dropout``."""

    def init_seer_gate(self, config):
        """Build this layer's :class:`AttnGate` (``self.attn_gate``) from the ``seer_*`` fields."""
        self.attn_gate = AttnGate(
            config.num_attention_heads, config.num_key_value_heads, self.head_dim,
            hidden_size=config.seer_gate_hidden_size, block_size=config.seer_block_size,
            q_pooling=config.seer_q_pooling, k_pooling=config.seer_k_pooling, use_rope=config.seer_gate_rope)
        self.init_seer_decode_gate(config)

    def init_seer_decode_gate(self, config):
        """With ``seer_decode_gate``, add this layer's :class:`DecodeGate` as ``attn_gate.decode_gate``
        (saved, loaded and trained with the prefill gate)."""
        if config.seer_decode_gate:
            self.attn_gate.add_module(DECODE_GATE, DecodeGate(
                config.num_attention_heads, config.num_key_value_heads, self.head_dim,
                hidden_size=config.seer_gate_hidden_size, k_pooling=config.seer_k_pooling,
                use_rope=config.seer_gate_rope))

    #: the q/k/v projections as one GEMM (:mod:`.merged_projections`; set by
    #: :meth:`SeerCausalLMMixin.seer_merge_projections`)
    _seer_qkv = None
    #: torch.compile options of the layer's work around the kernels (set by
    #: :meth:`SeerCausalLMMixin.seer_compile_pointwise`; None: eager)
    _seer_compile = None
    #: the family's RoPE ``(q, k, cos, sin) -> (q, k)`` (each family's attention class sets it)
    seer_rope_fn = None

    def seer_project(self, hidden_states):
        """q and k before RoPE (what the gate sees) and v, each ``[B, heads, T, D]``, from the
        layer's normed input ``[B, T, hidden]``: the q/k/v projections (bias where the family
        has one; one GEMM after :meth:`SeerCausalLMMixin.seer_merge_projections`). Families
        with per-head q/k norms (Qwen3) override it."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        return tuple(t.view(hidden_shape).transpose(1, 2) for t in project_qkv(self, hidden_states))

    def seer_rotary(self, q, k, position_embeddings):
        """The family's RoPE (:attr:`seer_rope_fn`), compiled after
        :meth:`SeerCausalLMMixin.seer_compile_pointwise` (one fused kernel instead of a
        chain of elementwise ones)."""
        rope_fn = self.seer_rope_fn
        if self._seer_compile is not None:
            rope_fn = compiled(rope_fn, self._seer_compile)
        return rope_fn(q, k, *position_embeddings)

    def seer_attention(self, q, k, v, q_pre, k_pre, attention_mask, seer_ctx, eager_attention, **kwargs):
        """Attention in ``config.seer_mode``.

        Args:
            q: ``[B, HQ, Tq, D]`` after RoPE; k, v: ``[B, H, Tk, D]`` after RoPE and the cache
                (KV heads not repeated).
            q_pre, k_pre: q and k before RoPE (what the gate sees; family-specific norms applied).
            attention_mask, kwargs: as the family's attention interface takes them (dense path);
                ``sliding_window`` among them (tokens, or None) is the layer's window in every mode.
            seer_ctx: the :class:`SeerForwardContext` of this forward (needed at sparse/distill prefill).
            eager_attention: the family's eager attention function (the interface's fallback).

        Returns:
            ``(output [B, Tq, HQ, D], attention weights or None)``.
        """
        mode = self.config.seer_mode
        step = seer_ctx.decode if seer_ctx is not None else None
        if step is not None:  # decode sparsity: the pooled-K cache sees every forward's keys
            step.record(self.layer_idx, k_pre, getattr(self.attn_gate, DECODE_GATE), k)
            if step.sparse and q.shape[2] == 1 and getattr(self, "sliding_window", None) is None:
                return self._seer_decode(q, k, v, q_pre, step), None  # (sliding-window layers decode densely)
        if mode != "dense" and seer_ctx is not None and seer_ctx.prefill_slots == q.shape[2] < k.shape[2]:
            k, v = k[:, :, :q.shape[2]], v[:, :, :q.shape[2]]  # a static cache's prefill: its first T slots
        if mode != "dense" and q.shape[2] == k.shape[2]:  # prefill: the gate and the kernels
            if seer_ctx is None:
                raise ValueError(f"{type(self).__name__} in seer_mode {mode!r} needs the seer_ctx built by the "
                                 "model's forward")
            return self._seer_prefill(mode, q, k, v, q_pre, k_pre, seer_ctx, kwargs.get("sliding_window")), None
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        return interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                         scaling=self.scaling, **kwargs)

    def _seer_prefill(self, mode, q, k, v, q_pre, k_pre, ctx, window=None):
        cfg = self.config
        if not q.dtype == k.dtype == v.dtype:  # e.g. autocast: RoPE in fp32, v in bf16
            q, k = q.to(v.dtype), k.to(v.dtype)
        if mode == "distill":
            loss_scores, selected = self._gate_scores(q, k, q_pre, k_pre, ctx, window,
                                                      select=ctx.on_gate_scores is not None)
            if ctx.on_gate_scores is not None:
                ctx.on_gate_scores(self.layer_idx, selected, window)
            pool_op = "max" if cfg.seer_distill_target == "max" else "sum"
            out, pooled = attn_with_pooling(q, k, v, True, self.scaling, cfg.seer_block_size,
                                            seq_bounds=ctx.seq_bounds, pool_op=pool_op, window=window)
            ctx.gate_losses.append(gate_distill_loss(loss_scores, pooled, peak_weight=cfg.seer_distill_peak_weight))
            if ctx.decode_rows is not None and hasattr(self.attn_gate, DECODE_GATE):
                ctx.gate_losses.append(self._decode_distill_loss(q, k, q_pre, k_pre, ctx))
            return out.transpose(1, 2)
        # nz_ratio 1 (or a layer among the first seer_dense_layers) keeps every causal block
        # (every block the window reaches) whatever the scores say: no scores are computed,
        # and SDPA (unpadded, no window) or the kernels' dense variant runs
        every_block = ctx.forced_masks is None and (self.layer_idx < cfg.seer_dense_layers or (
            cfg.seer_sparsity_method == "nz_ratio" and cfg.seer_nz_ratio >= 1.0))
        recompute = self.layer_idx in ctx.layer_masks
        if recompute:  # activation checkpointing: the mask of this layer's forward
            mask = ctx.layer_masks[self.layer_idx]
        elif ctx.forced_masks is not None:
            mask = ctx.forced_masks[self.layer_idx]
        elif ctx.gate_loss_layers is not None and self.layer_idx in ctx.gate_loss_layers \
                and self.layer_idx not in ctx.gate_loss_done:
            mask = self._gate_loss_and_mask(q, k, v, q_pre, k_pre, ctx, window)
        elif every_block:
            mask = None
        else:
            select = _selection
            if self._seer_compile is not None and cfg.seer_selector == "gate":  # one graph, not ~50 launches
                select = compiled(_selection, self._seer_compile)
            with torch.no_grad():
                mask = select(self, q, k, v, q_pre, k_pre, ctx.valid, ctx.seq_bounds, ctx.gate_rope, window)
        if every_block and window is None and ctx.seq_bounds is None:
            out = causal_sdpa(q, k, v, self.scaling)
        elif every_block:  # (no index lists, larger tiles)
            out = dense_attn(q, k, v, True, self.scaling, cfg.seer_block_size, seq_bounds=ctx.seq_bounds,
                             window=window)
        else:
            out = block_sparse_attn(q, k, v, mask, True, self.scaling, cfg.seer_block_size,
                                    seq_bounds=ctx.seq_bounds, window=window)
        if recompute:
            return out.transpose(1, 2)
        if torch.is_grad_enabled() and q.requires_grad:  # a recompute may follow (see SeerForwardContext)
            ctx.layer_masks[self.layer_idx] = mask
        B, HQ, T = q.shape[:3]
        if mask is None:
            ctx.densities.append(torch.ones(B, HQ, dtype=torch.float32, device=q.device))
        else:
            ctx.densities.append(causal_density(mask, window, cfg.seer_block_size))
        if ctx.masks is not None:
            if mask is None:
                NB = (T + cfg.seer_block_size - 1) // cfg.seer_block_size
                mask = window_block_mask(NB, window, cfg.seer_block_size, q.device).expand(B, HQ, NB, NB).clone()
            ctx.masks.append(mask)
        return out.transpose(1, 2)

    def _seer_decode(self, q, k, v, q_pre, step):
        """One decode step through the decode gate (or ``seer_decode_selector``'s comparison):
        score the cache's full blocks, select (``seer_decode_method``; sink, ``seer_decode_keep_local``
        and current block always), read only those blocks. What
        every layer of the step shares (RoPE, lengths, the selection's bias and counts) is made
        once, in ``step``; a layer adds a few ops: project and score (:meth:`DecodeGate.step_logits`),
        top-k, the kernel (``step.gate_select`` may score and select in one launch instead: graph steps
        with a budget or share and no prior, when ``decode_graph.ONE_LAUNCH_GATE`` is on). At
        ``seer_decode_share >= 1`` nothing is scored: the kernel reads every block (dense decode)."""
        cfg = self.config
        if not q.dtype == k.dtype == v.dtype:
            q, k = q.to(v.dtype), k.to(v.dtype)
        gate = getattr(self.attn_gate, DECODE_GATE)
        with torch.no_grad():
            keys = step.gate_keys(self.layer_idx)  # None before the first block fills
            width = keys.shape[2] if keys is not None else 1  # the blocks the step scores
            picked = None  # (idx, cnt) when the gate scores and selects in one launch, or every block is read
            if reads_every_block(cfg):  # no scores: dense decode through the kernel
                picked = step.every_block(k.shape[1])
            elif cfg.seer_decode_selector == "oracle":
                logits = decode_oracle_scores(q, k, step.lens, self.scaling, cfg.seer_block_size, width,
                                              step.seq_starts)
            elif cfg.seer_decode_selector == "streaming":
                logits = decode_recency_scores(k.shape[0], k.shape[1], width, q.device)
            elif keys is not None:
                if not cfg.seer_decode_meanpool_prior:  # one launch where the step offers it
                    picked = step.gate_select(gate, q_pre, keys, cfg)
                if picked is None:
                    scales = step.key_scales(self.layer_idx)  # 8-bit keys' (seer_decode_key_format), or None
                    logits = gate.step_logits(q_pre, keys, step.q_rope(gate.step_dtype(q_pre, keys)),
                                              scales).squeeze(2)
                    if cfg.seer_decode_meanpool_prior:
                        logits = with_decode_meanpool_prior(logits, q, step.block_means(self.layer_idx),
                                                            step.full_blocks(width), self.scaling,
                                                            cfg.seer_decode_meanpool_prior)
            else:
                logits = torch.zeros(k.shape[0], k.shape[1], 1, device=q.device)
            idx, cnt = picked if picked is not None else step.select(logits, cfg)
        out = block_sparse_decode(q, k, v, idx, step.lens, self.scaling, cfg.seer_block_size,
                                  seq_starts=step.seq_starts, block_counts=cnt, check_lengths=False)
        step.note_kept(cnt)
        return out.transpose(1, 2)

    def _decode_distill_loss(self, q, k, q_pre, k_pre, ctx):
        """The decode gate's KL loss on the sampled rows ``ctx.decode_rows`` (:mod:`.decode_gate`)."""
        cfg = self.config
        bs = cfg.seer_block_size
        B, _, T, _ = q.shape
        gate = getattr(self.attn_gate, DECODE_GATE)
        rows = ctx.decode_rows.to(q.device)
        bounds = ctx.seq_bounds.long() if ctx.seq_bounds is not None else \
            torch.tensor([[0, T]], device=q.device).expand(B, 2)
        target = decode_block_target(q, k, rows, self.scaling, bs, bounds=bounds if ctx.seq_bounds is not None else None)
        kg = gate.block_keys(block_pool(k_pre.detach(), bs, gate.k_pooling, ctx.valid), rope=ctx.gate_rope)
        qr = q_pre.detach().gather(2, rows.clamp_min(0)[:, None, :, None].expand(B, q_pre.shape[1], -1, q_pre.shape[3]))
        scores = gate.scores(gate.query(qr, rope=ctx.decode_rope), kg)
        cand = decode_candidates(rows, bounds[:, 0] // bs, kg.shape[2], bs)
        if not cfg.seer_decode_distill_forced:  # rank only the blocks a step's selection decides
            cand = cand & ~decode_forced_blocks(rows, bounds[:, 0] // bs, kg.shape[2], bs, cfg.seer_decode_keep_local)
        return decode_distill_loss(scores, target, cand)

    def _gate_loss_and_mask(self, q, k, v, q_pre, k_pre, ctx, window=None):
        """Sparse prefill of a layer in ``ctx.gate_loss_layers``: the gate's KL loss against
        the exact pooled map of this forward joins ``ctx.gate_losses`` (inputs detached: it
        trains the gate only), with the decode gate's loss when the layer has one (as in
        distillation), and the block mask comes from the same scores (None, every block, in
        one of the first ``seer_dense_layers``)."""
        cfg = self.config
        if cfg.seer_selector != "gate":
            raise ValueError(f"gate_loss_layers needs seer_selector='gate', got {cfg.seer_selector!r}")
        ctx.gate_loss_done.add(self.layer_idx)
        # What the loss saves for backward is kept as is, outside activation checkpointing's
        # save-and-recompute: the recompute of a checkpointed layer then reuses the mask alone.
        dense = self.layer_idx < cfg.seer_dense_layers  # the gate still learns; the layer attends to every block
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            loss_scores, selected = self._gate_scores(q, k, q_pre, k_pre, ctx, window, select=not dense)
            with torch.no_grad():
                _, pooled = attn_with_pooling(q.detach(), k.detach(), v.detach(), True, self.scaling,
                                              cfg.seer_block_size, seq_bounds=ctx.seq_bounds,
                                              pool_op="max" if cfg.seer_distill_target == "max" else "sum",
                                              window=window)
            ctx.gate_losses.append(gate_distill_loss(loss_scores, pooled))
            if ctx.decode_rows is not None and hasattr(self.attn_gate, DECODE_GATE):  # its inputs detached too
                ctx.gate_losses.append(self._decode_distill_loss(q, k, q_pre, k_pre, ctx))
        if dense:
            return None
        with torch.no_grad():
            return select_blocks_for(selected, cfg, window, self.layer_idx)

    def _gate_scores(self, q, k, q_pre, k_pre, ctx, window, select):
        """The gate's logits for its loss (distill mode, gate-loss layers) and, with ``select``, the
        scores a sparse prefill selects from (else None): the window-filled logits with
        ``seer_meanpool_prior`` mixed in (the prior keeps the filled entries masked), detached.
        The loss reads the mixture under ``seer_distill_prior``, the gate's own logits otherwise.
        Inputs detached: the gate learns to predict the model's attention; its loss must never
        move the base weights (they stay frozen in post-training either way)."""
        cfg = self.config
        scores = self.attn_gate(q_pre.detach(), k_pre.detach(), rope=ctx.gate_rope, valid=ctx.valid)
        scores = window_fill(scores, window, cfg.seer_block_size)  # the gate ranks only reachable blocks
        if not (select or cfg.seer_distill_prior):
            return scores, None
        mixed = with_meanpool_prior(scores if cfg.seer_distill_prior else scores.detach(), q.detach(), k.detach(),
                                    cfg.seer_block_size, cfg.seer_meanpool_prior, ctx.valid)
        return (mixed if cfg.seer_distill_prior else scores), mixed.detach()

    def block_scores(self, q, k, v, q_pre, k_pre, ctx, window=None):
        """Block logits ``[B, HQ, NB, NB]`` of the registered selector ``config.seer_selector``
        (shapes as in :meth:`seer_attention`; ``window``: the layer's sliding window)."""
        return _block_scores(self, q, k, v, q_pre, k_pre, ctx.valid, ctx.seq_bounds, ctx.gate_rope, window)


def _block_scores(attn, q, k, v, q_pre, k_pre, valid, seq_bounds, gate_rope, window):
    """:meth:`SeerAttentionMixin.block_scores` with the context's tensors as arguments."""
    cfg = attn.config
    return get_selector(cfg.seer_selector).scores(ScoreInputs(
        q, k, v, q_pre, k_pre, cfg.seer_block_size, attn.scaling, gate=attn.attn_gate, valid=valid,
        seq_bounds=seq_bounds, gate_rope=gate_rope, window=window, meanpool_prior=cfg.seer_meanpool_prior))


def _selection(attn, q, k, v, q_pre, k_pre, valid, seq_bounds, gate_rope, window):
    """The block mask of a sparse prefill (scores, then :func:`select_blocks_for`): a function
    of tensors, which ``seer_compile_pointwise`` compiles for the gate selector."""
    return select_blocks_for(_block_scores(attn, q, k, v, q_pre, k_pre, valid, seq_bounds, gate_rope, window),
                             attn.config, window, attn.layer_idx)


def _keep(t):
    return t


def _check_density_floor(cfg, T):
    """Warn (once per setting and length) when the density knob asks a sparse prefill of ``T``
    tokens for less than the keep rules keep anyway: every layer then keeps only the forced
    blocks (sink, local, diagonal, dense last rows) and none that the selector scored, i.e.
    streaming's selection. Host arithmetic only; skipped under torch.compile and where a
    sliding window shorter than ``T`` changes the floor."""
    if (cfg.seer_mode != "sparse" or cfg.seer_sparsity_method != "density" or T <= cfg.seer_block_size
            or torch.compiler.is_compiling() or (getattr(cfg, "sliding_window", None) or T) < T):
        return
    _warn_under_floor(-(-int(T) // cfg.seer_block_size), cfg.seer_block_size, float(cfg.seer_density),
                      cfg.seer_keep_diagonal, cfg.seer_keep_sink, cfg.seer_keep_local, cfg.seer_dense_last_rows)


@functools.lru_cache(maxsize=64)
def _warn_under_floor(NB, block_size, density, keep_diagonal, keep_sink, keep_local, dense_last_rows):
    floor = keep_rule_floor(NB, keep_diagonal, keep_sink, keep_local, dense_last_rows)
    if density < floor:
        logger.warning(f"seer_density={density:g} is under the keep rules' floor {floor:.3f} at {NB * block_size} "
                       f"tokens ({NB} blocks): every layer keeps only the blocks the keep rules force (sink, local, "
                       "diagonal, dense last rows) and none the selector scored; ask for more than the floor or keep "
                       "fewer blocks by rule")


class SeerDecoderLayerMixin:
    """Mixed into a family's decoder layer (before the stock class).

    After :meth:`SeerCausalLMMixin.seer_compile_pointwise`, a prefill in a Seer mode without a
    KV cache (a training or scoring forward) runs the layer as two compiled graphs around the
    eager attention: (input norm, q/k/v projections, RoPE) and (output projection, residual,
    norm, MLP, residual), the stock layer's computation regrouped. Each piece compiled alone
    costs a compiled call, its guards and its autograd node in the forward, the recompute and
    the backward; a 32k SmolLM2 fine-tuning step waited on that host work
    (docs/experiments/finetune_step_time.md). A graph-mode decode step (``seer_generate``) runs
    the same two graphs around the cache writes (:meth:`.decode_graph.GraphDecodeStep.append`:
    one launch) and the sparse decode (fewer kernels in the replayed step). Any other forward
    is the stock layer's."""

    def forward(self, hidden_states, *args, **kwargs):
        attn = self.self_attn
        options, ctx, rope = attn._seer_compile, kwargs.get("seer_ctx"), kwargs.get("position_embeddings")
        cache = _kv_cache(kwargs)
        if options is not None and not args and rope is not None and isinstance(getattr(ctx, "decode", None),
                                                                                 GraphDecodeStep):
            # a graph-mode decode step: the same two graphs around the cache update and the sparse decode
            q, k, v, q_pre, k_pre = compiled(_layer_in, options)(self, hidden_states, *rope)
            k, v = ctx.decode.append(attn.layer_idx, cache, k, v, k_pre)  # one launch for the cache writes
            out, _ = attn.seer_attention(q, k, v, q_pre, k_pre, kwargs.get("attention_mask"), ctx, None)
            return compiled(_layer_out, options)(self, hidden_states, out)
        if options is None or args or ctx is None or ctx.decode is not None or rope is None or cache is not None \
                or attn.config.seer_mode == "dense":
            return super().forward(hidden_states, *args, **kwargs)
        q, k, v, q_pre, k_pre = compiled(_layer_in, options)(self, hidden_states, *rope)
        out, _ = attn.seer_attention(q, k, v, q_pre, k_pre, kwargs.get("attention_mask"), ctx, None,
                                     sliding_window=getattr(attn, "sliding_window", None))
        return compiled(_layer_out, options)(self, hidden_states, out)


def _layer_in(layer, hidden_states, cos, sin):
    """A decoder layer up to its attention: ``(q, k, v, q_pre, k_pre)``, q and k after RoPE in
    v's dtype (under autocast RoPE computes in float32; the cast the kernels need fuses here)."""
    attn = layer.self_attn
    q_pre, k_pre, v = attn.seer_project(layer.input_layernorm(hidden_states))
    q, k = attn.seer_rope_fn(q_pre, k_pre, cos, sin)
    return q.to(v.dtype), k.to(v.dtype), v, q_pre, k_pre


def _layer_out(layer, residual, attn_out):
    """A decoder layer after its attention (``attn_out`` ``[B, T, heads, D]``): output projection,
    residual, norm, MLP, residual."""
    h = residual + layer.self_attn.o_proj(attn_out.reshape(*residual.shape[:-1], -1))
    return h + mlp_forward(layer.mlp, layer.post_attention_layernorm(h))


def gate_rotary_config(config):
    """A copy of ``config`` whose ``head_dim`` is the gate width: the family's rotary
    embedding built from it gives the gate's RoPE table."""
    gate_cfg = config.__class__.from_dict(config.to_dict())
    gate_cfg.head_dim = config.seer_gate_hidden_size
    return gate_cfg


def gates_file(path, **hub_kwargs) -> str:
    """The local gates file of ``path`` (a ``.safetensors`` file, a folder holding
    :data:`GATES_FILE`, or a Hub repo id, downloaded); FileNotFoundError when there is none."""
    path, local = resolve_source(path)
    if not local:
        from huggingface_hub import hf_hub_download
        path = hub_call(path, hf_hub_download, path, GATES_FILE, **hub_kwargs)
    elif os.path.isdir(path):
        path = os.path.join(path, GATES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no gate file at {path}")
    return path


#: the gate-building options a gates file records (``save_gates``' metadata)
GATE_STRUCTURE_FIELDS = ("seer_block_size", "seer_gate_hidden_size", "seer_q_pooling", "seer_k_pooling",
                         "seer_gate_rope")


def gate_structure(path, **hub_kwargs) -> dict:
    """The ``seer_*`` options the gates in ``path`` were built with (as :meth:`save_gates`
    recorded them, plus ``seer_decode_gate`` when the file holds decode gates): what a
    conversion needs to build gates these load into (``load_seer_model(base, gates=path)``)."""
    from safetensors import safe_open
    with safe_open(gates_file(path, **hub_kwargs), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("seer", "{}"))
        decode = any(f".{DECODE_GATE}." in k for k in f.keys())
    out = {k: meta[k] for k in GATE_STRUCTURE_FIELDS if k in meta}
    if decode:
        out["seer_decode_gate"] = True
    return out


class SeerPreTrainedMixin:
    """Mixed into a family's PreTrainedModel (before the stock class): gates stay float32
    and are initialised by :meth:`AttnGate.reset_parameters`."""

    _keep_in_fp32_modules = ["attn_gate"]
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        if isinstance(module, (AttnGate, DecodeGate)):
            module.reset_parameters()
        else:
            super()._init_weights(module)


def _kv_cache(kwargs):
    """The KV cache among a forward's keyword arguments (``cache`` from transformers 5.2x on,
    ``past_key_values`` before), or None."""
    return kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")


def _empty_static_cache(kwargs):
    """Whether the forward's KV cache is a static one (preallocated layers) holding no token yet
    (one device sync)."""
    cache = _kv_cache(kwargs)
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(layer, "max_cache_len", None) for layer in layers):
        return False
    return int(cache.get_seq_length()) == 0


class SeerModelMixin:
    """Mixed into a family's base model (before the stock class); its ``__init__`` calls
    :meth:`build_seer_model` instead of the stock one (which would build stock layers)."""

    def build_seer_model(self, config, decoder_layer, norm, rotary):
        """The stock base model's submodules, with ``decoder_layer`` (the family's Seer decoder
        layer class) for every layer and ``gate_rotary_emb`` (``rotary`` sized for the gate)."""
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([decoder_layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = rotary(config=config)
        self.gate_rotary_emb = rotary(config=gate_rotary_config(config))
        self.gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                seer_ctx: SeerForwardContext | None = None, **kwargs):
        cfg = self.config
        ref = input_ids if input_ids is not None else inputs_embeds
        still_merged(self.layers)  # (seer_merge_projections: undone if the projections changed since)
        if cfg.seer_mode != "dense":
            seer_ctx = seer_ctx if seer_ctx is not None else SeerForwardContext()
            padding = attention_mask
            if isinstance(attention_mask, dict) or attention_mask is not None and attention_mask.dim() == 4:
                padding = self._static_prefill(seer_ctx, attention_mask, ref.shape[1], kwargs)
            elif ref.shape[1] > 1 and _empty_static_cache(kwargs):  # a static cache's prefill, 2D mask
                seer_ctx.prefill_slots = ref.shape[1]
            self._prepare_context(seer_ctx, padding, position_ids, ref.shape[1], ref.device)
            _check_density_floor(cfg, ref.shape[1])
        if cfg.seer_decode_sparsity and cfg.seer_mode != "distill":
            seer_ctx = seer_ctx if seer_ctx is not None else SeerForwardContext()
            kwargs = self._prepare_decode(seer_ctx, attention_mask, ref, kwargs)
        if cfg.seer_decode_gate and (cfg.seer_mode == "distill" or seer_ctx is not None and seer_ctx.gate_loss_layers):
            # the decode gates learn where the prefill gates do: distillation, and fine-tuning's gate-loss layers
            self._prepare_decode_distill(seer_ctx, position_ids, ref)
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, seer_ctx=seer_ctx, **kwargs)
        if seer_ctx is not None and seer_ctx.decode is not None:
            seer_ctx.decode.finish()
        return out

    def _static_prefill(self, ctx, attention_mask, T, kwargs):
        """The padding mask of a forward whose ``attention_mask`` is 4D (or a dict of them):
        what ``generate`` passes with a static KV cache. At the prefill of an empty cache the
        padding is read from the mask (:func:`~.decode_cache.prompt_padding`) and the layers
        attend sparsely over the cache's first T slots (``ctx.prefill_slots``); other forwards
        of a cache (decode steps, a prefill after earlier tokens) take the stock attention with
        the 4D mask, and the context needs no padding (None). Without a cache a 4D mask is
        refused (ValueError): sparse and distill prefills take a 2D padding mask."""
        cache = _kv_cache(kwargs)
        if cache is None:
            got = "a dict of masks" if isinstance(attention_mask, dict) else f"a {attention_mask.dim()}D mask"
            raise ValueError(f"seer_mode {self.config.seer_mode!r} takes a 2D padding attention_mask [B, T]; got "
                             f"{got}")
        if T > 1 and int(cache.get_seq_length()) == 0:  # one device sync, at the prefill
            ctx.prefill_slots = T
            return prompt_padding(attention_mask, T)
        return None

    def _gate_rope_at(self, positions):
        """The gate's RoPE ``(cos, sin)`` ``[B, n, G]`` at long positions ``[B, n]``."""
        return self.gate_rotary_emb(torch.empty(0, device=positions.device, dtype=torch.float32), positions)

    def _prepare_decode(self, ctx, attention_mask, ref, kwargs):
        """Attach this forward's :class:`~.decode_cache.DecodeStep` to ``ctx`` (decode sparsity):
        the KV cache in ``kwargs`` (a DynamicCache is made here when ``use_cache`` asks for one,
        so that its pooled-K cache exists from the first forward on). Returns the kwargs."""
        cache = _kv_cache(kwargs)
        if cache is None:
            use = kwargs.get("use_cache")
            if not (self.config.use_cache if use is None else use):
                return kwargs
            kwargs = {k: val for k, val in kwargs.items() if k not in ("cache", "past_key_values")}
            params = inspect.signature(super().forward).parameters
            cache = DynamicCache(config=self.config)
            kwargs["cache" if "cache" in params else "past_key_values"] = cache
        ctx.decode = decode_step_for(cache, self.config, ref.shape[0], ref.shape[1], attention_mask,
                                     self._gate_rope_at, ref.device)
        return kwargs

    def _prepare_decode_distill(self, ctx, position_ids, ref):
        """Distill mode with decode gates: the query rows the decode gates learn from
        (``seer_decode_distill_rows`` per sequence) and the gate's RoPE at their positions."""
        B, T = ref.shape[:2]
        bs = self.config.seer_block_size
        bounds = ctx.seq_bounds.long() if ctx.seq_bounds is not None else \
            torch.tensor([[0, T]], device=ref.device).expand(B, 2)
        rows = sample_decode_rows(bounds, self.config.seer_decode_distill_rows, bs).to(ref.device)
        pos = position_ids[:, -T:] if position_ids is not None and position_ids.shape[-1] >= T else \
            torch.arange(T, device=ref.device)[None]
        ctx.decode_rows = rows
        ctx.decode_rope = self._gate_rope_at(pos.expand(B, T).gather(1, rows.clamp_min(0)))

    def _prepare_context(self, ctx, attention_mask, position_ids, T, device):
        """Fill ``ctx`` for a prefill of ``T`` tokens: padding (``valid`` ``[B, T]``,
        ``seq_bounds`` ``[B, 2]``) from the 2D ``attention_mask`` and the gate's RoPE
        ``(cos, sin)`` ``[B, NB, G]`` at each block's first real token position."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"seer_mode {self.config.seer_mode!r} takes a 2D padding attention_mask [B, T]; "
                             f"got a {attention_mask.dim()}D mask")
        ctx.valid, ctx.seq_bounds = padding_bounds(attention_mask, T)
        bs = self.config.seer_block_size
        NB = (T + bs - 1) // bs
        pos = position_ids if position_ids is not None else torch.arange(T, device=device)[None]
        pos = pos[:, -T:] if pos.shape[-1] >= T else torch.arange(T, device=device)[None]
        # each block sits at the position of its first real token (0: a block of padding only)
        real = ctx.valid if ctx.valid is not None else torch.ones(1, T, dtype=torch.bool, device=device)
        rows, pad = max(pos.shape[0], real.shape[0]), NB * bs - T
        real = nn.functional.pad(real.expand(rows, -1), (0, pad), value=False).view(rows, NB, bs)
        pos = nn.functional.pad(pos.expand(rows, -1), (0, pad)).view(rows, NB, bs)
        first = real.to(torch.uint8).argmax(-1, keepdim=True)  # argmax returns the first maximum
        block_pos = pos.gather(-1, first).squeeze(-1).masked_fill(~real.any(-1), 0)
        ctx.gate_rope = self.gate_rotary_emb(torch.empty(0, device=device, dtype=torch.float32), block_pos)


@dataclass
class SeerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``gate_loss``: in distill mode, the per-layer gate KL
    losses summed and scaled by ``config.seer_distill_loss_scale`` (None otherwise)."""

    gate_loss: torch.FloatTensor | None = None


class SeerCausalLMMixin:
    """Mixed into a family's causal LM (before the stock class). After a sparse prefill,
    :meth:`seer_density` returns the kept share of causal blocks per layer and head."""

    def build_seer_lm(self, config, base_model):
        """The stock causal LM's submodules around ``base_model`` (the family's Seer base model class)."""
        self.model = base_model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, *args, seer_ctx: SeerForwardContext | None = None, **kwargs):
        """The family's forward; in distill mode the output also carries ``gate_loss``: the
        per-layer KL losses summed and scaled by ``config.seer_distill_loss_scale``."""
        ctx = seer_ctx if seer_ctx is not None else SeerForwardContext()
        out = super().forward(*args, seer_ctx=ctx, **kwargs)
        if ctx.gate_losses:
            loss = torch.stack([l.float() for l in ctx.gate_losses]).sum() * self.config.seer_distill_loss_scale
            if isinstance(out, tuple):
                out = out + (loss,)
            else:  # a real output class: DDP/FSDP flatten and rebuild outputs by their fields
                out = SeerCausalLMOutputWithPast(**out, gate_loss=loss)
        if ctx.densities:
            self._last_density = torch.stack(ctx.densities).detach()  # [L, B, HQ]
        if ctx.decode is not None:
            self._last_decode_stats = ctx.decode.state.stats  # summed when read (no device op per step)
        return out

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; with ``seer_decode_sparsity`` beam search is refused
        (it reorders the KV cache, which the pooled-K cache does not follow) and the forward
        is never compiled: transformers compiles the decode steps of a static cache
        (``torch.compile``, CUDA graphs by default), but the pooled-K cache is Python state that
        each step updates and a compiled, graph-replayed step would not (``disable_compile``)."""
        if self.config.seer_decode_sparsity:
            gen_cfg = kwargs.get("generation_config") or self.generation_config
            beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1))
            if beams is not None and beams > 1:
                raise ValueError(f"num_beams={beams}: seer_decode_sparsity does not support beam search; use greedy "
                                 "or sampling, or set_seer_mode(..., seer_decode_sparsity=False)")
            kwargs["disable_compile"] = True
        return super().generate(*args, **kwargs)

    # -- modes and statistics ------------------------------------------------------------

    def seer_compile_pointwise(self, enable: bool = True, **compile_options):
        """``torch.compile`` the work around the attention kernels, in place. At a prefill in a
        Seer mode without a KV cache (training, scoring) every decoder layer runs as two graphs
        around its eager attention (:class:`SeerDecoderLayerMixin`: input norm, q/k/v
        projections and RoPE; output projection, residual, norm, MLP, residual); the gate's
        block selection (``seer_selector="gate"``: pooling, gate, scores, the method and keep
        rules) is one graph instead of ~50 small kernels; the final norm and the LM loss are
        compiled too. Other forwards (a KV cache, dense mode) compile the layer's MLP, RMSNorms
        (q/k norms where the family has them) and RoPE one by one. The attention kernels, the
        gate loss and decode stay eager. Each compiled piece is one graph without breaks, so it
        composes with activation checkpointing (a compiled function that breaks inside a
        checkpointed layer would run eagerly) and with PEFT (compile after wrapping). The
        numerics change at rounding level (fused kernels, e.g. the loss's float32 logits are
        never written out).

        Args:
            enable: False restores the eager functions.
            compile_options: passed to ``torch.compile`` (``backend``, ``mode``; ``dynamic``
                is False: training shapes are fixed).

        Returns:
            self.
        """
        pieces = [self.model.norm]
        for layer in self.model.layers:
            attn = layer.self_attn
            pieces += [layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
            pieces += [getattr(attn, name) for name in ("q_norm", "k_norm") if hasattr(attn, name)]
            attn._seer_compile = dict(compile_options) if enable else None
        for module in pieces:
            module.__dict__.pop("forward", None)  # the class's forward again
            if enable:
                module.forward = torch.compile(module.forward, dynamic=False, **compile_options)
        current = self.__dict__.get("_loss_function")
        if hasattr(current, "seer_eager"):  # compiled here before: back to what was set then
            self.__dict__.pop("_loss_function")
            if current.seer_eager is not None:
                self.loss_function = current.seer_eager
        if enable:
            eager = self.__dict__.get("_loss_function")  # None: the family's default loss
            loss = compiled(self.loss_function, compile_options)

            def lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                        **_):  # the forward's other keyword arguments (seer_ctx, ...) stay out of the graph
                return loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                            ignore_index=ignore_index, shift_labels=shift_labels)
            lm_loss.seer_eager = eager
            self.loss_function = lm_loss
        return self

    def seer_merge_projections(self, enable: bool = True):
        """For inference: each layer's q/k/v projections as one GEMM over their concatenated
        weights, and the MLP's gate/up as one where the layer runs its own graphs
        (:meth:`seer_compile_pointwise`: graph-mode decode, training and scoring prefill; the
        stock layer's MLP otherwise). The stock parameters become views of the concatenations
        (no copy; state dict and saving unchanged). At a decode step the k and v GEMMs are small
        and read their weights slowly; merged, a 16-layer 8B-shaped token at 4 x 128k took 0.23 ms
        less (:mod:`.merged_projections`). Refused for projections wrapped by PEFT, quantised or
        dispatched by accelerate (offloading);
        undone with a warning if the projections change after (moved, cast, wrapped); a forward
        that needs their gradients runs them unmerged.

        Args:
            enable: False restores three (two) GEMMs.

        Returns:
            self.
        """
        merge_projections(self.model.layers, enable)
        return self

    def set_seer_mode(self, mode: str, **seer_overrides):
        """Switch the mode (and any runtime ``seer_*`` option, e.g. ``seer_threshold=1e-3``).

        Structural options (gate width, poolings, gate RoPE, block size) are fixed by the
        built gates: changing one raises ValueError (convert the base model again instead)."""
        new = {"seer_mode": mode, **seer_overrides}
        unknown = [k for k in new if not k.startswith("seer_")]
        if unknown:
            raise ValueError(f"unknown seer options {unknown}: every option is named seer_*")
        new = self.config.runtime_overrides(new)
        missing = object()
        old = {k: getattr(self.config, k, missing) for k in new}
        for k, val in new.items():
            setattr(self.config, k, val)
        try:
            self.config.validate_seer()
        except ValueError:
            for k, val in old.items():
                if val is missing:
                    delattr(self.config, k)
                else:
                    setattr(self.config, k, val)
            raise
        return self

    def seer_generate(self, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None, cuda_graph=None,
                      do_sample=False, temperature=1.0, top_k=None, top_p=None):
        """Generation whose decode steps replay from one CUDA graph: the prefill's KV cache moved
        into a static one, then sparse decode steps (``seer_decode_sparsity``) or dense ones, with no host
        work per token (:func:`~.decode_graph.graph_generate`); greedy, or sampled with
        ``do_sample`` (``temperature``, ``top_k``, ``top_p``). Returns the prompt and the new tokens,
        long ``[B, T + n]``."""
        return graph_generate(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id, cuda_graph=cuda_graph, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p)

    def seer_density(self):
        """Kept share of causal blocks of the last sparse prefill: float ``[layers, batch, heads]``
        (None before any sparse prefill)."""
        return getattr(self, "_last_density", None)

    def seer_decode_density(self):
        """Kept share of each sequence's KV blocks over the sparse decode steps of the current
        (or last) KV cache, averaged over steps, the layers that decode sparsely (all but
        sliding-window ones) and KV heads: float ``[batch]`` (None before any sparse decode step)."""
        stats = getattr(self, "_last_decode_stats", None)
        return stats.density() if stats is not None else None

    # -- gates only ------------------------------------------------------------------------

    def gate_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if ".attn_gate." in k}

    def _gate_metadata(self):
        c = self.config
        return {"num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                **{k: getattr(c, k) for k in GATE_STRUCTURE_FIELDS}}

    def save_gates(self, path, dtype=None):
        """Write the gate tensors only (a few MB) to ``path`` (a folder or a .safetensors file).

        ``dtype``: a floating torch dtype to store them in (e.g. ``torch.bfloat16`` halves the
        file); default: as trained (float32). :meth:`load_gates` casts back to the model's."""
        from safetensors.torch import save_file
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype={dtype!r} is invalid: expected a floating torch dtype such as torch.bfloat16")
        if not str(path).endswith(".safetensors"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, GATES_FILE)
        tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.gate_state_dict().items()}
        save_file(tensors, str(path), metadata={"seer": json.dumps(self._gate_metadata())})
        return str(path)

    def load_gates(self, path, **hub_kwargs):
        """Load gates written by :meth:`save_gates` (local folder/file or Hub repo id).

        Raises ValueError when the gates were trained for another shape (layers, heads,
        head_dim, gate width, poolings) or a tensor is not floating point or not finite."""
        from safetensors import safe_open
        path = gates_file(path, **hub_kwargs)
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("seer", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        mine = self._gate_metadata()
        diffs = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
        if diffs:
            raise ValueError("gates do not match this model: "
                             + ", ".join(f"{k}: gates {a!r} vs model {b!r}" for k, (a, b) in diffs.items()))
        own = self.gate_state_dict()
        self._check_decode_gate_keys(tensors, own)
        if set(tensors) != set(own):
            raise ValueError(f"gate file keys differ from the model's: missing {sorted(set(own) - set(tensors))[:4]}, "
                             f"unexpected {sorted(set(tensors) - set(own))[:4]}")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"gate tensor {k} has shape {tuple(t.shape)}, model expects {tuple(own[k].shape)}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"gate tensor {k} has dtype {t.dtype}, expected a floating dtype")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"gate tensor {k} holds {int((~torch.isfinite(t)).sum())} NaN/inf values")
        self.load_state_dict(tensors, strict=False)
        return self

    def _check_decode_gate_keys(self, tensors, own):
        """Gate files of models without decode gates load into models with them (their decode
        gates keep their values: a warning says so); decode gates into a model without them
        are refused. ``tensors`` gains the missing decode-gate entries."""
        dec = f".{DECODE_GATE}."
        file_dec, own_dec = any(dec in k for k in tensors), any(dec in k for k in own)
        if file_dec and not own_dec:
            raise ValueError("the gate file holds decode gates but this model has none; build it with "
                             "seer_decode_gate=True (load_seer_model(base, seer_decode_gate=True)) to load them")
        if own_dec and not file_dec:
            logger.warning("the gate file holds no decode gates: this model's decode gates keep their current "
                           "(untrained) values; distil them before using seer_decode_sparsity")
            tensors.update({k: v for k, v in own.items() if dec in k})

    # -- saving --------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config plus a flat remote-code bundle (config, model, gate and
        kernel modules), so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
        works where this package is not installed."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory, self.config.model_type)

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, plus gates-only checkpoints: when the config
        names a base model (``seer_base_model``), the base's weights load first (Hub id,
        folder or GGUF file), then the checkpoint's gates (:mod:`.gates_only`)."""
        given = kwargs.pop("config", None)
        config = given
        if given is None or isinstance(given, (str, os.PathLike)):
            config = peek_config(cls, given or pretrained_model_name_or_path, kwargs)
        if not is_gates_only(config):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=given, **kwargs)
        return load_gates_only(cls, super().from_pretrained, pretrained_model_name_or_path, config, *model_args,
                               **kwargs)
