"""Launch variants of the decode prior's mixture (``kernels.decode_select.prior_mix``, issue 15), 8B shape.

Session 38 on an H100 (bench_decode, 16-layer graph step, 4 x 128k): the two-launch prior_mix
cost 2.60x -> 2.29x per token, and a layer's gate + selection replayed from a CUDA graph rose
by ~24 us at B=1 / 128k but by ~180 us at B=16 / 128k, where the block means it reads are only
64 MB (~20 us of H100 bandwidth). This script replays each variant from its own CUDA graph and
prints median microseconds, against the float32 torch reference's answer:

- ``dot``: 16-bit means scored with ``tl.dot`` (query heads padded to 16 rows) or with the
  broadcast product and sum of the first version;
- ``chunk``: blocks per program (64 / 128 / 256): fewer programs, fewer chunk statistics to merge;
- ``torch``: the reference on the GPU (the mixture before the kernel);
- ``..._first``: each variant's first launch alone (scores and chunk statistics), the rest being
  the second (the merged log-sum-exps and the mixture).

    python docs/experiments/prior_mix_sweep.py [--settings 1x2048 4x2048 16x2048 1x16384] [--out F]

``BxN``: B sequences of N blocks (2048 blocks: a 128k-token cache). Prints JSON lines as it goes
and a table last; ``--out F`` writes a results envelope with every line.
"""
import argparse
import json

import torch

HQ, H, D = 32, 8, 128
VARIANTS = [(False, 64), (True, 64), (True, 128), (True, 256), (False, 128)]


def us(fn):
    from seer_attn.eval.bench_decode import _graph_bench
    ms = _graph_bench(fn)
    return ms if isinstance(ms, str) else round(1e3 * ms, 2)


def inputs(B, N, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(B, H, N, device="cuda", generator=gen) * 4
    q = torch.randn(B, HQ, 1, D, device="cuda", generator=gen).to(torch.bfloat16)
    means = torch.randn(B, H, 2 * N, D, device="cuda", generator=gen).to(torch.bfloat16)[:, :, :N]
    full = (torch.arange(N, device="cuda") < N - 1).expand(B, 1, N).contiguous()
    return logits, q, means, full


def main(argv=None):
    from seer_attn.kernels import decode_select
    from seer_attn.kernels.reference import prior_mix_ref
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=["1x2048", "4x2048", "16x2048", "1x16384"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = []
    for setting in args.settings:
        B, N = (int(x) for x in setting.split("x"))
        logits, q, means, full = inputs(B, N)
        want = prior_mix_ref(logits, q.float(), means.float(), full, D ** -0.5, 0.7)
        row = {"B": B, "N": N, "means_MB": round(means.numel() * 2 / 1e6, 1),
               "torch": us(lambda: prior_mix_ref(logits, q, means, full, D ** -0.5, 0.7))}
        for dot, chunk in VARIANTS:
            decode_select.PRIOR_DOT, decode_select.PRIOR_CHUNK = dot, chunk
            got = decode_select.prior_mix(logits, q, means, full, D ** -0.5, 0.7, backend="triton")
            err = (got - want).abs().max().item()
            key = f"{'dot' if dot else 'sum'}{chunk}"
            row[key] = us(lambda: decode_select.prior_mix(logits, q, means, full, D ** -0.5, 0.7, backend="triton"))
            row[key + "_maxerr"] = round(err, 5)
            _, scores, _ = decode_select._prior_mix_launches(logits, q, means, full, D ** -0.5, 0.7)
            row[key + "_first"] = us(scores)  # the scoring launch alone: the rest is the merge and mixture
        print(json.dumps(row), flush=True)
        lines.append(row)
    keys = ["torch"] + [f"{'dot' if d else 'sum'}{c}{part}" for d, c in VARIANTS for part in ("", "_first")]
    print("prior_mix, CUDA-graph median us | B | N | means MB | " + " | ".join(keys))
    for r in lines:
        print(f"{r['B']} | {r['N']} | {r['means_MB']} | " + " | ".join(str(r[k]) for k in keys))
    if args.out:
        from seer_attn.training.results import write_envelope
        write_envelope(args.out, "prior_mix_sweep", lines, config=vars(args),
                       model="random bf16 means and queries, 32 query / 8 KV heads, D 128")


if __name__ == "__main__":
    main()
