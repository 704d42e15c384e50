"""The decode gate's scoring and selection in one launch (``kernels.decode_select.gate_top_blocks``,
issue 15), against the two launches the graph step ran up to session 39, on the 8B shape.

Issue 15 bounds the gate + selection at 15% of a sparse decode step; session 38 measured 19% at
16 x 128k and 57% at 1 x 128k (H100, graph-replayed). A layer's gate ran three launches before
the decode kernel: the query's projection (one bmm), ``gate_scores`` (one program per 64 block
keys) and ``top_blocks`` (one program per row: 32 bisection passes). This script replays from
its own CUDA graph each of:

- ``two_bB``: bmm + gate_scores + top_blocks settling B key bits per selection pass (1: the
  bisection up to session 39; 2 / 4: 16 / 8 passes; 8: four 256-bin histograms, session 40);
- ``fused_cC_wW_bB_sP``: bmm + gate_top_blocks (P programs per row score the row's keys C at a
  time into a scratch row, then the row's last selects; W warps; the G-column query since session 44);
- ``two_b1_rot`` (session 44): ``two_b1`` with the query's matmul making G columns instead of 2G,
  ``gate_scores`` making the RoPE partner columns from them (``decode_gate.STEP_PARTNER_COLUMNS``
  off: half the matmul's weight read); ``two_b1_rot_wW``: that with ``top_blocks`` at W warps
  whatever the row's length (``TOP_BLOCKS_WARPS``); ``two_b1_rot_cC``: ``gate_scores`` scoring C block
  keys a program (``SCORE_CHUNK``, default 64); ``two_b1_rot_f8`` / ``two_b1_rot_i8`` (session 45):
  ``gate_scores`` on float8 e4m3 / int8 block keys with one scale per key row (``eight_bit_keys``; the first
  run, results/decode/h100_gate_s45_sweep.json, used one scale for the layer and no scale read), what an 8-bit
  pooled-K cache would save (``same`` here is on random keys, not a quality measure);
- ``layer_...``: the same with the decode kernel over the selection (10% of the blocks),

and checks that each variant keeps the same blocks as ``two_b1``: ``same`` is the share of rows
with equal kept sets (summation order may move a near-tie).

    python docs/experiments/gate_select_sweep.py [--settings 1x131072 4x131072 16x32768 16x131072] [--out F]
        [--no-fused | --fused C,W,B,S ...] [--bits 1 2 4 8] [--only NAME ...]

Prints JSON lines as it goes and a table last; ``--out F`` writes a results envelope.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FUSED = [(64, 4, 1, 1), (64, 4, 2, 1), (64, 4, 4, 1), (64, 8, 2, 1), (128, 8, 2, 1), (64, 4, 2, 4), (64, 4, 2, 16),
         (64, 8, 4, 4), (64, 8, 4, 16)]
TWO_BITS = [1, 2, 4, 8]
SEL_WARPS = [1, 2, 4]
SCORE_CHUNKS = [32, 128]


def us(fn):
    from seer_attn.eval.bench_decode import _graph_bench
    ms = _graph_bench(fn)
    return ms if isinstance(ms, str) else round(1e3 * ms, 2)


@torch.no_grad()
def sweep(B, S, share, fused_configs=FUSED, bits=TWO_BITS, only=None):
    from decode_gate_profile import layer_inputs
    from seer_attn.kernels import block_sparse_decode
    from seer_attn.kernels import decode_select as ds
    x = layer_inputs(B, S, share)
    gate, keys, q_pre, q, k, v, rope, bias, K, cnt, lens = (x[n] for n in (
        "gate", "keys", "q_pre", "q", "k", "v", "rope", "bias", "K", "cnt", "lens"))
    H = keys.shape[1]
    HQ, D = q_pre.shape[1], q_pre.shape[3]
    # [H, group * D, 2G]: the map, then its RoPE partner; [.., G]: the partner made in gate_scores
    weights = {False: gate._step_weight(keys.dtype, partner=True), True: gate._step_weight(keys.dtype, partner=False)}

    def query(rot=False):
        return torch.bmm(q_pre.reshape(B, H, (HQ // H) * D).transpose(0, 1), weights[rot]).transpose(0, 1)

    def two(rot=False):
        return ds.top_blocks(ds.gate_scores(query(rot), keys, rope), bias, cnt, K)

    def two_rot():
        return two(True)

    # 8-bit block keys (session 45; the model's cache keeps 16-bit keys): each key row in float8 e4m3 or int8 at
    # its own scale, which multiplies the block's logit in gate_scores
    keys8 = {fmt: ds.eight_bit_keys(keys, fmt) for fmt in ds.EIGHT_BIT_KEYS}

    def two_rot_8(fmt):
        k8, sc = keys8[fmt]
        return lambda: ds.top_blocks(ds.gate_scores(query(True), k8, rope, key_scales=sc), bias, cnt, K)

    def fused():  # the G-column query since session 44 (2G before)
        return ds.gate_top_blocks(query(True), keys, rope, bias, cnt, K)

    kept = dict(bits=ds.TOP_BLOCKS_BITS, chunk=ds.FUSED_CHUNK, warps=ds.FUSED_WARPS, split=ds.FUSED_SPLIT,
                sel_warps=dict(ds.TOP_BLOCKS_WARPS), score_chunk=ds.SCORE_CHUNK)
    row = {"B": B, "S": S, "share": share, "K": K, "keys_MB": round(keys.numel() * 2 / 2 ** 20, 1)}
    ref = None
    variants = [(f"two_b{b}", two, dict(bits=b)) for b in sorted(set(bits) | {1})]
    variants += [("two_b1_rot", two_rot, dict(bits=1))]
    variants += [(f"two_b1_rot_w{wp}", two_rot, dict(bits=1, sel_warps={ds.MAX_BLOCKS: wp})) for wp in SEL_WARPS]
    variants += [(f"two_b1_rot_c{c}", two_rot, dict(bits=1, score_chunk=c)) for c in SCORE_CHUNKS]
    variants += [(f"two_b1_rot_{fmt}", two_rot_8(fmt), dict(bits=1)) for fmt in ds.EIGHT_BIT_KEYS]
    variants += [(f"fused_c{c}_w{wp}_b{b}_s{sp}", fused, dict(bits=b, chunk=c, warps=wp, split=sp))
                 for c, wp, b, sp in fused_configs]
    if only:  # two_b1 stays: the reference kept sets
        variants = [v for v in variants if v[0] == "two_b1" or v[0] in only]
    try:
        for name, fn, cfg in variants:
            ds.TOP_BLOCKS_BITS = cfg["bits"]
            ds.FUSED_CHUNK, ds.FUSED_WARPS = cfg.get("chunk", kept["chunk"]), cfg.get("warps", kept["warps"])
            ds.FUSED_SPLIT = cfg.get("split", kept["split"])
            ds.TOP_BLOCKS_WARPS.clear()
            ds.TOP_BLOCKS_WARPS.update(cfg.get("sel_warps", kept["sel_warps"]))
            ds.SCORE_CHUNK = cfg.get("score_chunk", kept["score_chunk"])
            try:
                idx = fn()
            except Exception as e:  # a variant that does not compile: recorded, the others still run
                row[name] = row["layer_" + name] = f"error: {type(e).__name__}: {e}"[:300]
                row[name + "_same"] = None
                print(name, row[name], flush=True)
                continue
            sets = torch.sort(idx.long().masked_fill(idx < 0, 1 << 40), dim=-1).values
            if ref is None:
                ref = sets
            row[name + "_same"] = round((sets == ref).all(-1).float().mean().item(), 4)
            row[name] = us(fn)
            row["layer_" + name] = us(lambda: block_sparse_decode(q, k, v, fn(), lens, block_counts=cnt,
                                                                  check_lengths=False))
    finally:
        ds.TOP_BLOCKS_BITS, ds.FUSED_CHUNK, ds.FUSED_WARPS = kept["bits"], kept["chunk"], kept["warps"]
        ds.FUSED_SPLIT = kept["split"]
        ds.TOP_BLOCKS_WARPS.clear()
        ds.TOP_BLOCKS_WARPS.update(kept["sel_warps"])
        ds.SCORE_CHUNK = kept["score_chunk"]
    idx = two()
    row["query"] = us(query)
    row["query_rot"] = us(lambda: query(True))
    row["kernel"] = us(lambda: block_sparse_decode(q, k, v, idx, lens, block_counts=cnt, check_lengths=False))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["1x131072", "4x131072", "16x32768", "16x131072"])
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--no-fused", action="store_true", help="only the two-launch variants (selection passes)")
    ap.add_argument("--bits", type=int, nargs="+", default=TWO_BITS, help="two-launch selection bits to time")
    ap.add_argument("--fused", nargs="+", default=None, metavar="C,W,B,S",
                    help="the one-launch configs to time (keys a step, warps, bits, programs a row; default: the "
                         "session 39 list)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="time only these variants (and two_b1, the reference)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gate_select_sweep.py needs a CUDA GPU")
    fused = [] if args.no_fused else FUSED if args.fused is None else [tuple(int(x) for x in f.split(","))
                                                                        for f in args.fused]
    if any(len(f) != 4 for f in fused):
        raise SystemExit(f"--fused takes C,W,B,S quadruples, got {args.fused}")
    lines = []
    for setting in args.settings:
        B, S = (int(t) for t in setting.split("x"))
        row = sweep(B, S, args.share, fused, args.bits, args.only)
        print(json.dumps(row), flush=True)
        lines.append(row)
        torch.cuda.empty_cache()
    names = [k[len("layer_"):] for k in lines[0] if k.startswith("layer_")]  # sweep's variants, in its order
    for r in lines:  # the gate's share of the layer: (layer - kernel) / layer
        for n in names:
            if isinstance(r.get("layer_" + n), float) and isinstance(r["kernel"], float):
                r["share_" + n] = round((r["layer_" + n] - r["kernel"]) / r["layer_" + n], 4)
    print(f"\n# {torch.cuda.get_device_name()}: gate + selection, CUDA-graph median us (layer: + the decode kernel; "
          "the gate's share of the layer)")
    print("B x cache | query (2G / G) | kernel | " + " | ".join(names))
    for r in lines:
        print(f"{r['B']} x {r['S'] // 1024}k | {r['query']} / {r['query_rot']} | {r['kernel']} | "
              + " | ".join(f"{r[n]} / {r['layer_' + n]} ({r[n + '_same']}, {r.get('share_' + n)})" for n in names))
    if args.out:
        from seer_attn.training.results import write_envelope
        write_envelope(args.out, "gate_select_sweep", lines, config=vars(args),
                       model="random decode gate and bf16 KV cache, 32 query / 8 KV heads, D 128, G 128")


if __name__ == "__main__":
    main()
