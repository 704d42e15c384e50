"""Decode benchmark: the sparse decode kernel against dense decode, the decode gate's overhead,
and time per output token of an 8B-shaped model, dense vs sparse decode, in one run.

Kernel part: Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128), bf16, one
decode step (one query token per sequence against a full KV cache of S slots), for every
batch size B and length S: SDPA with the flash and cuDNN backends (dense, GQA without
repeating K/V) and ours (:func:`block_sparse_decode`) with every block and with ``share``
of the blocks as the model selects them (the decode gate's top-k plus the sink and the
current block); ours with no block at all (the launch floor: host work and two launches);
then what a layer runs before the kernel (the decode gate's logits, with ``prior`` > 0 the
mean-pooled prior mixed in, and the top-k, ``gate_select_layer``; with the selection's
per-block preparation, ``gate_select_step``) and
its share of the sparse step (gate / (gate + kernel)); and the layer's gate, selection and
kernel replayed from a CUDA graph as a graph-mode step runs them (``graph_layer``: the GPU's own
time, no host work: since session 39 the query's projection, ``gate_scores`` and ``top_blocks``,
or with ``--one-launch-gate`` ``gate_top_blocks``; ``graph_gate_select`` without the kernel;
up to session 38 this row replayed the eager step's sorted torch top-k instead) against the
eager step's ops launched one by one (``eager_layer``). Correctness first: ours with
every block vs SDPA, ours sparse vs the fp32 torch reference. ``--key-format f8`` / ``i8``
scores block keys stored in 8 bits with a scale per block (``seer_decode_key_format``), in
the kernel rows and end to end.

End to end (``e2e``, ``BxT`` settings): a SeerLlama of the 8B shape with random weights
(``layers`` layers, bf16, decode gates), a **pre-filled cache** of T random keys/values per
layer (preallocated, so appending a token copies nothing; its pooled-K cache pooled from
random pre-RoPE keys), then ``steps`` decode steps of B sequences, timed one forward at a
time with CUDA events (median); dense decode (SDPA restricted to the flash backend) vs
sparse decode at ``share``. The prefill is not timed (bench-ttft measures it); the timed
steps stay inside one block, so the pooling of a block that fills (once per 64 steps) is
not timed either. The same steps replayed from a CUDA graph (``graph_*``: dense through our
kernel with every block, unscored), and with the layers fused (``graph_fused_*``:
``seer_compile_pointwise``, and since session 41 ``seer_merge_projections``) for both.
``--shared-kv`` gives every layer one KV buffer (each with its own length): the 8B shape's
32 layers at 4 x 128k hold 69 GB of KV cache apart, ~2 GB shared, so an 80 GB GPU runs them;
each layer's reads still come from HBM (a layer's cache is 2.1 GB, its 10% 215 MB, the L2
50 MB), which keeps the time per token, not the memory, the 8B model's.

    python -m seer_attn.eval.bench_decode --out seer_outputs/bench-decode

or from Python, ``run_decode_bench(DecodeBenchConfig(lengths=(32768,), e2e=()))``. Writes
``decode.json`` (a results envelope of kind ``"decode"``, :mod:`seer_attn.training.results`:
provenance, ``config`` the :class:`DecodeBenchConfig`, ``resolved`` the shape and the
kernel's launch configuration, kernel rows, plus ``e2e``, ``checks`` and ``tuning``),
``decode.csv``, ``decode_e2e.csv`` and, when matplotlib is installed, ``decode.png``. Needs
a CUDA GPU (without one: a one-line error, exit code 2). Kernel times:
``triton.testing.do_bench`` medians (CUDA events), never wall clock.
"""
import argparse
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from seer_attn.modeling_seer.decode_graph import cache_arg
from seer_attn.modeling_seer.selection import DECODE_KEY_FORMATS, DEFAULT_DECODE_KEY_FORMAT
from seer_attn.training import cli_args as ca
from seer_attn.training.run_config import RunConfig, config_from_args, default, flag, option, text
from .bench_kernels import rel_err, write_csv

HQ, H, D, BS = 32, 8, 128, 64
#: What ``--shared-kv`` changes, for results and tables: HBM traffic per layer stays a layer's own
SHARED_KV_NOTE = ("every layer's KV cache one buffer: each layer still reads its blocks from HBM, "
                  "2.1 GB dense / 215 MB sparse a layer at 4 x 128k against a 50 MB L2")
#: timed end-to-end steps at most: 3 warm-up steps and the timed ones stay inside one block
MAX_STEPS = BS - 4


