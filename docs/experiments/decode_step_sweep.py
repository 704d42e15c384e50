"""Launch settings of a graph-mode sparse decode layer's three kernels (issue 15), 8B shape.

At 6d3e3b2 the fused graph step ran 9.1 ms per token at 4 x 128k against 8.2 for 3x, and
decode_gate_profile.py put one sparse layer at 109 us there: the decode kernel 78 us (the 10%
of the KV it reads is 215 MB: 2.8 TB/s, where B = 16 / 128k reaches 3.9), the gate's logits
23 us (four small ops), the selection 18 us. This script replays each candidate from its own
CUDA graph and prints median microseconds:

- ``kernel``: block_sparse_decode over a share-0.1 selection for each launch config
  ``(NSUB, warps, stages)`` and programs-per-SM target (how many parts a list is cut into);
- ``top_blocks``: the selection kernel at 1, 2, 4 and 8 warps;
- ``logits``: the old four-op logits (bmm, mul, addcmul, bmm in bf16) against the current
  ``DecodeGate.step_logits`` (bmm + the gate_scores kernel);
- ``layer``: logits + top_blocks + kernel as the graph step runs them, the defaults of
  6d3e3b2 against the best settings found above.

    python docs/experiments/decode_step_sweep.py [--settings 1x131072 4x131072 16x32768 16x131072]

Prints JSON lines as it goes and a table last; ``--out F`` writes a results envelope (one
summary row per setting, every timed variant under ``lines``).
"""
import argparse
import json

import torch

HQ, H, D, BS, G = 32, 8, 128, 64, 128
CONFIGS = [(1, 4, 2), (1, 4, 3), (1, 4, 4), (1, 8, 3), (1, 8, 4), (2, 4, 3), (2, 8, 3), (2, 8, 4), (4, 8, 3)]
PER_SM = [1, 2, 4, 8, 16]


def us(fn):
    from seer_attn.eval.bench_decode import _graph_bench
    ms = _graph_bench(fn)
    return ms if isinstance(ms, str) else round(1e3 * ms, 2)


