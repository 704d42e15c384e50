"""The pooled-K cache: the decode gate's K-side input, kept beside a transformers KV cache.

For every layer a :class:`PooledKCache` holds, for each full block of 64 cache slots, the
block's pre-RoPE keys pooled as the gate expects (``seer_k_pooling``, padding left out) and
the decode gate's projected keys of that block, both computed once, when the block fills
(a prefill fills every full block of the prompt), plus the pre-RoPE keys of the partly
filled last block. Decode steps then score the new query against those keys without
touching the KV cache. The gate keys are kept in the model's dtype or, with
``seer_decode_key_format`` ``"f8"`` / ``"i8"``, in 8 bits with one float32 scale per block
(:func:`~seer_attn.kernels.decode_select.eight_bit_keys`; fixed for the cache at its creation).

It is attached to the KV cache object it describes (a ``DynamicCache`` or a ``StaticCache``;
kept in a weak mapping, so it dies with the cache) and follows it by length: a cache that
is empty again (a new ``generate`` call reusing a static cache) starts a new one; a cache
whose length changed outside a forward (cropped by assisted decoding, filled while
``seer_decode_sparsity`` was off) is refused with ValueError. Beam search, which reorders
the KV cache between steps, is refused by ``generate`` itself.

Slots are the cache's: with left padding (what ``generate`` produces) block j covers slots
``[64 j, 64 j + 64)`` of the padded sequence, as in the prefill; ``starts`` are the first
real slots, blocks before ``starts // 64`` hold padding only, and each block sits at the
position of its first real token for the gate's RoPE (position = slot - start).

Copied flat into saved model folders (remote code): imports only torch/transformers and the
kernels (rewritten flat by the bundle writer).
"""
import weakref

import torch

from seer_attn.kernels.decode_select import eight_bit_keys

from .selection import (DECODE_KEY_FORMATS, block_pool, decode_every_block, decode_full_blocks,
                        prepare_decode_selection, select_decode_blocks)

_STATES = weakref.WeakKeyDictionary()  # KV cache object -> PooledKCache


class _LayerBlocks:
    """One layer's pooled keys ``[B, H, n, D * |k_pool|]``, gate keys ``[B, H, n, G]`` (with 8-bit
    keys their scales ``[B, H, n]`` too), mean
    post-RoPE keys ``[B, H, n, D]`` (the decode prior's; all grown by doubling, always with a
    spare zeroed row after the ``n`` in use: a decode step scores the current block's row too,
    whose bias then forces it in) and the pre-RoPE keys
    of the partly filled block (``fill`` slots of a ``[B, H, 64, D]`` buffer, written in place
    by decode steps)."""

    def __init__(self):
        self.pooled = self.keys = self.means = self.scales = self.buf = None
        self.n = self.fill = 0

    @property
    def partial(self):
        """Pre-RoPE keys of the partly filled block ``[B, H, fill, D]`` (None when empty)."""
        return self.buf[:, :, :self.fill] if self.fill else None

    def keep_partial(self, rest, block_size):
        """Hold ``rest`` ``[B, H, r, D]`` (``r < block_size``) as the partly filled block."""
        r = rest.shape[2]
        if r:
            if self.buf is None or self.buf.shape[:2] != rest.shape[:2] or self.buf.dtype != rest.dtype:
                self.buf = rest.new_empty(*rest.shape[:2], block_size, rest.shape[3])
            self.buf[:, :, :r] = rest
        self.fill = r

    def append(self, pooled, keys, means, scales=None):
        """Add ``add`` full blocks: ``pooled`` ``[B, H, add, D * |k_pool|]``, ``keys`` ``[B, H, add, G]``,
        ``means`` ``[B, H, add, D]`` and, with 8-bit keys, their ``scales`` ``[B, H, add]``."""
        add = pooled.shape[2]
        names = ("pooled", "keys", "means") + (("scales",) if scales is not None else ())
        if self.pooled is None or self.n + add >= self.pooled.shape[2]:
            cap = max(self.n + add + 1, 2 * (self.pooled.shape[2] if self.pooled is not None else 0), 16)
            for name, new in zip(names, (pooled, keys, means, scales)):
                buf = new.new_zeros(*new.shape[:2], cap, *new.shape[3:])
                old = getattr(self, name)
                if old is not None:
                    buf[:, :, :self.n] = old[:, :, :self.n]
                setattr(self, name, buf)
        for name, new in zip(names, (pooled, keys, means, scales)):
            getattr(self, name)[:, :, self.n:self.n + add] = new
        self.n += add