def batch_by_length(value):
    """``BxT`` (e.g. ``4x131072``, or a ``(B, T)`` pair) as ``(B, T)``."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        b, t = value
    else:
        try:
            b, t = (int(x) for x in str(value).lower().split("x"))
        except ValueError:
            raise ca.ArgValueError(f"{value!r} is not BATCHxTOKENS (e.g. 4x131072)") from None
    if isinstance(b, bool) or isinstance(t, bool) or not isinstance(b, int) or not isinstance(t, int) \
            or b < 1 or t < 2 * BS or t % BS:
        raise ca.ArgValueError(f"{value!r}: expected a batch >= 1 and a multiple of {BS} tokens >= {2 * BS} (the "
                               "timed steps then stay inside one block, so every run starts from the same cache)")
    return b, t


def decode_steps(value):
    """Timed end-to-end steps: an integer in [1, :data:`MAX_STEPS`]."""
    n = ca.positive_int(value)
    if n > MAX_STEPS:
        raise ca.ArgValueError(f"expected at most {MAX_STEPS} (3 warm-up steps and the timed ones stay in one block)",
                               value)
    return n


@dataclass(frozen=True, kw_only=True)
class DecodeBenchConfig(RunConfig):
    """One decode benchmark run (each field is the option of the same name)."""

    lengths: tuple = option((32768, 131072), ca.int_at_least(2 * BS), many="+")  # kernel part: cache lengths
    batches: tuple = option((1, 16), ca.positive_int, many="+")  # kernel part: batch sizes
    share: float = option(0.1, ca.unit_interval)  # share of KV blocks read by sparse decode
    prior: float = option(0.0, ca.float_in(0, 1, low_open=False))  # seer_decode_meanpool_prior of the sparse steps
    e2e: tuple = option(((4, 131072), (16, 32768)), batch_by_length, many="*")  # (B, T); none: skip
    layers: int = option(32, ca.positive_int)  # decoder layers of the 8B-shaped model
    steps: int = option(16, decode_steps)  # timed decode steps per end-to-end setting
    tune: bool = option(False, flag)  # sweep the kernel's launch configs first, keep the fastest
    one_launch_gate: bool = option(False, flag)  # graph steps: gate_top_blocks (decode_graph.ONE_LAUNCH_GATE)
    top_blocks_bits: int = option(None, ca.positive_int, choices=(1, 2, 4, 8))  # None: decode_select's default
    no_early_stop: bool = option(False, flag)  # top_blocks' bisection runs every pass (TOP_BLOCKS_EARLY_STOP off)
    no_one_launch_window: bool = option(False, flag)  # graph steps' bias and counts by torch ops (ONE_LAUNCH_WINDOW off)
    shared_kv: bool = option(False, flag)  # e2e: all layers' KV cache one buffer (32 layers fit an 80 GB GPU)
    key_format: str = option(DEFAULT_DECODE_KEY_FORMAT, text, choices=DECODE_KEY_FORMATS)  # of the gate keys
    out: str = option("seer_outputs/bench-decode", text)


def _default(name):
    return default(DecodeBenchConfig, name)


def parser() -> argparse.ArgumentParser:
    """The command line of the benchmark (module docstring; defaults: :class:`DecodeBenchConfig`'s)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=ca.int_at_least(2 * BS), nargs="+", default=_default("lengths"),
                    help="KV cache lengths of the kernel part")
    ap.add_argument("--batches", type=ca.positive_int, nargs="+", default=_default("batches"),
                    help="batch sizes of the kernel part")
    ap.add_argument("--share", type=ca.unit_interval, default=_default("share"),
                    help="share of KV blocks read by sparse decode")
    ap.add_argument("--prior", type=ca.float_in(0, 1, low_open=False), default=_default("prior"),
                    help="seer_decode_meanpool_prior of the sparse steps, in the kernel rows' gate_select and "
                         "layer times and end to end (0: the decode gate alone)")
    ap.add_argument("--e2e", type=batch_by_length, nargs="*", default=_default("e2e"), metavar="BxT",
                    help="end-to-end settings (batch x cache tokens); none: skip")
    ap.add_argument("--layers", type=ca.positive_int, default=_default("layers"),
                    help="decoder layers of the 8B-shaped model")
    ap.add_argument("--steps", type=decode_steps, default=_default("steps"),
                    help=f"timed decode steps per end-to-end setting (at most {MAX_STEPS})")
    ap.add_argument("--tune", action="store_true", help="sweep the kernel's launch configs first, keep the fastest")
    ap.add_argument("--one-launch-gate", action="store_true",
                    help="graph-mode steps score the gate's blocks and select them in one launch (gate_top_blocks; "
                         "measured slower than the default two), in the kernel rows' graph_layer and end to end")
    ap.add_argument("--top-blocks-bits", type=int, choices=(1, 2, 4, 8), default=None,
                    help="key bits each selection pass of top_blocks settles (1: bisection, 8: radix select; "
                         "default: kernels.decode_select.TOP_BLOCKS_BITS)")
    ap.add_argument("--no-early-stop", action="store_true",
                    help="top_blocks' bisection runs all 32 passes instead of stopping once exactly the kept count is "
                         "at or above its candidate (kernels.decode_select.TOP_BLOCKS_EARLY_STOP, on since session 42)")
    ap.add_argument("--no-one-launch-window", action="store_true",
                    help="graph-mode steps make the selection's bias and counts by ~20 torch ops instead of one "
                         "launch (decode_window; decode_graph.ONE_LAUNCH_WINDOW, on since session 42)")
    ap.add_argument("--shared-kv", action="store_true",
                    help="end to end: every layer's KV cache is one buffer, so that 32 layers at 4 x 128k fit an 80 GB "
                         "GPU; each layer still reads its own blocks from HBM (2.1 GB dense / 215 MB sparse a layer "
                         "against a 50 MB L2)")
    ap.add_argument("--key-format", choices=DECODE_KEY_FORMATS, default=_default("key_format"),
                    help="how the decode gate's block keys are stored (seer_decode_key_format): the model's dtype, or "
                         "8 bits (float8 e4m3 / int8) with a float32 scale per block; kernel rows and end to end "
                         "(default: %(default)s, the model's)")
    ap.add_argument("--out", default=_default("out"), help="output folder (default: %(default)s)")
    ap.add_argument("--plot", default=None, help="only redraw the PNG from this CSV")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    config = config_from_args(DecodeBenchConfig, args, parser=ap)
    if args.plot:
        return plot(args.plot, None, os.path.join(os.path.dirname(args.plot), "decode.png"))
    ca.require_cuda(ap.prog)
    return run_decode_bench(config)


