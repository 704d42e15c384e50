"""Sparse decode steps that replay from a CUDA graph (docs/design.md §2, "Decode", graph mode).

A sparse decode step of :mod:`.decode_cache` is cheap on the GPU but costs ~1 ms of Python
per layer on the host (docs/experiments/decode_host_time.md): the pooled-K cache grows
Python lists, the selection's bias is made per block on the host, the cache length is read
with a device sync. Here the same step is written so that one forward of the whole model
can be captured once in a CUDA graph and replayed for every later token:

- a transformers ``StaticCache`` holds the KV cache (fixed addresses, written in place);
- :class:`GraphDecodeState` holds, per layer, the decode gate's block keys for every block
  the cache can hold (``[B, H, capacity / 64, G]``; 8-bit with their scales ``[B, H, capacity / 64]``
  under ``seer_decode_key_format`` ``"f8"`` / ``"i8"``) and the pre-RoPE keys of the current,
  partly filled block (``[B, H, 64, D]``), all preallocated;
- everything that changes from token to token comes from one device tensor, ``slot`` (the
  new token's cache slot): the new key is written at ``slot % 64``, the current block's
  pooled key and gate key are recomputed each step into row ``slot // 64`` (when the block
  is full, its last step leaves the final value there: no Python branch on a filling
  block), and the selection's bias and counts are made from it with a fixed top-k width
  (the budget, or the share of the capacity's blocks; the threshold and mass methods sort them all).

Selections equal those of :mod:`.decode_cache` (the same scores, bias and counts); the
kernel may read a row's blocks in another order.

:func:`graph_generate` (``model.seer_generate``) runs greedy decoding this way: the prefill
into a static cache, then decode steps replayed from one CUDA graph (eagerly on a CPU).

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
import inspect
import math

import torch
from transformers.cache_utils import StaticLayer

from seer_attn.kernels.decode_append import decode_append
from seer_attn.kernels.decode_select import EIGHT_BIT_KEYS, decode_window, eight_bit_keys, gate_top_blocks, top_blocks
from seer_attn.kernels.reference import decode_window_masks

from .selection import (DECODE_METHODS, DECODE_SCORE_METHODS, block_pool, decode_every_block, decode_full_blocks,
                        score_selection)

#: whether graph steps score and select the gate alone in one launch (:meth:`GraphDecodeStep.gate_select`,
#: :func:`~seer_attn.kernels.decode_select.gate_top_blocks`). Off: the query's projection, gate_scores, then
#: top_blocks, which measured faster (H100, session 39: 22 against 47 us a layer at 1 x 128k, 50 against 62 at
#: 16 x 128k; 16-layer model at 4 x 128k 2.60x against 2.50x dense; results/decode/h100_gate_select_sweep.json)
ONE_LAUNCH_GATE = False
#: whether a graph step writes each layer's new key and value into a transformers static layer, its pre-RoPE key
#: into the current-block buffer and the layer's length in one launch (:meth:`GraphDecodeStep.append`,
#: :func:`~seer_attn.kernels.decode_append.decode_append`) instead of the static layer's update (five launches)
#: and an ``index_copy_`` (session 41); the backend :func:`decode_append` runs with
FUSED_APPEND = True
APPEND_BACKEND = "auto"
#: whether a graph step makes the top-k methods' bias and counts in one launch on a GPU
#: (:func:`~seer_attn.kernels.decode_select.decode_window`; session 41, on since session 42: with top_blocks'
#: early stop 0.10 ms off a 4.96 ms sparse token, H100, 16 layers, 4 x 128k); off: the same torch ops (its reference)
ONE_LAUNCH_WINDOW = True


class GraphStats:
    """Kept share of each sequence's blocks over the graph decode steps (``density()`` as
    :class:`~.decode_cache.DecodeStats`), summed on the device."""

    def __init__(self, batch, device):
        self.kept = torch.zeros(batch, dtype=torch.float32, device=device)
        self.layers = torch.zeros((), dtype=torch.float32, device=device)

    def density(self):
        return None if float(self.layers) == 0 else (self.kept / self.layers).detach()


class GraphDecodeState:
    """The pooled-K cache of a static KV cache in preallocated tensors (module docstring).

    Args:
        pooled: the :class:`~.decode_cache.PooledKCache` left by the prefill (its full blocks'
            gate keys and the partial block are copied in).
        gates: each layer's :class:`~.decode_gate.DecodeGate`.
        capacity: the KV cache's slots; ``slot``: long ``[1]`` device tensor, the next decode
            step's cache slot (its owner advances it after each step).
        kv_heads, head_dim, dtype: the KV cache's.
    """

    def __init__(self, pooled, gates, capacity, slot, kv_heads, head_dim, dtype):
        bs = pooled.block_size
        dev = slot.device
        self.block_size, self.k_pooling, self.slot, self.padded = bs, pooled.k_pooling, slot, pooled.padded
        self.starts, self.starts32, self.first_block = pooled.starts, pooled.starts32, pooled.first_block
        self.num_blocks = -(-capacity // bs)
        B = pooled.batch_size
        self.key_format = pooled.key_format
        eight = self.key_format != "model"
        key_dtype = EIGHT_BIT_KEYS[self.key_format][0] if eight else dtype
        self.keys, self.means, self.bufs, self.scales = [], [], [], []
        for layer, gate in zip(pooled.layers, gates):
            keys = torch.zeros(B, kv_heads, self.num_blocks, gate.hidden_size, dtype=key_dtype, device=dev)
            means = torch.zeros(B, kv_heads, self.num_blocks, head_dim, dtype=dtype, device=dev)
            scales = torch.zeros(B, kv_heads, self.num_blocks, device=dev) if eight else None
            if layer.n:
                keys[:, :, :layer.n] = layer.keys[:, :, :layer.n]
                means[:, :, :layer.n] = layer.means[:, :, :layer.n]
                if eight:
                    scales[:, :, :layer.n] = layer.scales[:, :, :layer.n]
            buf = torch.zeros(B, kv_heads, bs, head_dim, dtype=dtype, device=dev)
            if layer.fill:
                buf[:, :, :layer.fill] = layer.partial
            self.keys.append(keys)
            self.scales.append(scales)
            self.means.append(means)
            self.bufs.append(buf)
        self.stats = GraphStats(B, dev)
        #: whether the next step fills its block (slot % 64 == 63): only then are the block's
        #: pooled and gate keys made (a Python flag: the step's owner knows the slot on the host
        #: and keeps one graph per kind)
        self.fills = False

    @property
    def batch_size(self):
        return self.starts.shape[0]

    def step(self, rope_at):
        """The :class:`GraphDecodeStep` of the next forward (one new token per sequence)."""
        return GraphDecodeStep(self, rope_at)


class GraphDecodeStep:
    """One graph-mode decode step: the interface the layers use of
    :class:`~.decode_cache.DecodeStep` (``record``, ``gate_keys``, ``q_rope``, ``select``,
    ``lens``, ``seq_starts``, ``note_kept``, ``finish``), made of device ops only."""

    sparse = True

    def __init__(self, state, rope_at):
        bs = state.block_size
        self.state = state
        slot = state.slot.reshape(())
        self.cur = torch.div(slot, bs, rounding_mode="floor")
        off = slot - self.cur * bs
        self.cur1, self.off1 = self.cur.reshape(1), off.reshape(1)
        starts = state.starts
        first_slot = torch.maximum(self.cur * bs, starts)  # the current block's first real token
        block_pos = torch.where((self.cur + 1) * bs > starts, first_slot - starts, 0)
        cos, sin = rope_at(torch.stack([(slot - starts).clamp_min(0), block_pos], dim=1))  # [B, 2, G]
        self._q_rope, self._cast = (cos[:, 0], sin[:, 0]), {}
        self.block_rope = (cos[:, 1:], sin[:, 1:])
        self.valid = None
        if state.fills and state.padded:  # the filled block's slots that are not left padding, [B, 64]
            self.valid = self.cur * bs + torch.arange(bs, device=slot.device)[None, :] >= starts[:, None]
        self.lens = (slot + 1).to(torch.int32).repeat(state.batch_size)
        self.seq_starts = state.starts32
        self.n = (self.cur + 1 - state.first_block).float()  # each sequence's blocks, the current one included
        self._selection, self._counts, self._full, self._appended = {}, [], {}, set()

    def q_rope(self, dtype):
        if dtype not in self._cast:
            self._cast[dtype] = tuple(t.to(dtype) for t in self._q_rope)
        return self._cast[dtype]

    def append(self, layer, cache, k, v, k_pre):
        """The layer's cache update for this step: ``cache.update(k, v, layer)``'s keys and values
        ``[B, H, capacity, D]``. With :data:`FUSED_APPEND` on and a plain transformers static
        layer, one launch writes ``k`` and ``v`` at ``slot``, ``k_pre`` into the current-block
        buffer (so :meth:`record` does not) and the layer's length (``slot + 1``, as its update
        would leave it: :class:`GraphDecoder` checks that the two agree)."""
        lyr = cache.layers[layer] if FUSED_APPEND and hasattr(cache, "layers") else None
        if type(lyr) is not StaticLayer or not lyr.is_initialized or k.shape[2] != 1:
            return cache.update(k, v, layer)
        buf = self.state.bufs[layer]
        decode_append(lyr.keys, lyr.values, k, v, self.state.slot, lyr.cumulative_length, buf, k_pre,
                      backend=APPEND_BACKEND)
        self._appended.add(layer)
        return lyr.keys, lyr.values

    def record(self, layer, k_pre, gate, k):
        """Write the new pre-RoPE key ``[B, H, 1, D]`` at ``slot % 64`` (unless :meth:`append`
        did); when it fills the block
        (``state.fills``), pool the block and write its gate key and its mean post-RoPE key (from
        ``k``, the static cache's keys ``[B, H, capacity, D]``) into row ``slot // 64``. (Until
        then the row is never scored: the current block is always read.)"""
        st = self.state
        buf, keys = st.bufs[layer], st.keys[layer]
        if layer not in self._appended:
            buf.index_copy_(2, self.off1, k_pre.to(buf.dtype))
        if not st.fills:
            return
        bs = st.block_size
        with torch.no_grad():
            pooled = block_pool(buf, bs, st.k_pooling, self.valid)
            key = gate.block_keys(pooled, rope=self.block_rope)
            block = k.index_select(2, self.cur * bs + torch.arange(bs, device=k.device))
            mean = block_pool(block.float(), bs, ("avg",), self.valid)
        if st.key_format == "model":
            keys.index_copy_(2, self.cur1, key.to(keys.dtype))
        else:  # (index_copy_ through byte views: float8 has no index_copy_ kernel everywhere)
            key8, scale = eight_bit_keys(key, st.key_format)
            keys.view(torch.uint8).index_copy_(2, self.cur1, key8.view(torch.uint8))
            st.scales[layer].index_copy_(2, self.cur1, scale)
        st.means[layer].index_copy_(2, self.cur1, mean.to(st.means[layer].dtype))

    def gate_keys(self, layer):
        return self.state.keys[layer]

    def key_scales(self, layer):
        """The scales ``[B, H, NB]`` of 8-bit :meth:`gate_keys` (None with keys in the model's dtype)."""
        return self.state.scales[layer]

    def block_means(self, layer):
        return self.state.means[layer]

    def full_blocks(self, width):
        """Bool ``[B, 1, width]``: each sequence's full blocks (as :meth:`.decode_cache.DecodeStep.full_blocks`)."""
        if width not in self._full:
            self._full[width] = decode_full_blocks(self.state.first_block, self.cur, width)
        return self._full[width]

    def _prepared(self, cfg, num_heads):
        """Bias ``[B, 1, NB]``, forced ``[B, 1, NB]`` (threshold, mass; None for the top-k
        methods), counts ``[B, H]`` (top-k methods) and top-k width of ``cfg``'s method, as
        :func:`~.selection.prepare_decode_selection` makes them (the top-k methods' by
        :func:`~seer_attn.kernels.decode_select.decode_window`: one launch on a GPU with
        :data:`ONE_LAUNCH_WINDOW`, its torch reference otherwise)."""
        method, budget, share = cfg.seer_decode_method, cfg.seer_decode_budget, cfg.seer_decode_share
        local = cfg.seer_decode_keep_local
        key = (method, budget, share, num_heads, local)
        if key in self._selection:
            return self._selection[key]
        if method not in DECODE_METHODS:
            raise ValueError(f"decode method must be one of {DECODE_METHODS}, got {method!r}")
        st = self.state
        NB = st.num_blocks
        if method not in DECODE_SCORE_METHODS:  # one launch on a GPU with ONE_LAUNCH_WINDOW
            least = 2 + local  # sink, local, current
            k = min(NB, max(least, budget // st.block_size if method == "budget" else math.ceil(share * NB)))
            bias, cnt = decode_window(st.first_block, self.cur, NB, local, num_heads, k,
                                      share if method == "share" else None,
                                      backend="auto" if ONE_LAUNCH_WINDOW else "torch")
            self._selection[key] = (bias, None, cnt, k)
            return self._selection[key]
        outside, forced = decode_window_masks(st.first_block, self.cur, NB, local)
        outside.index_fill_(1, self.cur1, True)  # (the score methods leave the current block out of the softmax)
        bias = torch.zeros(forced.shape, device=forced.device).masked_fill_(outside, float("-inf"))
        self._selection[key] = (bias[:, None], forced[:, None], None, NB)
        return self._selection[key]

    def every_block(self, num_heads):
        """``(idx, cnt)`` reading every block of each sequence (:func:`~.selection.decode_every_block`
        over the cache's capacity in blocks; made once per step)."""
        key = ("every", num_heads)
        if key not in self._selection:
            self._selection[key] = decode_every_block(self.state.first_block, self.cur, self.state.num_blocks,
                                                      num_heads)
        return self._selection[key]

    def select(self, scores, cfg):
        """``(idx, cnt)`` of the decode gate's logits ``[B, H, NB]`` (:func:`~.selection.select_decode_blocks`)."""
        bias, forced, cnt, k = self._prepared(cfg, scores.shape[1])
        if cnt is not None:  # the kept ones first (one kernel on a GPU: bias add and selection, no sort)
            return top_blocks(scores, bias, cnt, k), cnt
        return score_selection(scores.float() + bias, forced, k, cfg.seer_decode_method,
                               cfg.seer_decode_threshold, cfg.seer_decode_mass)

    def gate_select(self, gate, q_pre, keys, cfg):
        """With :data:`ONE_LAUNCH_GATE` on, ``(idx, cnt)`` of the decode gate's own logits (no prior)
        by a method that keeps a count per row (budget, share): the query's projection, then the
        scoring and the selection in one launch on a GPU
        (:func:`~seer_attn.kernels.decode_select.gate_top_blocks`); the same blocks as :meth:`select`
        of :meth:`.DecodeGate.step_logits` (up to float32 summation order). None otherwise (the
        caller scores, then selects; also with 8-bit keys, which the one launch does not score)."""
        if not ONE_LAUNCH_GATE or keys.element_size() == 1:
            return None
        bias, _, cnt, k = self._prepared(cfg, keys.shape[1])
        if cnt is None:
            return None
        y, rope = gate.step_query(q_pre, keys.dtype, self.q_rope(keys.dtype))
        return gate_top_blocks(y, keys, rope, bias, cnt, k), cnt

    def note_kept(self, cnt):
        self._counts.append(cnt)

    def finish(self):
        """Add the step's kept shares to the statistics (one count tensor for every layer with
        the top-k methods: two ops per step)."""
        cnts, stats = self._counts, self.state.stats
        if not cnts:
            return
        if all(c is cnts[0] for c in cnts):
            stats.kept.add_(cnts[0].float().mean(1) * (len(cnts) / self.n))
        else:
            stats.kept.add_(torch.stack(cnts).float().mean(2).sum(0) / self.n)
        stats.layers.add_(len(cnts))


#: vocabulary chunk of :func:`greedy_pick`'s two-stage argmax
ARGMAX_CHUNK = 256


def greedy_pick(logits):
    """The argmax token of logits ``[B, V]``, long ``[B, 1]`` (ties and NaN as ``argmax``: the
    first). In two stages when ``V`` is a multiple of :data:`ARGMAX_CHUNK`: each chunk's max
    and its first index, then the first chunk holding the largest (torch's one-stage argmax
    of a few long rows runs with few programs: 36 us of an 8B-shaped decode token at B = 4 on
    an H100, session 41)."""
    B, V = logits.shape
    if V % ARGMAX_CHUNK or V < 4 * ARGMAX_CHUNK:
        return logits.argmax(-1, keepdim=True)
    best, within = logits.view(B, V // ARGMAX_CHUNK, ARGMAX_CHUNK).max(-1)  # [B, chunks]
    chunk = best.argmax(-1, keepdim=True)
    return chunk * ARGMAX_CHUNK + within.gather(1, chunk)


def sampling_pick(temperature=1.0, top_k=None, top_p=None):
    """A ``pick`` that samples from ``softmax(logits / temperature)`` restricted to the ``top_k``
    most likely tokens (None: all) and then to the smallest set of the most likely ones whose
    probability reaches ``top_p`` (nucleus sampling; None or 1: all; the most likely token is
    always kept), by the Gumbel-max trick (argmax of the scaled logits minus the log of Exp(1)
    noise): device ops only, so a CUDA graph replays it with fresh noise. The cuts are made
    in the order transformers' ``generate`` applies them (temperature, top-k, top-p).
    ``top_k=1`` is greedy: the argmax, ties to the lowest index (a bf16 model's top two logits
    are equal often enough, at 2 of 120 steps of a random SmolLM2-shaped one, that keeping
    every tied token, as a top-k cut does for larger k, would draw between them)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if top_k == 1:
        return greedy_pick
    nucleus = top_p is not None and top_p < 1.0

    def pick(logits):
        x = logits.float() / temperature
        if top_k is not None and top_k < x.shape[-1]:
            x = x.masked_fill(x < torch.topk(x, top_k, dim=-1).values[:, -1:], float("-inf"))
        if nucleus:  # drop a token when the more likely ones already hold top_p of the mass
            srt, order = torch.sort(x, dim=-1, descending=True)
            p = torch.softmax(srt, dim=-1)
            drop = (p.cumsum(-1) - p) >= top_p
            x = x.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
        return (x - torch.empty_like(x).exponential_().log()).argmax(-1, keepdim=True)
    return pick


def cache_arg(model):
    """The name of the KV-cache argument of ``model``'s stock transformers forward (``cache``
    from transformers 5.2x on, ``past_key_values`` before)."""
    stock = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.") and "forward" in vars(c))
    return "cache" if "cache" in inspect.signature(stock.forward).parameters else "past_key_values"


class GraphDecoder:
    """Decode steps over a filled static KV cache, eager or replayed from a CUDA graph.

    Args:
        model: a Seer causal LM; cache: a transformers ``StaticCache`` holding ``slot`` tokens
            (with ``seer_decode_sparsity``: and the pooled-K cache its prefill left, which this
            turns into a :class:`GraphDecodeState`).
        ids: long ``[B, 1]`` the next input tokens; pos: long ``[B, 1]`` their positions;
        slot: int, the next cache slot; mask: bool ``[B, 1, 1, S]``, the cache slots that
            hold real tokens (each step adds its own).
        pick: the next token of a step's logits ``[B, V]`` -> long ``[B, 1]`` (default
            :func:`greedy_pick`; :func:`sampling_pick` samples), run inside the graph.
        forced: optional long ``[B, N]``: teacher forcing (scoring a text as decode steps):
            step i feeds ``forced[:, i]`` next instead of the argmax and writes the negative
            log-likelihood of that token under the step's logits to ``nll[:, i]`` (float32).

    :meth:`step` runs one step (its output token lands in ``ids``): after ``warmup_steps``
    eager steps on a side stream the next is captured and every later one replayed.
    """

    def __init__(self, model, cache, ids, pos, slot, mask, forced=None, pick=None):
        from .decode_cache import pooled_k_cache
        self.model, self.cache, self.ids, self.pos, self.mask = model, cache, ids, pos, mask
        self.forced, self.pick = forced, pick or greedy_pick
        if forced is not None:
            self.i = torch.zeros(1, dtype=torch.long, device=ids.device)
            self.nll = torch.zeros(forced.shape, dtype=torch.float32, device=ids.device)
        self.slot_host = slot
        self.slot = torch.full((1,), slot, dtype=torch.long, device=ids.device)
        self.arg = cache_arg(model)
        self.graphs, self.seen, self.pool, self.state = {}, {}, None, None
        self.block_size = model.config.seer_block_size
        if model.config.seer_decode_sparsity:
            pooled = pooled_k_cache(cache)
            if pooled is None:
                raise ValueError("seer_decode_sparsity is on but the cache has no pooled-K cache (prefill with decode "
                                 "sparsity on)")
            k0 = cache.layers[0].keys
            lengths = {int(lyr.cumulative_length) for lyr in cache.layers if torch.is_tensor(lyr.cumulative_length)}
            if lengths - {slot}:
                raise ValueError(f"the static cache holds {sorted(lengths)} tokens but the next slot is {slot}: they "
                                 "must agree (each step writes its token at the slot)")
            gates = [layer.self_attn.attn_gate.decode_gate for layer in model.model.layers]
            self.state = pooled.graph = GraphDecodeState(pooled, gates, k0.shape[2], self.slot, k0.shape[1],
                                                         k0.shape[3], k0.dtype)
            model._last_decode_stats = self.state.stats
            model._seer_last_graph_state = self.state  # (for inspection)

    def _forward(self):
        self.mask.index_fill_(-1, self.slot, True)
        logits = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                            logits_to_keep=1, **{self.arg: self.cache}).logits
        if self.forced is None:
            self.ids.copy_(self.pick(logits[:, -1]))
        else:
            target = self.forced.index_select(1, self.i)  # [B, 1]
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            self.nll.index_copy_(1, self.i, -logp.gather(1, target))
            self.ids.copy_(target)
            self.i.add_(1)
        self.pos.add_(1)
        self.slot.add_(1)

    @torch.no_grad()
    def step(self, cuda_graph=True, warmup_steps=2):
        """One decode step. Two kinds of steps (the one that fills a block pools it), one graph
        each, captured after ``warmup_steps`` eager steps of that kind."""
        kind = self.slot_host % self.block_size == self.block_size - 1
        self.slot_host += 1
        if self.state is not None:
            self.state.fills = kind
        if kind in self.graphs:
            self.graphs[kind].replay()
        elif not cuda_graph:
            self._forward()
        elif self.seen.get(kind, 0) >= warmup_steps:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward()
            self.graphs[kind], self.pool = graph, graph.pool()
            graph.replay()
        else:  # warm-up on a side stream, as capture wants
            self.seen[kind] = self.seen.get(kind, 0) + 1
            dev = self.ids.device
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream(dev).wait_stream(side)


@torch.no_grad()
def static_from(cache, config, capacity):
    """A transformers ``StaticCache`` of ``capacity`` slots holding the keys and values of
    ``cache`` (a filled DynamicCache), with its pooled-K cache (if any) attached to it."""
    from transformers import StaticCache

    from .decode_cache import _STATES
    static = StaticCache(config=config, max_cache_len=capacity)
    for src, dst in zip(cache.layers, static.layers):
        dst.lazy_initialization(src.keys[:, :, :1], src.values[:, :, :1])
        n = src.keys.shape[2]
        dst.keys[:, :, :n] = src.keys
        dst.values[:, :, :n] = src.values
        dst.cumulative_length.fill_(n)
    if cache in _STATES:
        _STATES[static] = _STATES[cache]
    return static


@torch.no_grad()
def graph_prefill(model, input_ids, attention_mask, capacity):
    """The prompt's forward for graph-mode decoding: into a dynamic cache (a static one of
    ``capacity`` slots would make transformers build a ``[B, 1, T, capacity]`` mask), whose keys,
    values and pooled-K cache then move into a static cache (:func:`static_from`).

    Returns ``(logits, cache, mask, pos)``: the last position's logits ``[B, V]``, the static
    cache, the bool ``[B, 1, 1, capacity]`` mask of its real slots and the next token's
    positions long ``[B, 1]`` (what :class:`GraphDecoder` takes)."""
    from transformers import DynamicCache
    B, T = input_ids.shape
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    prefill = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{cache_arg(model): prefill})
    cache = static_from(prefill, model.config, capacity)
    mask = torch.zeros(B, 1, 1, capacity, dtype=torch.bool, device=input_ids.device)
    mask[:, 0, 0, :T] = attention_mask.bool()
    return out.logits[:, -1], cache, mask, pos[:, -1:] + 1


@torch.no_grad()
def graph_generate(model, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None, cuda_graph=None,
                   warmup_steps=2, do_sample=False, temperature=1.0, top_k=None, top_p=None):
    """Generation with the decode steps replayed from one CUDA graph: greedy, or sampled
    (``do_sample``: :func:`sampling_pick` with ``temperature``, ``top_k`` and ``top_p``; seed with
    ``torch.manual_seed``).

    The prompt (left-padded when ``attention_mask`` has zeros) is prefilled in the model's mode
    (sparse prefill in ``seer_mode="sparse"``) and moved into a transformers ``StaticCache`` of
    ``prompt + max_new_tokens`` slots (:func:`graph_prefill`); the decode steps attend sparsely under
    ``seer_decode_sparsity`` (:class:`GraphDecodeStep`) and densely otherwise (the stock
    attention over the static cache with a ``[B, 1, 1, S]`` mask). After ``warmup_steps``
    eager steps one step is captured (``cuda_graph``: default on CUDA) and replayed
    (:class:`GraphDecoder`).

    Returns long ``[B, prompt + n]``, n <= ``max_new_tokens`` (fewer when every row ended);
    after a row's ``eos_token_id`` its tokens are ``eos_token_id``. Raises ValueError on bad
    arguments and for models with sliding-window layers (their window is not in the mask).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a long tensor [B, T], got {getattr(input_ids, 'shape', type(input_ids))}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    pick = sampling_pick(temperature, top_k, top_p) if do_sample else greedy_pick
    windowed = [i for i, layer in enumerate(model.model.layers) if getattr(layer.self_attn, "sliding_window", None)]
    if windowed:
        raise ValueError(f"seer_generate does not support sliding-window layers (layers {windowed[:4]}...): use "
                         "generate")
    dev = input_ids.device
    cuda_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=dev)
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, got {tuple(attention_mask.shape)}")
    logits, cache, mask, pos = graph_prefill(model, input_ids, attention_mask, T + max_new_tokens)
    tokens = torch.empty(B, max_new_tokens, dtype=torch.long, device=dev)
    tokens[:, :1] = pick(logits)
    dec = GraphDecoder(model, cache, tokens[:, :1].clone(), pos, T, mask, pick=pick)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for i in range(1, max_new_tokens):
        dec.step(cuda_graph=cuda_graph, warmup_steps=warmup_steps)
        tokens[:, i:i + 1] = dec.ids
        if eos_token_id is not None and i % 16 == 0:
            done |= (tokens[:, :i + 1] == eos_token_id).any(-1)
            if bool(done.all()):
                tokens = tokens[:, :i + 1]
                break
    if eos_token_id is not None:
        after = (tokens == eos_token_id).long().cumsum(-1) > 0
        after = torch.cat([torch.zeros_like(after[:, :1]), after[:, :-1]], dim=1)
        tokens = tokens.masked_fill(after, eos_token_id)
    return torch.cat([input_ids, tokens], dim=1)