class _BlockTables:
    """What the decode steps whose new token falls in block ``current`` share, made once per
    block (when its first decode step comes) instead of once per step: the gate's RoPE at each
    of the block's 64 slots, ``(cos, sin)`` float32 ``[B, 64, G]`` (and cast copies per dtype),
    the kernel's ``seq_lens`` per slot ``[64, B]`` int32, and the selections made for it
    (:func:`~.selection.prepare_decode_selection`, keyed by their settings)."""

    def __init__(self, state, current, rope_at, device):
        bs, B = state.block_size, state.batch_size
        self.current = current
        slots = current * bs + torch.arange(bs, device=device)
        self.rope = rope_at((slots[None, :] - state.starts[:, None]).clamp_min(0))
        self.lens = (slots + 1).to(torch.int32)[:, None].expand(bs, B).contiguous()
        self.selections, self._cast = {}, {}

    def rope_at_slot(self, slot, dtype):
        """``(cos, sin)`` ``[B, G]`` in ``dtype`` at the block's slot ``slot`` (0 .. 63): views
        made with the table, so that a layer's step indexes a list."""
        if dtype not in self._cast:
            cos, sin = (t.to(dtype) for t in self.rope)
            self._cast[dtype] = [(cos[:, i], sin[:, i]) for i in range(cos.shape[1])]
        return self._cast[dtype][slot]