def run_decode_bench(config: DecodeBenchConfig) -> dict:
    """The benchmark (module docstring) as ``config`` says, on the CUDA GPU; returns the
    envelope written to ``decode.json``."""
    if not isinstance(config, DecodeBenchConfig):
        raise TypeError(f"run_decode_bench takes a DecodeBenchConfig, got {type(config).__name__}")
    if not torch.cuda.is_available():
        raise ValueError("the decode benchmark needs a CUDA GPU, and torch sees none")
    os.makedirs(config.out, exist_ok=True)
    from seer_attn.kernels import decode_select
    from seer_attn.modeling_seer import decode_graph
    kept = (decode_graph.ONE_LAUNCH_GATE, decode_select.TOP_BLOCKS_BITS, decode_select.TOP_BLOCKS_EARLY_STOP,
            decode_graph.ONE_LAUNCH_WINDOW)
    decode_graph.ONE_LAUNCH_GATE = config.one_launch_gate
    if config.top_blocks_bits is not None:
        decode_select.TOP_BLOCKS_BITS = config.top_blocks_bits
    decode_select.TOP_BLOCKS_EARLY_STOP = decode_select.TOP_BLOCKS_EARLY_STOP and not config.no_early_stop
    decode_graph.ONE_LAUNCH_WINDOW = decode_graph.ONE_LAUNCH_WINDOW and not config.no_one_launch_window
    try:
        return _run(config)
    finally:
        (decode_graph.ONE_LAUNCH_GATE, decode_select.TOP_BLOCKS_BITS, decode_select.TOP_BLOCKS_EARLY_STOP,
         decode_graph.ONE_LAUNCH_WINDOW) = kept


