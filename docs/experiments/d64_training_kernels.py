"""The attention kernels at SmolLM2's training shape, with the masks a fine-tuning step makes
(issue 13's step time, issue 16's kernels): one GPU run.

SmolLM2-135M attends with 9 query / 3 KV heads of head_dim 64; a 32k fine-tuning step at
``nz_ratio`` 0.1 keeps, per query block, the top 10% of its causal blocks plus the sink (key
block 0) and the diagonal. The profile of that step (results/finetune/h200_timing.json) showed
the dK/dV kernel at 2.3 ms per layer against 0.7 ms for dQ: every query block keeps the sink,
so its key block's lists hold 3 x 512 query blocks while the average holds a few dozen.

This script times, on such masks (random scores, the same top-k, sink and diagonal rules):
- the backward with the long lists cut into pieces (the default) and uncut
  (``DKDV_SPLIT_BLOCKS`` above every list), and for each a few dK/dV launch configurations;
- the sparse forward and dQ at a few launch configurations (those of ``_config`` were chosen
  on an H100 at head_dim 128);
checks the split and unsplit gradients against each other, and prints a table last: median
ms per call (``triton.testing.do_bench``), one layer's forward + backward.

    python docs/experiments/d64_training_kernels.py --out seer_outputs/d64_kernels
"""
import argparse
import importlib
import json
import os

import torch

from seer_attn.training.results import write_envelope

bsa = importlib.import_module("seer_attn.kernels.block_sparse_attn")


def training_mask(T, HQ, density, gen, device):
    """Per query block: the top ``density`` share of its causal blocks by random scores, the
    sink and the diagonal (what ``nz_ratio`` selection keeps)."""
    NB = (T + 63) // 64
    scores = torch.rand(1, HQ, NB, NB, generator=gen, device=device)
    causal = torch.ones(NB, NB, dtype=torch.bool, device=device).tril()
    scores = scores.masked_fill(~causal, -1.0)
    keep = torch.clamp((density * torch.arange(1, NB + 1, device=device)).round().long(), min=1)
    order = scores.argsort(-1, descending=True).argsort(-1)
    mask = (order < keep[None, None, :, None]) & causal
    mask[..., 0] = True
    mask |= torch.eye(NB, dtype=torch.bool, device=device)
    return mask


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--mask", choices=["training", "random"], default="training",
                    help="training: top-k + sink + diagonal; random: bench_kernels' random masks")
    ap.add_argument("--kernels", nargs="+", choices=["fwd", "dq", "dkdv"], default=["fwd", "dq", "dkdv"])
    ap.add_argument("--max-splits", type=int, nargs="+", default=[16],
                    help="DKDV_MAX_SPLITS values of the split dK/dV rows")
    ap.add_argument("--out", default="seer_outputs/d64_kernels")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton
    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")  # noqa: E731
    T, HQ, H, D, dev, dt = args.T, args.heads, args.kv_heads, args.head_dim, "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, HQ, T, D, device=dev, dtype=dt, generator=gen)
    k = torch.randn(1, H, T, D, device=dev, dtype=dt, generator=gen)
    v = torch.randn(1, H, T, D, device=dev, dtype=dt, generator=gen)
    do = torch.randn(1, HQ, T, D, device=dev, dtype=dt, generator=gen)
    scale = D ** -0.5
    rows, checks = [], []
    default = {kern: bsa._config(kern, True, D, True) for kern in ("fwd", "dq", "dkdv")}
    cands = {
        "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 5), (64, 128, 4, 3), (64, 64, 8, 3), (64, 64, 2, 4)],
        "dq": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 128, 4, 3), (64, 64, 8, 3), (64, 64, 2, 3)],
        "dkdv": [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (256, 64, 8, 2)],
    }
    for density in args.densities:
        if args.mask == "training":
            mask = training_mask(T, HQ, density, gen, dev)
        else:
            from seer_attn.kernels import random_block_mask
            mask = random_block_mask(1, HQ, (T + 63) // 64, density, generator=gen, device=dev)
        idx, cnt = bsa.block_mask_to_indices(mask)
        o, lse, _ = bsa._attn_fwd(q, k, v, idx, cnt, None, True, scale, 64, False)
        col = mask.tril().sum(-2).view(1, H, HQ // H, -1).sum(2)
        kept = mask.tril().sum().item() / (HQ * mask.shape[-1] * (mask.shape[-1] + 1) / 2)
        print(f"density {density}: kept {kept:.3f}, longest key-block list {col.max().item()}, "
              f"mean {col.float().mean().item():.1f}", flush=True)

        def bwd():
            return bsa._attn_bwd(do, q, k, v, o, lse, mask, None, True, scale, 64)

        split = bwd()
        old = bsa.DKDV_SPLIT_BLOCKS
        bsa.DKDV_SPLIT_BLOCKS = 1 << 30
        whole = bwd()
        bsa.DKDV_SPLIT_BLOCKS = old
        diff = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(("dq", "dk", "dv"), split, whole)}
        again = bwd()
        same = all(torch.equal(a, b) for a, b in zip(split, again))
        checks.append({"density": density, "split_vs_whole_maxabs": diff, "split_repeatable": same})
        print("check", json.dumps(checks[-1]), flush=True)

        max_splits0 = bsa.DKDV_MAX_SPLITS
        for kern in args.kernels:
            for cfg in cands[kern]:
                variants = [(True, m) for m in args.max_splits] + [(False, 1)] if kern == "dkdv" else [(True, None)]
                for split_lists, max_splits in variants:
                    bsa.CONFIG_OVERRIDES.clear()
                    bsa.CONFIG_OVERRIDES[(kern, True, D)] = cfg
                    bsa.DKDV_SPLIT_BLOCKS = old if split_lists else 1 << 30
                    bsa.DKDV_MAX_SPLITS = max_splits or max_splits0
                    fn = (lambda: bsa._attn_fwd(q, k, v, idx, cnt, None, True, scale, 64, False)) \
                        if kern == "fwd" else bwd
                    try:
                        ms = bench(fn)
                    except Exception as e:  # a config that does not fit is reported, not fatal
                        ms, err = None, str(e)[:100]
                    else:
                        err = None
                    row = {"density": density, "kernel": kern, "config": list(cfg), "split": split_lists,
                           "max_splits": max_splits, "default": cfg == default[kern], "ms": ms, "error": err}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        bsa.CONFIG_OVERRIDES.clear()
        bsa.DKDV_SPLIT_BLOCKS = old
        bsa.DKDV_MAX_SPLITS = max_splits0
    os.makedirs(args.out, exist_ok=True)
    write_envelope(os.path.join(args.out, "d64_kernels.json"), "kernel_variants_d64", rows,
                   config={**vars(args), "default_configs": {k: list(v) for k, v in default.items()}},
                   device="cuda", checks=checks)
    print("\n| density | kernel | config (BM, BN, warps, stages) | dK/dV lists | ms (fwd; else whole backward) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = "failed" if r["ms"] is None else f"{r['ms']:.3f}"
        tag = " (default)" if r["default"] else ""
        lists = "-" if r["kernel"] != "dkdv" else f"split {r['max_splits']}" if r["split"] else "whole"
        print(f"| {r['density']} | {r['kernel']} | {tuple(r['config'])}{tag} | {lists} | {ms} |")


if __name__ == "__main__":
    main()