class PooledKCache:
    """The pooled-K cache of one KV cache (module docstring).

    Args:
        num_layers: layers of the model.
        starts: long ``[B]`` first real cache slot of each sequence (left padding; zeros without).
        block_size: 64.
        k_pooling: the gate's K poolings (``seer_k_pooling``).
        key_format: how the gate keys are stored (``seer_decode_key_format``: ``"model"``, ``"f8"``, ``"i8"``).
    """

    def __init__(self, num_layers, starts, block_size, k_pooling, key_format="model"):
        if key_format not in DECODE_KEY_FORMATS:
            raise ValueError(f"key_format must be one of {DECODE_KEY_FORMATS}, got {key_format!r}")
        self.block_size, self.k_pooling, self.key_format = block_size, tuple(k_pooling), key_format
        self.starts = starts.long()
        starts_host = self.starts.tolist()  # one sync, at the prefill
        self.padded = any(s > 0 for s in starts_host)
        self.first_block_host = [s // block_size for s in starts_host]
        self.starts32 = self.starts.to(torch.int32) if self.padded else None  # the kernel's seq_starts
        self.first_block = self.starts // block_size  # each sequence's sink block
        self.layers = [_LayerBlocks() for _ in range(num_layers)]
        self.length = 0  # cache slots recorded (after a whole forward)
        self.stats = DecodeStats(self.first_block)
        self.tables = None  # the _BlockTables of the current block
        self.graph = None  # a decode_graph.GraphDecodeState once graph-mode decoding took over

    def block_tables(self, current, rope_at, device):
        """The :class:`_BlockTables` of block ``current`` (made when a decode step first reaches it)."""
        if self.tables is None or self.tables.current != current:
            self.tables = _BlockTables(self, current, rope_at, device)
        return self.tables

    @property
    def batch_size(self):
        return self.starts.shape[0]

    def pooled_keys(self, layer):
        """Pooled pre-RoPE keys of layer ``layer``'s full blocks, ``[B, H, n, D * |k_pool|]``."""
        L = self.layers[layer]
        return L.pooled[:, :, :L.n] if L.pooled is not None else None

    def gate_keys(self, layer, blocks=None):
        """The decode gate's keys of layer ``layer``'s first ``blocks`` blocks (default: its ``n``
        full blocks), ``[B, H, blocks, G]``; at most ``n + 1`` (the row after the full blocks
        holds zeros). A decode step takes the current block's row too (its bias forces it)."""
        L = self.layers[layer]
        return L.keys[:, :, :L.n if blocks is None else blocks] if L.keys is not None else None

    def key_scales(self, layer, blocks=None):
        """The float32 scales ``[B, H, blocks]`` of layer ``layer``'s 8-bit gate keys (as :meth:`gate_keys`;
        None with keys in the model's dtype)."""
        L = self.layers[layer]
        return L.scales[:, :, :L.n if blocks is None else blocks] if L.scales is not None else None

    def block_means(self, layer, blocks=None):
        """The mean post-RoPE keys ``[B, H, blocks, D]`` of layer ``layer``'s first ``blocks`` blocks,
        as :meth:`gate_keys` (the decode prior's, ``seer_decode_meanpool_prior``)."""
        L = self.layers[layer]
        return L.means[:, :, :L.n if blocks is None else blocks] if L.means is not None else None

    def note_kept(self, counts, current):
        """Record one decode step's kept block counts (:meth:`DecodeStats.note_kept`)."""
        self.stats.note_kept(counts, current)

    def rewind(self, length):
        """Forget the slots from ``length`` on, as a KV cache cropped to ``length`` (e.g. rejected
        draft tokens): only slots of the partly filled block can be dropped (a full block's
        pooled keys cannot be split again); ValueError otherwise."""
        for i, L in enumerate(self.layers):
            kept = length - L.n * self.block_size
            have = L.partial.shape[2] if L.partial is not None else 0
            if not 0 <= kept <= have:
                raise ValueError(f"cannot rewind the pooled-K cache of layer {i} to {length} slots: it holds {L.n} "
                                 f"full blocks and {have} slots after them")
        for L in self.layers:
            L.fill = length - L.n * self.block_size
        self.length = length

    def reset_statistics(self):
        """Start :meth:`decode_density` afresh."""
        self.stats.reset()

    def decode_density(self):
        """Mean kept share of each sequence's blocks over the decode steps and layers so far,
        float ``[B]`` (None before any sparse decode step)."""
        return self.stats.density()


class DecodeStats:
    """The kept share of the KV blocks over the sparse decode steps of one pooled-K cache (small:
    the model keeps the last one for ``seer_decode_density`` without keeping the cache alive).

    ``first_block``: long ``[B]``, each sequence's sink block."""

    def __init__(self, first_block):
        self.first_block = first_block
        self.reset()

    def reset(self):
        self._kept = None  # sum over decode steps of the kept share (mean over layers and heads), per sequence
        self._kept_n = 0
        self._pending = None  # [counts, layers, current, steps]: steps whose kept counts are not summed yet

    def note_kept(self, counts, current):
        """Record one decode step: ``counts``, the kept block counts ``[B, H]`` of each layer
        that decoded sparsely, ``current`` the current block's index (the sequence has
        ``current - first_block + 1`` blocks). Steps whose layers all share one count tensor
        (the top-k methods: one per block) are summed lazily, when that tensor changes or the
        density is read, so that such a step costs no device op here."""
        shared = all(c is counts[0] for c in counts)
        p = self._pending
        if shared and p is not None and p[0] is counts[0] and p[1] == len(counts) and p[2] == current:
            p[3] += 1
            return
        self._flush()
        if shared:
            self._pending = [counts[0], len(counts), current, 1]
        else:
            self._add(torch.stack(counts).sum((0, 2)), len(counts) * counts[0].shape[1], current, 1)

    def _add(self, kept_sum, layers_heads, current, steps):
        share = kept_sum.float() / (layers_heads * (current - self.first_block + 1).float()) * steps
        self._kept = share if self._kept is None else self._kept + share
        self._kept_n += steps

    def _flush(self):
        if self._pending is not None:
            cnt, layers, current, steps = self._pending
            self._pending = None
            self._add(cnt.sum(-1) * layers, layers * cnt.shape[1], current, steps)

    def density(self):
        """Mean kept share of each sequence's blocks over the steps and layers so far, float ``[B]``
        (None before any sparse decode step)."""
        self._flush()
        return None if self._kept is None else (self._kept / self._kept_n).detach()


def prompt_padding(attention_mask, T):
    """The padding mask ``[B, T]`` (nonzero: a real token) of a fresh cache's first forward of
    ``T`` tokens, from a 2D 0/1 mask or the 4D mask ``generate`` builds for a static cache
    (bool, True = attend, or additive, 0 = attend; with sliding-window layers a dict of them per
    layer type): token i is real iff query i may attend key i (the diagonal: causal and
    sliding-window masks both keep it, padding masks it in every row). None when the mask says
    nothing of it (None, or another shape)."""
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is not None and attention_mask.dim() == 4 and min(attention_mask.shape[-2:]) >= T:
        diag = attention_mask[:, 0, :T, :T].diagonal(dim1=-2, dim2=-1)
        return diag if diag.dtype == torch.bool else diag == 0
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != T:
        return None
    return attention_mask


def _starts_from_mask(attention_mask, T, B, device):
    """First real slot per row from the padding mask of a fresh cache's first forward
    (:func:`prompt_padding`)."""
    attention_mask = prompt_padding(attention_mask, T)
    if attention_mask is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    valid = attention_mask.bool()
    count = valid.sum(-1)
    pos = torch.arange(T, device=valid.device)
    start = torch.where(valid, pos, T).amin(-1)
    end = torch.where(valid, pos + 1, 0).amax(-1)
    bad = (end != T) | (count != end - start)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"seer_decode_sparsity needs left padding (tokenizer padding_side='left'): attention_mask "
                         f"rows {rows} do not end with one contiguous run of ones")
    return start.to(device)