def _run(config):
    checks, tuning = [], []
    if config.tune:
        tuning = tune(config)
    rows = []
    for S in config.lengths:
        for B in config.batches:
            torch.cuda.empty_cache()
            row, check = kernel_row(B, S, config.share, config.prior, config.key_format)
            rows.append(row)
            checks.append(check)
            print("check", json.dumps(check), flush=True)
            print("row", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
    e2e = []
    if config.e2e:
        e2e, e2e_checks = end_to_end(config)
        checks += e2e_checks
    env = write_results(config, rows, e2e, checks, tuning)
    try:
        plot(os.path.join(config.out, "decode.csv"), os.path.join(config.out, "decode_e2e.csv") if e2e else None,
             os.path.join(config.out, "decode.png"))
    except ImportError:
        print("matplotlib missing: CSV written, redraw with --plot", os.path.join(config.out, "decode.csv"))
    print_table(rows, e2e, env["provenance"], config.share)
    return env


# ----------------------------------------------------------------------------- kernel

def _bench(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def capture_graph(fn, warmup=3):
    """A CUDA graph of ``fn``, captured after ``warmup`` calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _graph_bench(fn):
    """Median ms of ``fn`` replayed from a CUDA graph (:func:`capture_graph`), or the capture's
    error as a string."""
    try:
        return _bench(capture_graph(fn).replay)
    except Exception as e:  # reported in the row, not fatal: the eager numbers stand without it
        return f"capture failed: {type(e).__name__}: {str(e)[:120]}"


def _sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    with sdpa_kernel(be):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _decode_inputs(B, S, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


def gate_step(B, S, share, seed, device="cuda", prior=0.0, key_format="model"):
    """What the model runs before the kernel in one layer's decode step, at this shape: a
    decode gate (random weights), its cached block keys (bf16, or 8-bit with a scale per block
    under ``key_format`` ``"f8"`` / ``"i8"``; a view of a buffer with room
    to grow, as the pooled-K cache holds them), the query's RoPE; with ``prior`` > 0 the
    mean-pooled prior mixed in (:func:`~seer_attn.modeling_seer.selection.with_decode_meanpool_prior`,
    on random block means laid out as the pooled-K cache keeps them); returns ``(step, per_layer,
    graph_select)``, functions returning ``(idx, cnt)``: ``per_layer`` what every layer of an
    eager step runs (logits, sorted top-k), ``step`` that plus the selection's preparation (made
    once per block of 64 steps for all layers: an upper bound of its share), ``graph_select`` what
    a layer of a graph-mode step runs (the logits, with the prior mixed in, then
    :func:`~seer_attn.kernels.decode_select.top_blocks`; with ``decode_graph.ONE_LAUNCH_GATE`` and
    no prior, :func:`~seer_attn.kernels.decode_select.gate_top_blocks`)."""
    from seer_attn.modeling_seer.decode_gate import DecodeGate
    from seer_attn.modeling_seer.selection import (prepare_decode_selection, select_decode_blocks,
                                                   with_decode_meanpool_prior)
    torch.manual_seed(seed)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    gate = DecodeGate(HQ, H, D).to(device)
    cur = (S - 1) // BS  # the new token's block; the full blocks before it are the candidates
    buf = torch.randn(B, H, 2 * cur + 2, gate.hidden_size, device=device).to(dt)
    scales = None
    if key_format != "model":  # as the pooled-K cache stores them (seer_decode_key_format)
        from seer_attn.kernels.decode_select import eight_bit_keys
        buf, scale_buf = eight_bit_keys(buf, key_format)
        scales = scale_buf[:, :, :cur + 1]
    keys = buf[:, :, :cur + 1]  # the full blocks and the current block's row
    q_pre = torch.randn(B, HQ, 1, D, device=device).to(dt)
    inv = 1.0 / (500000.0 ** (torch.arange(0, gate.hidden_size, 2, device=device).float() / gate.hidden_size))
    e = torch.cat([torch.full((B, 1), S - 1.0, device=device) * inv] * 2, -1)  # [B, G]
    rope = (e.cos().to(dt), e.sin().to(dt))
    first = torch.zeros(B, dtype=torch.long, device=device)
    prepared = prepare_decode_selection(first, cur, "share", share=share, num_heads=H)
    if prior > 0:
        means = torch.randn(B, H, 2 * cur + 2, D, device=device).to(dt)[:, :, :cur + 1]
        q_post = torch.randn(B, HQ, 1, D, device=device).to(dt)
        full = (torch.arange(cur + 1, device=device) < cur).expand(B, 1, cur + 1).contiguous()

    from seer_attn.kernels.decode_select import gate_top_blocks, top_blocks
    from seer_attn.modeling_seer import decode_graph

    def logits():
        s = gate.step_logits(q_pre, keys, rope, scales).squeeze(2)
        return with_decode_meanpool_prior(s, q_post, means, full, D ** -0.5, prior) if prior > 0 else s

    @torch.no_grad()
    def per_layer():  # what every layer runs
        return select_decode_blocks(logits(), first, "share", prepared=prepared)

    @torch.no_grad()
    def step():  # plus the preparation made once per block for all layers
        return select_decode_blocks(logits(), first, "share",
                                    prepared=prepare_decode_selection(first, cur, "share", share=share, num_heads=H))

    @torch.no_grad()
    def graph_select():  # what a layer of a graph-mode step runs (decode_graph.GraphDecodeStep)
        bias, cnt, k = prepared["bias"], prepared["cnt"], prepared["k"]
        if prior > 0 or not decode_graph.ONE_LAUNCH_GATE or scales is not None:
            return top_blocks(logits(), bias, cnt, k), cnt
        y, r = gate.step_query(q_pre, dt, rope)
        return gate_top_blocks(y, keys, r, bias, cnt, k), cnt
    return step, per_layer, graph_select


def kernel_row(B, S, share, prior=0.0, key_format="model"):
    from seer_attn.kernels import block_sparse_decode
    from seer_attn.kernels.reference import block_sparse_decode_ref
    q, k, v = _decode_inputs(B, S, seed=S + B)
    NB = -(-S // BS)
    lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
    full = torch.ones(B, H, NB, dtype=torch.bool, device="cuda")
    step, per_layer, graph_select = gate_step(B, S, share, seed=B, prior=prior, key_format=key_format)
    idx, cnt = per_layer()
    none = torch.zeros_like(cnt)

    def ours(sel, counts=None):
        return block_sparse_decode(q, k, v, sel, lens, seq_starts=None, block_counts=counts, check_lengths=False)

    def layer():  # gate, selection and kernel: one layer's sparse decode attention
        i, c = per_layer()
        return ours(i, c)

    ref = _sdpa(q, k, v, "flash")
    check = {"B": B, "S": S, "all_blocks_vs_sdpa_flash": rel_err(ours(full), ref),
             "nan": bool(torch.isnan(ours(idx, cnt)).any())}
    if B * S <= 4 * 131072:
        check["sparse_vs_fp32_ref"] = rel_err(ours(idx, cnt),
                                              block_sparse_decode_ref(q.float(), k.float(), v.float(), idx, lens,
                                                                      block_counts=cnt))
    row = {"B": B, "S": S, "share_target": share, "prior": prior, "key_format": key_format,
           "blocks_read": cnt.float().mean().item(), "share_read": cnt.float().mean().item() / NB}
    row["sdpa_flash"] = _bench(lambda: _sdpa(q, k, v, "flash"))
    try:
        row["sdpa_cudnn"] = _bench(lambda: _sdpa(q, k, v, "cudnn"))
    except RuntimeError as e:
        print("cudnn unavailable:", str(e)[:100], flush=True)
        row["sdpa_cudnn"] = float("nan")
    row["ours_all"] = _bench(lambda: ours(full))
    row["ours_sparse"] = _bench(lambda: ours(idx, cnt))
    row["ours_empty"] = _bench(lambda: ours(idx, none))  # no block read: the launch floor
    row["gate_select_layer"] = _bench(per_layer)
    row["gate_select_step"] = _bench(step)  # with the per-block preparation (shared by all layers)
    row["gate_share_of_sparse_step"] = row["gate_select_layer"] / (row["gate_select_layer"] + row["ours_sparse"])
    row["eager_layer"] = _bench(layer)
    # replayed from a CUDA graph as a graph-mode step runs it (decode_graph.GraphDecodeStep's selection)
    row["graph_layer"] = _graph_bench(lambda: ours(*graph_select()))
    row["graph_gate_select"] = _graph_bench(graph_select)
    # the kernel alone replayed from a CUDA graph: its GPU time without the host's launch work,
    # which the eager numbers above include at B=1 (the empty selection costs as much as 10%)
    row["ours_sparse_graph"] = _graph_bench(lambda: ours(idx, cnt))
    row["ours_empty_graph"] = _graph_bench(lambda: ours(idx, none))
    # dense decode replayed the same way (session 43): our kernel over every block (the end-to-end rows' dense
    # baseline inside the graph step) against SDPA's flash and cuDNN kernels, none with the host's launch work
    from seer_attn.modeling_seer.selection import decode_every_block
    every, every_cnt = decode_every_block(torch.zeros(B, dtype=torch.long, device="cuda"), NB - 1, NB, H)
    row["ours_all_graph"] = _graph_bench(lambda: ours(every, every_cnt))
    row["sdpa_flash_graph"] = _graph_bench(lambda: _sdpa(q, k, v, "flash"))
    row["sdpa_cudnn_graph"] = _graph_bench(lambda: _sdpa(q, k, v, "cudnn"))
    row["speedup_vs_flash"] = row["sdpa_flash"] / row["ours_sparse"]
    row["speedup_vs_cudnn"] = row["sdpa_cudnn"] / row["ours_sparse"]
    kv_bytes = 2 * B * H * D * 2  # K and V, bf16, per cache slot
    row["tbps_sdpa_flash"] = kv_bytes * S / row["sdpa_flash"] / 1e9
    row["tbps_ours_sparse"] = kv_bytes * row["blocks_read"] * BS / row["ours_sparse"] / 1e9
    return row, check


def tune(config):
    """Sweep the decode kernel's launch configs (tile blocks, warps, stages, programs per SM)
    at B = 1 and 16 over the longest length; keep the one with the least summed time."""
    import importlib

    from seer_attn.kernels import block_sparse_decode
    mod = importlib.import_module("seer_attn.kernels.block_sparse_decode")
    S = max(config.lengths)
    cases = []
    for B in sorted(set(config.batches)):
        q, k, v = _decode_inputs(B, S, seed=7)
        _, per_layer, _ = gate_step(B, S, config.share, seed=B)
        idx, cnt = per_layer()
        lens = torch.full((B,), S, dtype=torch.int32, device="cuda")
        cases.append((B, q, k, v, idx, cnt, lens))
    out, best = [], None
    for per_sm in (0.5, 1, 2, 4, 8):  # 0.5: one part per list at B=16 on 132 SMs (one launch)
        for cfg in [(1, 4, 2), (1, 4, 3), (1, 4, 4), (1, 8, 3), (2, 4, 3), (2, 8, 3)]:
            mod.CONFIG_OVERRIDES[D] = cfg
            mod._TARGET_PROGRAMS_PER_SM = per_sm
            total, entry = 0.0, {"config": cfg, "programs_per_sm": per_sm}
            try:
                for B, q, k, v, idx, cnt, lens in cases:
                    ms = _bench(lambda: block_sparse_decode(q, k, v, idx, lens, block_counts=cnt, check_lengths=False))
                    entry[f"B{B}_ms"] = ms
                    total += ms
            except Exception as e:  # a config that does not fit is skipped, reported
                entry["error"] = str(e)[:80]
                total = math.inf
            out.append(entry)
            print("tune", json.dumps(entry), flush=True)
            if best is None or total < best[0]:
                best = (total, cfg, per_sm)
    mod.CONFIG_OVERRIDES[D] = best[1]
    mod._TARGET_PROGRAMS_PER_SM = best[2]
    print(f"chosen: config {best[1]}, {best[2]} programs per SM", flush=True)
    del cases
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- end to end

def _prealloc_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocLayer(DynamicLayer):
        """A DynamicLayer over preallocated buffers: appending writes in place (no concatenation
        copy of the whole cache per token), ``keys`` / ``values`` are views of the used slots."""

        def __init__(self, keys, values, length):
            super().__init__()
            self.buf_k, self.buf_v, self.n = keys, values, length
            self.device, self.dtype = keys.device, keys.dtype
            self.is_initialized = True
            self._views()

        def _views(self):
            self.keys, self.values = self.buf_k[:, :, :self.n], self.buf_v[:, :, :self.n]

        def update(self, key_states, value_states, *args, **kwargs):
            t = key_states.shape[-2]
            self.buf_k[:, :, self.n:self.n + t] = key_states
            self.buf_v[:, :, self.n:self.n + t] = value_states
            self.n += t
            self._views()
            return self.keys, self.values

        def rewind(self, length):
            self.n = length
            self._views()

    return PreallocLayer


def _model(layers):
    from seer_attn.modeling_seer import SeerLlamaForCausalLM
    from .bench_ttft import llama8b_config
    cfg = llama8b_config(131072, layers)
    for key, val in dict(seer_decode_gate=True, seer_decode_method="share").items():
        setattr(cfg, key, val)
    cfg.validate_seer()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = SeerLlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    for layer in model.model.layers:
        layer.self_attn.attn_gate.float()
    return model


@torch.no_grad()
def filled_cache(model, B, T, extra, shared=False):
    """A KV cache of T random keys/values per layer (room for ``extra`` more tokens) on the
    model's device and dtype, and its pooled-K cache, pooled from random pre-RoPE keys. With
    ``shared`` every layer's keys/values are one buffer (:data:`SHARED_KV_NOTE`); each layer keeps its
    own length."""
    from transformers import DynamicCache
    cfg = model.config
    p = next(model.model.layers[0].self_attn.k_proj.parameters())
    dev, dt = p.device, p.dtype
    kv_heads, head_dim = cfg.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    Layer = _prealloc_layer_class()
    cache = DynamicCache(config=cfg)
    gen = torch.Generator(device=dev).manual_seed(T + B)
    layers = []
    for i in range(cfg.num_hidden_layers):
        if i == 0 or not shared:
            k = torch.zeros(B, kv_heads, T + extra, head_dim, device=dev, dtype=dt)
            v = torch.zeros_like(k)
            k[:, :, :T].normal_(generator=gen)
            v[:, :, :T].normal_(generator=gen)
        layers.append(Layer(k, v, T))
    cache.layers = layers
    return cache, _pooled_for(model, cache, B, T, gen)


@torch.no_grad()
def _pooled_for(model, cache, B, T, gen):
    """The pooled-K cache of ``cache``'s first T slots, pooled from random pre-RoPE keys."""
    from seer_attn.modeling_seer.decode_cache import _STATES, DecodeStep, PooledKCache
    cfg = model.config
    p = next(model.model.layers[0].self_attn.k_proj.parameters())
    kv_heads, head_dim = cfg.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    state = PooledKCache(cfg.num_hidden_layers, torch.zeros(B, dtype=torch.long, device=p.device),
                         cfg.seer_block_size, cfg.seer_k_pooling, cfg.seer_decode_key_format)
    _STATES[cache] = state
    fill = DecodeStep(state, 0, T, model.model._gate_rope_at, p.device)
    for i, layer in enumerate(model.model.layers):
        k_pre = torch.randn(B, kv_heads, T, head_dim, device=p.device, dtype=p.dtype, generator=gen)
        fill.record(i, k_pre, layer.self_attn.attn_gate.decode_gate, cache.layers[i].keys)
        del k_pre
    fill.finish()
    return state


@torch.no_grad()
def decode_run(model, cache, B, T, steps, warmup=3, flash_only=True):
    """Median seconds per decode step of ``steps`` forwards (after ``warmup``; CUDA events on
    a GPU, where SDPA is restricted to its flash backend) and the first step's logits;
    rewinds the KV cache to T first."""
    import contextlib
    import time
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dev = next(model.parameters()).device
    cuda = dev.type == "cuda"
    for layer in cache.layers:
        layer.rewind(T)
    gen = torch.Generator(device=dev).manual_seed(1)
    tok = torch.randint(0, model.config.vocab_size, (B, 1), device=dev, generator=gen)
    times, first = [], None
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if cuda and flash_only else contextlib.nullcontext():
        for i in range(warmup + steps):
            pos = torch.full((B, 1), T + i, device=dev)
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            logits = model(input_ids=tok, position_ids=pos, use_cache=True, logits_to_keep=1,
                           **{cache_arg(model): cache}).logits
            if cuda:
                b.record()
                torch.cuda.synchronize()
            dt = a.elapsed_time(b) / 1e3 if cuda else time.perf_counter() - t0
            if i == 0:
                first = logits.float()
            if i >= warmup:
                times.append(dt)
            tok = logits[:, -1:].argmax(-1)
    return sorted(times)[len(times) // 2], first


def end_to_end(config):
    model = _model(config.layers)
    model.set_seer_mode("dense", seer_decode_key_format=config.key_format)  # kept by the later set_seer_mode calls
    rows, checks = [], []
    for B, T in config.e2e:
        torch.cuda.empty_cache()
        warmup = 3
        cache, state = filled_cache(model, B, T, config.steps + warmup + 1, config.shared_kv)
        model.set_seer_mode("dense", seer_decode_sparsity=False)
        backend = "flash"
        try:
            dense_s, dense_logits = decode_run(model, cache, B, T, config.steps, warmup)
        except RuntimeError as e:  # SDPA's flash backend refused these inputs: say so, time the default choice
            print(f"dense decode with SDPA flash failed ({str(e)[:120]}); timing SDPA's default backend", flush=True)
            backend = "sdpa default"
            dense_s, dense_logits = decode_run(model, cache, B, T, config.steps, warmup, flash_only=False)
        row = {"B": B, "T": T, "layers": config.layers, "shared_kv": config.shared_kv, "key_format": config.key_format,
               "dense_s_per_token": dense_s,
               "dense_backend": backend}
        # every block selected: sparse decode is dense decode (checks the pre-filled setup)
        model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=1.0,
                            seer_decode_meanpool_prior=0.0)
        state.rewind(T)
        _, all_logits = decode_run(model, cache, B, T, 1, 0)
        checks.append({f"e2e_all_blocks_vs_dense_logits_B{B}_T{T}": rel_err(all_logits, dense_logits)})
        model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=config.share,
                            seer_decode_meanpool_prior=config.prior)
        state.rewind(T)
        state.reset_statistics()
        sparse_s, _ = decode_run(model, cache, B, T, config.steps, warmup)
        row.update({"sparse_s_per_token": sparse_s, "share_read": model.seer_decode_density().mean().item(),
                    "speedup": dense_s / sparse_s, "dense_tokens_per_s": B / dense_s,
                    "sparse_tokens_per_s": B / sparse_s,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        del cache, state
        torch.cuda.empty_cache()
        row.update(graphed_rows(model, B, T, config.steps, config.share, config.prior, config.shared_kv))
        rows.append(row)
        print("e2e", json.dumps(row), flush=True)
    model.set_seer_mode("dense", seer_decode_sparsity=False)
    return rows, checks


@torch.no_grad()
def static_filled(model, B, T, extra, shared=False):
    """A transformers StaticCache of ``T + extra`` slots holding T random keys/values per layer,
    and its pooled-K cache (random pre-RoPE keys), as :func:`filled_cache` makes them (``shared``
    likewise: every layer a view of layer 0's buffers, its own length)."""
    from transformers import StaticCache
    cfg = model.config
    p = next(model.model.layers[0].self_attn.k_proj.parameters())
    kv_heads, head_dim = cfg.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    cache = StaticCache(config=cfg, max_cache_len=T + extra)
    gen = torch.Generator(device=p.device).manual_seed(T + B)
    one = torch.zeros(B, kv_heads, 1, head_dim, device=p.device, dtype=p.dtype)
    for i, layer in enumerate(cache.layers):
        if i and shared:  # layer 0's state (buffers, sizes, flags), its own length counter
            own = layer.cumulative_length
            layer.__dict__.update(cache.layers[0].__dict__)
            layer.cumulative_length = own.to(cache.layers[0].cumulative_length.device).clone()
        else:
            layer.lazy_initialization(one, one)
            layer.keys[:, :, :T].normal_(generator=gen)
            layer.values[:, :, :T].normal_(generator=gen)
        layer.cumulative_length.fill_(T)
    return cache, _pooled_for(model, cache, B, T, gen)


def graph_decode_time(model, cache, B, T, steps, warmup=3):
    """Seconds per decode step replayed from a CUDA graph (:class:`~seer_attn.modeling_seer.decode_graph.GraphDecoder`;
    ``warmup`` steps first, the capture among them), over ``steps`` replays timed with CUDA
    events; rewinds the cache to T first."""
    from seer_attn.modeling_seer.decode_graph import GraphDecoder
    dev = next(model.parameters()).device
    for layer in cache.layers:
        layer.cumulative_length.fill_(T)
    mask = torch.zeros(B, 1, 1, cache.layers[0].keys.shape[2], dtype=torch.bool, device=dev)
    mask[..., :T] = True
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (B, 1), device=dev, generator=gen)
    dec = GraphDecoder(model, cache, ids, torch.full((B, 1), T, device=dev), T, mask)
    for _ in range(warmup):
        dec.step(cuda_graph=True, warmup_steps=warmup - 1)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(steps):
        dec.step()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / steps, dec


def graphed_rows(model, B, T, steps, share, prior=0.0, shared_kv=False):
    """The end-to-end step replayed from a CUDA graph over a static cache: dense decode through
    our kernel with every block (``seer_decode_share=1``), sparse decode at ``share`` (with the
    decode prior ``prior``), and the
    stock dense attention over the static cache (SDPA with the ``[B, 1, 1, S]`` mask)."""
    cache, state = static_filled(model, B, T, steps + 8, shared_kv)
    out = {}
    model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=1.0, seer_decode_meanpool_prior=0.0)
    out["graph_dense_s_per_token"], _ = graph_decode_time(model, cache, B, T, steps)
    model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=share, seer_decode_meanpool_prior=prior)
    out["graph_sparse_s_per_token"], dec = graph_decode_time(model, cache, B, T, steps)
    out["graph_share_read"] = dec.state.stats.density().mean().item()
    out["graph_speedup"] = out["graph_dense_s_per_token"] / out["graph_sparse_s_per_token"]
    del dec
    try:  # the same with each layer's pointwise work fused (seer_compile_pointwise: two graphs per layer) and its
        # q/k/v and gate/up projections as one GEMM each (seer_merge_projections, since session 41)
        model.seer_compile_pointwise()
        model.seer_merge_projections()
        model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=1.0,
                            seer_decode_meanpool_prior=0.0)
        out["graph_fused_dense_s_per_token"], _ = graph_decode_time(model, cache, B, T, steps)
        model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=share,
                            seer_decode_meanpool_prior=prior)
        out["graph_fused_sparse_s_per_token"], _ = graph_decode_time(model, cache, B, T, steps)
        out["graph_fused_speedup"] = out["graph_fused_dense_s_per_token"] / out["graph_fused_sparse_s_per_token"]
    except Exception as e:  # reported, not fatal
        out["graph_fused_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    finally:
        model.seer_compile_pointwise(enable=False)
        model.seer_merge_projections(enable=False)
    model.set_seer_mode("dense", seer_decode_sparsity=False)
    try:
        out["graph_sdpa_mask_s_per_token"], _ = graph_decode_time(model, cache, B, T, steps)
    except RuntimeError as e:  # reported, not fatal
        out["graph_sdpa_mask_s_per_token"] = f"failed: {str(e)[:120]}"
    out["graph_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del cache, state
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- output

def write_results(config, rows, e2e, checks, tuning, device="cuda") -> dict:
    """Write ``decode.json`` (the envelope, returned: ``config`` the :class:`DecodeBenchConfig`,
    ``resolved`` the shape and the kernel's launch configuration), ``decode.csv`` and
    ``decode_e2e.csv`` to ``config.out``."""
    import importlib
    from seer_attn.training.results import write_envelope
    mod = importlib.import_module("seer_attn.kernels.block_sparse_decode")
    select = importlib.import_module("seer_attn.kernels.decode_select")
    graph = importlib.import_module("seer_attn.modeling_seer.decode_graph")
    shape = {"HQ": HQ, "H": H, "D": D, "dtype": "bf16"}
    env = write_envelope(os.path.join(config.out, "decode.json"), "decode", rows, config=asdict(config),
                         resolved={"shape": shape, "kernel_config": mod._config(D, True, torch.bfloat16),
                                   "programs_per_sm": mod._TARGET_PROGRAMS_PER_SM,
                                   "top_blocks_bits": select.TOP_BLOCKS_BITS,
                                   "top_blocks_early_stop": select.TOP_BLOCKS_EARLY_STOP,
                                   "one_launch_window": graph.ONE_LAUNCH_WINDOW,
                                   "dense_row": "share 1: every block, no gate (since session 40)"},
                         device=device, model=f"kernel: random q/k/v, {HQ} query / {H} KV heads, head_dim {D}, bf16; "
                                              f"e2e: random-weight Llama-3.1-8B shape, {config.layers} layers, "
                                              "pre-filled random KV cache"
                                              + (f" ({SHARED_KV_NOTE})" if config.shared_kv else ""),
                         e2e=e2e, checks=checks, tuning=tuning)
    write_csv(os.path.join(config.out, "decode.csv"), [{"T": r["S"], **r} for r in rows])
    if e2e:
        write_csv(os.path.join(config.out, "decode_e2e.csv"), e2e)
    return env


def print_table(rows, e2e, prov, share):
    v, commit = prov["versions"], (prov["commit"] or "unknown")[:7]

    def ms(x):
        return f"{x:.3f}" if isinstance(x, (int, float)) else "-"

    def sec(x):
        return f"{x:.4f}" if isinstance(x, (int, float)) else "-"
    fmt = (rows or e2e or [{}])[0].get("key_format", "model")
    print(f"\n# {prov['gpu']}  torch {v['torch']}  triton {v.get('triton')}  commit {commit}  gate keys: {fmt}")
    print(f"decode step, median ms | B | S | SDPA flash | SDPA cuDNN | ours all | ours {share:g} (read) | ours, no "
          "block | flash/ours | gate+select per layer (share of step) | layer eager | layer CUDA graph | ours "
          f"{share:g}, CUDA graph | ours, no block, CUDA graph")
    for r in rows:
        print(f"{r['B']} | {r['S']} | {ms(r['sdpa_flash'])} | {ms(r['sdpa_cudnn'])} | {ms(r['ours_all'])} | "
              f"{ms(r['ours_sparse'])} ({r['share_read']:.3f}) | {ms(r.get('ours_empty'))} | "
              f"{r['speedup_vs_flash']:.2f}x | {ms(r['gate_select_layer'])} "
              f"({100 * r['gate_share_of_sparse_step']:.1f}%) | {ms(r.get('eager_layer'))} | "
              f"{ms(r.get('graph_layer'))} | {ms(r.get('ours_sparse_graph'))} | {ms(r.get('ours_empty_graph'))}")
    if rows and "ours_all_graph" in rows[0]:
        print("dense decode replayed from a CUDA graph, median ms | B | S | ours, every block | SDPA flash | "
              "SDPA cuDNN | ours / flash")
        for r in rows:
            a, f = r.get("ours_all_graph"), r.get("sdpa_flash_graph")
            ratio = f"{a / f:.3f}x" if isinstance(a, float) and isinstance(f, float) else "-"
            print(f"{r['B']} | {r['S']} | {ms(a)} | {ms(f)} | {ms(r.get('sdpa_cudnn_graph'))} | {ratio}")
    if e2e:
        r0 = e2e[0]
        print(f"end to end: {r0['layers']} layers" + (f", {SHARED_KV_NOTE}" if r0.get("shared_kv") else ""))
        print(f"time per output token, s | B | T | dense | sparse {share:g} (read) | speed-up | CUDA graph: dense "
              f"(ours, every block) | sparse {share:g} (read) | speed-up | stock SDPA with mask | the same, layers "
              "fused: dense | sparse | speed-up")
        for r in e2e:
            print(f"{r['B']} | {r['T']} | {r['dense_s_per_token']:.4f} | {r['sparse_s_per_token']:.4f} "
                  f"({r['share_read']:.3f}) | {r['speedup']:.2f}x | {sec(r.get('graph_dense_s_per_token'))} | "
                  f"{sec(r.get('graph_sparse_s_per_token'))} ({r.get('graph_share_read', float('nan')):.3f}) | "
                  f"{r.get('graph_speedup', float('nan')):.2f}x | {sec(r.get('graph_sdpa_mask_s_per_token'))} | fused: "
                  f"{sec(r.get('graph_fused_dense_s_per_token'))} | {sec(r.get('graph_fused_sparse_s_per_token'))} | "
                  f"{r.get('graph_fused_speedup', float('nan')):.2f}x {r.get('graph_fused_error', '')}")


def plot(csv_path, e2e_path, png_path):
    import csv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    e2e = []
    if e2e_path and os.path.isfile(e2e_path):
        with open(e2e_path) as f:
            e2e = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 2 if e2e else 1, figsize=(12 if e2e else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = [f"B{r['B']}\n{int(r['S']) // 1024}k" for r in rows]
    cols = [("sdpa_flash", "SDPA flash"), ("sdpa_cudnn", "SDPA cuDNN"), ("ours_all", "ours, all blocks"),
            ("ours_sparse", "ours, sparse")]
    width = 0.8 / len(cols)
    for i, (c, name) in enumerate(cols):
        ys = [float(r[c]) if r.get(c) not in (None, "") else math.nan for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], ys, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels)
    ax.set_yscale("log")
    ax.set_ylabel("median ms per decode step (one layer, bf16)")
    ax.set_title("Decode attention, 32 q / 8 kv heads, d128")
    ax.legend(fontsize=8)
    if e2e:
        ax = axes[0][1]
        labels = [f"B{r['B']}\n{int(r['T']) // 1024}k" for r in e2e]
        ax.bar([x - 0.2 for x in range(len(e2e))], [1e3 * float(r["dense_s_per_token"]) for r in e2e], 0.4,
               label="dense decode")
        ax.bar([x + 0.2 for x in range(len(e2e))], [1e3 * float(r["sparse_s_per_token"]) for r in e2e], 0.4,
               label="sparse decode")
        ax.set_xticks(range(len(e2e)), labels)
        ax.set_ylabel("ms per output token (whole model)")
        ax.set_title("8B-shaped model, random weights")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print("wrote", png_path)


if __name__ == "__main__":
    main()
