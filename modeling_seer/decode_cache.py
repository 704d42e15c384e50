"""The pooled-K cache: the decode gate's K-side input, kept beside a transformers KV cache.

For every layer a :class:`PooledKCache` holds, for each full block of 64 cache slots, the
block's pre-RoPE keys pooled as the gate expects (``seer_k_pooling``, padding left out) and
the decode gate's projected keys of that block, both computed once, when the block fills
(a prefill fills every full block of the prompt), plus the pre-RoPE keys of the partly
filled last block. Decode steps then score the new query against those keys without
touching the KV cache.

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

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
import weakref

import torch

from .selection import block_pool

_STATES = weakref.WeakKeyDictionary()  # KV cache object -> PooledKCache


class _LayerBlocks:
    """One layer's pooled keys ``[B, H, n, D * |k_pool|]``, gate keys ``[B, H, n, G]`` (both
    grown by doubling) and the pre-RoPE keys of the partly filled block ``[B, H, < 64, D]``."""

    def __init__(self):
        self.pooled = self.keys = self.partial = None
        self.n = 0

    def append(self, pooled, keys):
        add = pooled.shape[2]
        if self.pooled is None or self.n + add > self.pooled.shape[2]:
            cap = max(self.n + add, 2 * (self.pooled.shape[2] if self.pooled is not None else 0), 16)
            grow = []
            for old, new in ((self.pooled, pooled), (self.keys, keys)):
                buf = new.new_empty(*new.shape[:2], cap, new.shape[3])
                if old is not None:
                    buf[:, :, :self.n] = old[:, :, :self.n]
                grow.append(buf)
            self.pooled, self.keys = grow
        self.pooled[:, :, self.n:self.n + add] = pooled
        self.keys[:, :, self.n:self.n + add] = keys
        self.n += add


class PooledKCache:
    """The pooled-K cache of one KV cache (module docstring).

    Args:
        num_layers: layers of the model.
        starts: long ``[B]`` first real cache slot of each sequence (left padding; zeros without).
        block_size: 64.
        k_pooling: the gate's K poolings (``seer_k_pooling``).
    """

    def __init__(self, num_layers, starts, block_size, k_pooling):
        self.block_size, self.k_pooling = block_size, tuple(k_pooling)
        self.starts = starts.long()
        self.padded = bool((starts > 0).any())
        self.first_block = self.starts // block_size  # each sequence's sink block
        self.layers = [_LayerBlocks() for _ in range(num_layers)]
        self.length = 0  # cache slots recorded (after a whole forward)
        self._kept = None  # sum over decode steps of the kept share (mean over layers and heads), per sequence
        self._kept_n = 0

    @property
    def batch_size(self):
        return self.starts.shape[0]

    def pooled_keys(self, layer):
        """Pooled pre-RoPE keys of layer ``layer``'s full blocks, ``[B, H, n, D * |k_pool|]``."""
        L = self.layers[layer]
        return L.pooled[:, :, :L.n] if L.pooled is not None else None

    def gate_keys(self, layer):
        """The decode gate's keys of layer ``layer``'s full blocks, ``[B, H, n, G]``."""
        L = self.layers[layer]
        return L.keys[:, :, :L.n] if L.keys is not None else None

    def note_kept(self, kept_sum, layers_heads, current):
        """Record one decode step: ``kept_sum`` ``[B]`` blocks read summed over ``layers_heads``
        (layer, KV head) pairs, ``current`` the current block's index (the sequence has
        ``current - first_block + 1`` blocks)."""
        share = kept_sum.float() / (layers_heads * (current - self.first_block + 1).float())
        self._kept = share if self._kept is None else self._kept + share
        self._kept_n += 1

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
            kept = length - L.n * self.block_size
            L.partial = L.partial[:, :, :kept].clone() if kept else None
        self.length = length

    def reset_statistics(self):
        """Start :meth:`decode_density` afresh."""
        self._kept, self._kept_n = None, 0

    def decode_density(self):
        """Mean kept share of each sequence's blocks over the decode steps and layers so far,
        float ``[B]`` (None before any sparse decode step)."""
        return None if self._kept is None else (self._kept / self._kept_n).detach()