class DecodeStep:
    """What the layers of one forward need of the pooled-K cache (built by the model).

    ``past``: cache slots before this forward; ``T``: new tokens; ``rope_at``: a function of
    long positions ``[B, n]`` giving the gate's ``(cos, sin)`` ``[B, n, G]``. A forward of one
    token after a prefill (``sparse``) attends through the decode gate; every forward records
    its keys (:meth:`record`). What a sparse step's layers share comes from the state's
    :class:`_BlockTables`, made once per block: the query's RoPE, the sequence lengths, the
    selection's bias and counts (:meth:`selection`).
    """

    def __init__(self, state, past, T, rope_at, device):
        bs = state.block_size
        self.state, self.past, self.T = state, past, T
        self.sparse = T == 1 and past > 0
        starts = state.starts
        self.tables = state.block_tables(past // bs, rope_at, device) if self.sparse else None
        self.block_rope = None
        if (past + T) // bs > past // bs:  # blocks fill in this forward: the gate's RoPE at their first tokens
            j = torch.arange(past // bs, (past + T) // bs, device=device)
            first = torch.maximum(j[None, :] * bs, starts[:, None])
            real = (j[None, :] + 1) * bs > starts[:, None]
            self.block_rope = rope_at(torch.where(real, first - starts[:, None], 0))
        if self.sparse:
            self.lens = self.tables.lens[past % bs]
        else:
            self.lens = torch.full((state.batch_size,), past + T, dtype=torch.int32, device=device)
        self.seq_starts = state.starts32
        self.current = past // bs  # the new token's block (decode steps)
        self._counts = []

    def q_rope(self, dtype):
        """The gate's ``(cos, sin)`` ``[B, G]`` in ``dtype`` at the new token's position (decode steps)."""
        return self.tables.rope_at_slot(self.past % self.state.block_size, dtype)

    def selection(self, method, budget, share, num_heads, keep_local=0):
        """:func:`~.selection.prepare_decode_selection` of this step (made once per block)."""
        key = (method, budget, share, num_heads, keep_local)
        sel = self.tables.selections.get(key)
        if sel is None:
            sel = prepare_decode_selection(self.state.first_block, self.current, method, budget, share,
                                           self.state.block_size, num_heads, self.state.first_block_host,
                                           keep_local=keep_local)
            self.tables.selections[key] = sel
        return sel

    def gate_keys(self, layer):
        """The decode gate's keys this step scores, ``[B, H, current + 1, G]`` (None before a block filled)."""
        return self.state.gate_keys(layer, self.current + 1)

    def key_scales(self, layer):
        """The scales of 8-bit :meth:`gate_keys`, float32 ``[B, H, current + 1]`` (None otherwise)."""
        return self.state.key_scales(layer, self.current + 1)

    def block_means(self, layer):
        """The mean post-RoPE keys this step's prior scores, ``[B, H, current + 1, D]`` (as :meth:`gate_keys`)."""
        return self.state.block_means(layer, self.current + 1)

    def full_blocks(self, width):
        """Bool ``[B, 1, width]``: each sequence's full blocks (from its sink block to the one before
        the current block), the blocks the decode prior's distributions span (made once per block)."""
        full = self.tables.selections.get(("full", width))
        if full is None:
            full = self.tables.selections[("full", width)] = decode_full_blocks(self.state.first_block, self.current,
                                                                               width)
        return full

    def every_block(self, num_heads):
        """``(idx, cnt)`` reading every block of each sequence (:func:`~.selection.decode_every_block`;
        made once per block)."""
        key = ("every", num_heads)
        sel = self.tables.selections.get(key)
        if sel is None:
            sel = self.tables.selections[key] = decode_every_block(self.state.first_block, self.current,
                                                                   self.current + 1, num_heads)
        return sel

    def select(self, scores, cfg):
        """``(idx, cnt)`` of the decode gate's logits ``[B, H, current + 1]`` by ``cfg``'s method."""
        prepared = self.selection(cfg.seer_decode_method, cfg.seer_decode_budget, cfg.seer_decode_share,
                                  scores.shape[1], cfg.seer_decode_keep_local)  # the same for every layer
        # (and step) of this block
        return select_decode_blocks(scores, self.state.first_block, cfg.seer_decode_method,
                                    threshold=cfg.seer_decode_threshold, mass=cfg.seer_decode_mass,
                                    prepared=prepared)

    def gate_select(self, gate, q_pre, keys, cfg):
        """None: an eager step scores (:meth:`.DecodeGate.step_logits`) and then selects
        (:meth:`select`); the graph step's one-launch path is
        :meth:`.decode_graph.GraphDecodeStep.gate_select`."""
        return None

    def note_kept(self, cnt):
        """Add one layer's kept block counts ``[B, H]`` (folded into the state by :meth:`finish`;
        layers of a step with one shared count tensor cost nothing here)."""
        self._counts.append(cnt)

    def record(self, layer, k_pre, gate, k):
        """Add this forward's pre-RoPE keys ``[B, H, T, D]`` of layer ``layer``: pool and project
        (``gate``, a :class:`~.decode_gate.DecodeGate`) the blocks they fill and average their
        post-RoPE keys (read from ``k``, the layer's KV cache keys ``[B, H, S, D]`` after this
        forward's update), keep the rest. A decode step that fills no block writes its key into
        the partial block's buffer (one copy)."""
        state, bs = self.state, self.state.block_size
        L = state.layers[layer]
        assert L.n == self.past // bs and L.fill == self.past % bs, "pooled-K cache out of step with the KV cache"
        T = k_pre.shape[2]
        if L.fill + T < bs and L.buf is not None and L.buf.shape[:2] == k_pre.shape[:2]:
            L.buf[:, :, L.fill:L.fill + T] = k_pre
            L.fill += T
            return
        x = k_pre if not L.fill else torch.cat([L.partial, k_pre.to(L.buf.dtype)], dim=2)
        n_new = x.shape[2] // bs
        if n_new:
            valid = None
            if state.padded:
                slot = torch.arange(L.n * bs, (L.n + n_new) * bs, device=x.device)
                valid = slot[None, :] >= state.starts[:, None]
            with torch.no_grad():
                pooled = block_pool(x[:, :, :n_new * bs], bs, state.k_pooling, valid)
                keys = gate.block_keys(pooled, rope=self.block_rope)
                means = block_pool(k[:, :, L.n * bs:(L.n + n_new) * bs].float(), bs, ("avg",), valid)
                keys, scales = (keys.to(pooled.dtype), None) if state.key_format == "model" else \
                    eight_bit_keys(keys, state.key_format)
            L.append(pooled.detach(), keys, means.to(pooled.dtype), scales)
        L.keep_partial(x[:, :, n_new * bs:].detach(), bs)

    def finish(self):
        self.state.length = self.past + self.T
        if self._counts:
            self.state.note_kept(self._counts, self.current)


def decode_step_for(cache, config, B, T, attention_mask, rope_at, device):
    """The :class:`DecodeStep` of a forward of ``T`` new tokens of ``B`` sequences into
    ``cache`` (a transformers KV cache), creating its :class:`PooledKCache` when the cache is
    empty.

    A decode step of a cache whose pooled-K cache went to graph mode
    (:func:`~.decode_graph.graph_generate`) is a :class:`~.decode_graph.GraphDecodeStep`
    (device ops only, no sync).

    Raises ValueError when the cache holds tokens its pooled-K cache never saw, or the batch
    size or ``seer_decode_key_format`` changed."""
    state = _STATES.get(cache)
    if state is not None and state.graph is not None and T == 1:
        _check_key_format(state, config)
        return state.graph.step(rope_at)
    past = int(cache.get_seq_length())
    if past == 0 or state is None:
        if past != 0:
            raise ValueError(f"seer_decode_sparsity: the KV cache already holds {past} tokens that were not seen with "
                             "decode sparsity on; turn it on before the prefill (or start from an empty cache)")
        starts = _starts_from_mask(attention_mask, T, B, device)
        state = PooledKCache(config.num_hidden_layers, starts, config.seer_block_size, config.seer_k_pooling,
                             config.seer_decode_key_format)
        _STATES[cache] = state
    elif state.length != past:
        raise ValueError(f"seer_decode_sparsity: the KV cache holds {past} tokens but its pooled-K cache {state.length}; "
                         "the cache was changed outside a forward (cropped, reordered or refilled), which decode "
                         "sparsity does not support")
    elif state.batch_size != B:
        raise ValueError(f"seer_decode_sparsity: a batch of {B} sequences for a KV cache of {state.batch_size}")
    else:
        _check_key_format(state, config)
    return DecodeStep(state, past, T, rope_at, device)


def _check_key_format(state, config):
    if state.key_format != config.seer_decode_key_format:
        raise ValueError(f"seer_decode_key_format={config.seer_decode_key_format!r}, but this KV cache's pooled-K "
                         f"cache stores its block keys as {state.key_format!r} (set at its prefill); start from an "
                         "empty cache to change it")


def pooled_k_cache(cache):
    """The :class:`PooledKCache` attached to a transformers KV cache, or None."""
    return _STATES.get(cache)