def old_logits(gate, q_pre, keys, rope):
    """DecodeGate.step_logits as of 6d3e3b2: four ops in the keys' dtype."""
    B, HQ_, _, D_ = q_pre.shape
    N, dt = keys.shape[2], keys.dtype
    x = q_pre.reshape(B, H, (HQ_ // H) * D_).transpose(0, 1).to(dt)
    y = torch.bmm(x, gate._step_weight(dt, partner=True))
    qg = torch.empty(B, H, 1, G, dtype=dt, device=y.device)
    out = qg.view(B, H, G).transpose(0, 1)
    torch.mul(y[..., :G], rope[0], out=out)
    out.addcmul_(y[..., G:], rope[1])
    return torch.bmm(qg.view(B * H, 1, G), keys.reshape(B * H, N, G).transpose(1, 2)).view(B, H, 1, N)


@torch.no_grad()
def sweep(B, S, share, emit):
    import importlib
    dec = importlib.import_module("seer_attn.kernels.block_sparse_decode")  # (the package's
    sel = importlib.import_module("seer_attn.kernels.decode_select")  # attribute is the function)
    from decode_gate_profile import layer_inputs  # the sibling script (this folder is on sys.path)

    from seer_attn.kernels import block_sparse_decode, top_blocks
    x = layer_inputs(B, S, share, seed=B * S)
    gate, keys, q_pre, q, k, v, rope, bias, K, cnt, lens = (x[n] for n in (
        "gate", "keys", "q_pre", "q", "k", "v", "rope", "bias", "K", "cnt", "lens"))
    dt = keys.dtype
    scores = gate.step_logits(q_pre, keys, rope).squeeze(2)
    idx = top_blocks(scores, bias, cnt, K)
    old = old_logits(gate, q_pre, keys, rope).float()
    row = {"B": B, "S": S, "K": K, "logits_max_abs_diff": float((old - scores[:, :, None]).abs().max())}

    def kern():
        return block_sparse_decode(q, k, v, idx, lens, block_counts=cnt, check_lengths=False)

    default = (dec._config(D, True, dt), dec._TARGET_PROGRAMS_PER_SM)
    ref = kern().float()
    best = None
    for per_sm in PER_SM:
        for cfg in CONFIGS:
            dec.CONFIG_OVERRIDES[D] = cfg
            dec._TARGET_PROGRAMS_PER_SM = per_sm
            try:
                err = float((kern().float() - ref).abs().max())
                t = us(kern)
            except Exception as ex:  # a config that does not fit
                err, t = None, f"{type(ex).__name__}: {str(ex)[:60]}"
            emit({"B": B, "S": S, "piece": "kernel", "config": cfg, "per_sm": per_sm,
                  "splits": dec.num_decode_splits(B, H, K, q.device), "us": t, "max_abs_diff": err})
            if isinstance(t, float) and (best is None or t < best[0]):
                best = (t, cfg, per_sm)
    dec.CONFIG_OVERRIDES.clear()
    dec._TARGET_PROGRAMS_PER_SM = default[1]
    row["kernel_default_us"] = us(kern)
    row["kernel_best_us"], row["kernel_best_config"], row["kernel_best_per_sm"] = best

    kept = dict(sel.TOP_BLOCKS_WARPS)
    tb = {}
    for w in (1, 2, 4, 8):
        sel.TOP_BLOCKS_WARPS.clear()
        sel.TOP_BLOCKS_WARPS.update({sel.MAX_BLOCKS: w})
        ok = torch.equal(top_blocks(scores, bias, cnt, K), idx)
        tb[w] = us(lambda: top_blocks(scores, bias, cnt, K))
        emit({"B": B, "S": S, "piece": "top_blocks", "warps": w, "us": tb[w], "equal": ok})
    sel.TOP_BLOCKS_WARPS.clear()
    sel.TOP_BLOCKS_WARPS.update(kept)
    row["top_blocks_default_us"] = us(lambda: top_blocks(scores, bias, cnt, K))
    best_w = min((w for w in tb if isinstance(tb[w], float)), key=lambda w: tb[w])
    row["top_blocks_best_us"], row["top_blocks_best_warps"] = tb[best_w], best_w

    row["logits_old_us"] = us(lambda: old_logits(gate, q_pre, keys, rope))
    row["logits_new_us"] = us(lambda: gate.step_logits(q_pre, keys, rope))

    def layer_old():
        i = top_blocks(old_logits(gate, q_pre, keys, rope).squeeze(2), bias, cnt, K)
        return block_sparse_decode(q, k, v, i, lens, block_counts=cnt, check_lengths=False)

    def layer_new():
        i = top_blocks(gate.step_logits(q_pre, keys, rope).squeeze(2), bias, cnt, K)
        return block_sparse_decode(q, k, v, i, lens, block_counts=cnt, check_lengths=False)

    row["layer_old_us"] = us(layer_old)
    dec.CONFIG_OVERRIDES[D] = best[1]
    dec._TARGET_PROGRAMS_PER_SM = best[2]
    sel.TOP_BLOCKS_WARPS.clear()
    sel.TOP_BLOCKS_WARPS.update({sel.MAX_BLOCKS: best_w})
    row["layer_new_us"] = us(layer_new)
    dec.CONFIG_OVERRIDES.clear()
    dec._TARGET_PROGRAMS_PER_SM = default[1]
    sel.TOP_BLOCKS_WARPS.clear()
    sel.TOP_BLOCKS_WARPS.update(kept)
    emit(dict(row, piece="summary"))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["1x131072", "4x131072", "16x32768", "16x131072"])
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true", help="sweep only the two stage counts at 1 and 4 programs per SM")
    ap.add_argument("--out", default=None, help="write every line and the summary here (JSON)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_step_sweep.py needs a CUDA GPU")
    lines = []

    def emit(d):
        lines.append(d)
        print(json.dumps(d), flush=True)

    if args.quick:
        CONFIGS[:] = [(1, 4, 2), (1, 4, 3)]
        PER_SM[:] = [1, 4]
    rows = []
    for setting in args.settings:
        B, S = (int(x) for x in setting.split("x"))
        rows.append(sweep(B, S, args.share, emit))
        torch.cuda.empty_cache()
    if args.out:  # a results envelope: one summary row per setting, every timed variant in "lines"
        from seer_attn.training.results import write_envelope
        write_envelope(args.out, "decode_step_sweep", rows, config=vars(args),
                       model="random weights, Llama-3.1-8B attention shape", lines=lines)
    cols = ["kernel_default_us", "kernel_best_us", "kernel_best_config", "kernel_best_per_sm",
            "top_blocks_default_us", "top_blocks_best_us", "top_blocks_best_warps", "logits_old_us",
            "logits_new_us", "logits_max_abs_diff", "layer_old_us", "layer_new_us"]
    print(f"\n# {torch.cuda.get_device_name()}  graph-replayed microseconds, share {args.share}")
    print("B x cache | " + " | ".join(cols))
    for r in rows:
        print(f"{r['B']} x {r['S'] // 1024}k | " + " | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