def _starts_from_mask(attention_mask, T, B, device):
    """First real slot per row from the padding mask of a fresh cache's first forward: a 2D
    0/1 mask ``[B, T]``, or the 4D mask ``generate`` builds for a static cache (bool, True =
    attend, or additive, 0 = attend), whose last query row shows the padding."""
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] >= T:
        last = attention_mask[:, 0, -1, :T]
        attention_mask = last if last.dtype == torch.bool else last == 0
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != T:
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
    its keys (:meth:`record`).
    """

    def __init__(self, state, past, T, rope_at, device):
        bs = state.block_size
        self.state, self.past, self.T = state, past, T
        self.sparse = T == 1 and past > 0
        starts = state.starts
        slot = torch.arange(past, past + T, device=device)
        self.q_rope = rope_at((slot[None, :] - starts[:, None]).clamp_min(0)) if self.sparse else None
        j = torch.arange(past // bs, (past + T) // bs, device=device)  # blocks that fill in this forward
        if len(j):
            first = torch.maximum(j[None, :] * bs, starts[:, None])
            real = (j[None, :] + 1) * bs > starts[:, None]
            self.block_rope = rope_at(torch.where(real, first - starts[:, None], 0))
        else:
            self.block_rope = None
        self.lens = torch.full((state.batch_size,), past + T, dtype=torch.int32, device=device)
        self.seq_starts = starts if state.padded else None
        self.current = past // bs  # the new token's block (decode steps)
        self.selection = None  # prepare_decode_selection of this step, made by the first layer
        self._kept, self._kept_layers = None, 0

    def note_kept(self, cnt):
        """Add one layer's kept block counts ``[B, H]`` (folded into the state by :meth:`finish`)."""
        kept = cnt.sum(-1)
        self._kept = kept if self._kept is None else self._kept + kept
        self._kept_layers += cnt.shape[1]

    def record(self, layer, k_pre, gate):
        """Add this forward's pre-RoPE keys ``[B, H, T, D]`` of layer ``layer``: pool and project
        (``gate``, a :class:`~.decode_gate.DecodeGate`) the blocks they fill, keep the rest."""
        state, bs = self.state, self.state.block_size
        L = state.layers[layer]
        assert L.n == self.past // bs, "pooled-K cache out of step with the KV cache"
        x = k_pre if L.partial is None else torch.cat([L.partial, k_pre.to(L.partial.dtype)], dim=2)
        n_new = x.shape[2] // bs
        if n_new:
            valid = None
            if state.padded:
                slot = torch.arange(L.n * bs, (L.n + n_new) * bs, device=x.device)
                valid = slot[None, :] >= state.starts[:, None]
            with torch.no_grad():
                pooled = block_pool(x[:, :, :n_new * bs], bs, state.k_pooling, valid)
                keys = gate.block_keys(pooled, rope=self.block_rope)
            L.append(pooled.detach(), keys.to(pooled.dtype))
        rest = x[:, :, n_new * bs:]
        L.partial = rest.detach().clone() if rest.shape[2] else None

    def finish(self):
        self.state.length = self.past + self.T
        if self._kept is not None:
            self.state.note_kept(self._kept, self._kept_layers, self.current)


def decode_step_for(cache, config, B, T, attention_mask, rope_at, device):
    """The :class:`DecodeStep` of a forward of ``T`` new tokens of ``B`` sequences into
    ``cache`` (a transformers KV cache), creating its :class:`PooledKCache` when the cache is
    empty.

    Raises ValueError when the cache holds tokens its pooled-K cache never saw, or the batch
    size changed."""
    past = int(cache.get_seq_length())
    state = _STATES.get(cache)
    if past == 0 or state is None:
        if past != 0:
            raise ValueError(f"seer_decode_sparsity: the KV cache already holds {past} tokens that were not seen with "
                             "decode sparsity on; turn it on before the prefill (or start from an empty cache)")
        starts = _starts_from_mask(attention_mask, T, B, device)
        state = PooledKCache(config.num_hidden_layers, starts, config.seer_block_size, config.seer_k_pooling)
        _STATES[cache] = state
    elif state.length != past:
        raise ValueError(f"seer_decode_sparsity: the KV cache holds {past} tokens but its pooled-K cache {state.length}; "
                         "the cache was changed outside a forward (cropped, reordered or refilled), which decode "
                         "sparsity does not support")
    elif state.batch_size != B:
        raise ValueError(f"seer_decode_sparsity: a batch of {B} sequences for a KV cache of {state.batch_size}")
    return DecodeStep(state, past, T, rope_at, device)


def pooled_k_cache(cache):
    """The :class:`PooledKCache` attached to a transformers KV cache, or None."""
    return _STATES.get(cache)

