"""Attention-kernel variants on one GPU, same inputs, one process (issue 16): tiles loaded
through Hopper tensor descriptors (TMA) or by pointers, and launch configs with TMA, for the
forward kernel or (``--backward``) the dQ and dK/dV kernels
(docs/experiments/tma_variants.md has the runs, and variants timed then removed).

    python docs/experiments/tma_variants.py --out seer_outputs/tma_variants
    python docs/experiments/tma_variants.py --backward --lengths 8192 32768 --out seer_outputs/tma_bwd

Llama-3.1-8B attention shape by default (32 query / 8 KV heads, d128; ``--heads 9 3
--head-dim 64`` is SmolLM2's), bf16, B=1, causal, random block
masks as in ``bench_kernels``. Each variant sets ``block_sparse_attn.FWD_OPTIONS`` (or
``BWD_OPTIONS``) and ``CONFIG_OVERRIDES``; every variant's output (backward: dQ, dK, dV) is
compared with the pointer-load kernel's first (max abs difference), then each (op, variant) is
timed in two rounds (variants alternate within a round, so clock drift hits all) and the lower
median kept. SDPA cuDNN and flash on the same q/k/v give the bar (backward: their backward
alone, as ours). Writes ``tma_variants.json`` (or ``tma_bwd_variants.json``, a results
envelope) and prints the table last: median ms per variant, and each variant over the
pointer-load kernel.
"""
import argparse
import json
import os
import sys

import torch

from seer_attn.training.results import write_envelope



def variants(D):
    """name -> (FWD_OPTIONS, CONFIG_OVERRIDES, the ops it applies to: "sparse", "dense", "all").
    ``tma`` is the kernels' TMA launch table (sparse d128: 5 stages)."""
    sp, de, pp, off, on = ("fwd", True, D), ("fwd", False, D), ("fwd_pair", True, D), {"tma": False}, {"tma": True}
    return {
        "base": (off, {}, "all"),
        "s5": (off, {sp: (64, 64, 4, 5)}, "sparse"),
        "tma": (on, {}, "all"),
        "tma_s3": (on, {sp: (64, 64, 4, 3)}, "sparse"),
        "tma_s4": (on, {sp: (64, 64, 4, 4)}, "sparse"),
        "tma_s5": (on, {sp: (64, 64, 4, 5)}, "sparse"),
        "tma_s6": (on, {sp: (64, 64, 4, 6)}, "sparse"),
        "tma_w8": (on, {sp: (64, 64, 8, 4)}, "sparse"),
        "tma_128x64s3": (on, {de: (128, 64, 8, 3)}, "dense"),
        "tma_128x64s4": (on, {de: (128, 64, 8, 4)}, "dense"),
        "tma_128x128s2": (on, {de: (128, 128, 8, 2)}, "dense"),
        # the dense kernel in the sparse rows' tile (64 query rows, 64 keys, 4 warps, 5 stages):
        # against d1.0 it splits the sparse kernel's gap to dense into tile shape and list walk
        "tma_dense64s5": (on, {de: (64, 64, 4, 5)}, "dense"),
        # pair programs (FWD_OPTIONS["pair_rows"]): 128 query rows over two rows' union lists
        "pair": ({"pair_rows": True}, {}, "sparse"),
        "pair_s3": ({"pair_rows": True}, {pp: (128, 64, 8, 3)}, "sparse"),
        "pair_s5": ({"pair_rows": True}, {pp: (128, 64, 8, 5)}, "sparse"),
    }


def bwd_variants(D):
    """As :func:`variants`, for the backward kernels (BWD_OPTIONS). The runs in
    docs/experiments/tma_variants.md name the launch tables: ``table0`` (before: dQ sparse
    64x64 / 4 warps / 3 stages, dense 128x64 / 8 / 2; dK/dV sparse 64x64 / 4 / 2, dense
    128x128 / 8 / 2) and ``table1`` (dQ dense 3 stages, dK/dV sparse 3 stages, dense 64x128 /
    8 / 3). The kernels' table now: ``table1`` at d >= 128 with pointer loads, except sparse
    dK/dV's 2 stages (3 with TMA)."""
    qs, qd, ks, kd = (("dq", True, D), ("dq", False, D), ("dkdv", True, D), ("dkdv", False, D))
    off, on = {"tma": False}, {"tma": True}
    table0 = {qs: (64, 64, 4, 3), qd: (128, 64, 8, 2), ks: (64, 64, 4, 2), kd: (128, 128, 8, 2)}
    table1 = {qs: (64, 64, 4, 3), qd: (128, 64, 8, 3), ks: (64, 64, 4, 3), kd: (64, 128, 8, 3)}
    return {
        "base": (off, {}, "all"),
        "tma": (on, {}, "all"),
        "tma_table0": (on, table0, "all"),
        "base_table1": (off, table1, "all"),
        "tma_dq_s4": (on, {qs: (64, 64, 4, 4)}, "sparse"),
        "tma_dkdv_s4": (on, {ks: (64, 64, 4, 4)}, "sparse"),
        "tma_dq_128x64s4": (on, {qd: (128, 64, 8, 4)}, "dense"),
        "tma_dq_128x128s2": (on, {qd: (128, 128, 8, 2)}, "dense"),
        "tma_dkdv_64x128s2": (on, {kd: (64, 128, 8, 2)}, "dense"),
        "tma_dkdv_64x128s4": (on, {kd: (64, 128, 8, 4)}, "dense"),
        "tma_dkdv_64x64w4s3": (on, {kd: (64, 64, 4, 3)}, "dense"),
        "tma_dkdv_128x128s2": (on, {kd: (128, 128, 8, 2)}, "dense"),
    }


def stripe_block_mask(B, HQ, NB, density, generator, device):
    """A causal mask shaped like a gate's: per head a random set of key-block columns (vertical
    stripes, each column kept with probability ``density``) that every later query block keeps,
    plus the sink and the diagonal. Adjacent query blocks' lists then differ by at most a block,
    where ``random_block_mask``'s independent draws share only ``density`` of theirs."""
    cols = torch.rand(B, HQ, 1, NB, generator=generator, device=device) < density
    m = cols.expand(B, HQ, NB, NB).clone()
    m[..., 0] = True
    m |= torch.eye(NB, dtype=torch.bool, device=device)
    return m & torch.ones(NB, NB, dtype=torch.bool, device=device).tril()


def kernel_ms(fn, names, n=10):
    """Mean GPU time per call of each kernel in ``names`` (torch.profiler), without host work."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return {name: sum(e.self_device_time_total for e in prof.key_averages() if name in e.key) / n / 1000.0
            for name in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backward", action="store_true", help="time the backward kernels' variants")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    ap.add_argument("--variants", nargs="+", default=None,
                    help=f"default: all; forward {list(variants(128))}, backward {list(bwd_variants(128))}")
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "H"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--masks", choices=["random", "stripes"], default="random",
                    help="sparse masks: bench_kernels' i.i.d. blocks, or gate-like column stripes (stripe_block_mask)")
    ap.add_argument("--profile", nargs="*", default=["8192:d0.1", "32768:d0.1", "8192:dense"],
                    help="T:op pairs also timed as GPU kernel time alone (torch.profiler)")
    ap.add_argument("--out", default="seer_outputs/tma_variants")
    args = ap.parse_args(argv)
    D = args.head_dim
    VARIANTS = (bwd_variants if args.backward else variants)(D)
    args.variants = args.variants or list(VARIANTS)
    bad = [n for n in args.variants if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seer_attn import kernels
    bsa = sys.modules["seer_attn.kernels.block_sparse_attn"]
    options = bsa.BWD_OPTIONS if args.backward else bsa.FWD_OPTIONS
    defaults = dict(options)
    # kernel -> the suffix of its kernel-only rows' keys
    kernel_names = ({"_attn_bwd_dq_kernel": "_dq", "_attn_bwd_dkdv_kernel": "_dkdv"} if args.backward
                    else {"_attn_fwd_kernel": "_kernel"})

    def use(name):
        opts, cfg, _ = VARIANTS[name]
        options.clear()
        options.update(defaults, **opts)
        bsa.CONFIG_OVERRIDES.clear()
        bsa.CONFIG_OVERRIDES.update(cfg)

    def bench(fn):  # a 60 ms backward gets ~8 timed calls, not one
        return triton.testing.do_bench(fn, warmup=25, rep=500 if args.backward else 100, return_mode="median")

    (HQ, H), dt, dev = args.heads, torch.bfloat16, "cuda"
    gen = torch.Generator(device=dev)
    rows, checks, errors = [], [], {}
    for T in args.lengths:
        torch.cuda.empty_cache()
        gen.manual_seed(T)
        q, k, v, do = (torch.randn(1, n, T, D, device=dev, dtype=dt, generator=gen) for n in (HQ, H, H, HQ))
        q, k, v = (t.requires_grad_(args.backward) for t in (q, k, v))
        NB = (T + 63) // 64
        fwd = {"dense": ("dense", lambda: kernels.dense_attn(q, k, v))}
        if not args.backward:
            fwd["pool"] = ("dense", lambda: kernels.attn_with_pooling(q, k, v)[0])
        for dens in args.densities:
            gen.manual_seed(1000 + T + int(dens * 100))
            if args.masks == "stripes":
                mask = stripe_block_mask(1, HQ, NB, dens, gen, dev)
            else:
                mask = kernels.random_block_mask(1, HQ, NB, dens, generator=gen, device=dev)
            fwd[f"d{dens:g}"] = ("sparse", lambda mask=mask: kernels.block_sparse_attn(q, k, v, mask))
        if args.backward:  # each op's graph kept: the timed call is its backward alone
            ops = {}
            for op, (kind, f) in fwd.items():
                out = f()
                ops[op] = (kind, lambda out=out: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
        else:
            ops = fwd
        ref = {}
        for name in args.variants:
            use(name)
            for op, (kind, fn) in ops.items():
                if VARIANTS[name][2] not in ("all", kind) or name in errors:
                    continue
                try:
                    out = fn()
                except Exception as e:  # a variant Triton cannot compile here: say so, go on
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    print("error", name, errors[name], flush=True)
                    continue
                out = out if isinstance(out, tuple) else (out,)
                if name == "base":
                    ref[op] = out
                else:
                    checks.append({"T": T, "op": op, "variant": name,
                                   "maxdiff": max((a.float() - b.float()).abs().max().item()
                                                  for a, b in zip(out, ref[op]))})
                del out
        print("checks", json.dumps([c for c in checks if c["T"] == T]), flush=True)
        del ref
        bar = {}  # SDPA on the same inputs (backward: its backward alone)
        for backend, key in ((SDPBackend.CUDNN_ATTENTION, "sdpa_cudnn"), (SDPBackend.FLASH_ATTENTION, "sdpa_flash")):
            try:
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    bar[key] = bench((lambda o=o: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
                                     if args.backward else
                                     (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))
                    del o
            except RuntimeError as e:  # e.g. no cuDNN backward for this shape here: the row says so
                errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                bar[key] = float("nan")
        for op, (kind, fn) in ops.items():
            row = {"T": T, "op": op, **bar}
            names = [n for n in args.variants if VARIANTS[n][2] in ("all", kind) and n not in errors]
            for rnd in range(2):
                for name in names:
                    use(name)
                    ms = bench(fn)
                    row[name] = ms if rnd == 0 else min(ms, row[name])
            if f"{T}:{op}" in args.profile:
                for name in names:
                    use(name)
                    for kname, ms in kernel_ms(fn, kernel_names).items():
                        row[name + kernel_names[kname]] = ms
            rows.append(row)
            print("row", json.dumps(row), flush=True)
        ops = fwd = None  # the next length allocates its own inputs
    use("base")
    os.makedirs(args.out, exist_ok=True)
    kind = "tma_bwd_variants" if args.backward else "tma_variants"
    env = write_envelope(os.path.join(args.out, f"{kind}.json"), kind, rows, config=vars(args),
                         device=dev, model=f"random q/k/v: {HQ} query heads, {H} KV heads, head_dim {D}, bf16, batch 1",
                         checks=checks, errors=errors,
                         variants={n: [o, {str(k): c for k, c in cfg.items()}, a] for n, (o, cfg, a) in VARIANTS.items()
                                   if n in args.variants})
    print(f"\n# {env['provenance']['gpu']}, commit {(env['provenance']['commit'] or '?')[:7]}; errors: {errors}")
    print("| T | op | cuDNN | flash | base | " + " | ".join(n for n in args.variants if n != "base") + " |")
    for r in rows:
        cells = [f"{r[n]:.3f} ({r[n] / r['base']:.3f})" if n in r else "-" for n in args.variants if n != "base"]
        print(f"| {r['T']} | {r['op']} | {r['sdpa_cudnn']:.3f} | {r['sdpa_flash']:.3f} | {r['base']:.3f} | "
              + " | ".join(cells) + " |")
        for suffix in kernel_names.values():
            if "base" + suffix in r:
                cells = [f"{r[n + suffix]:.3f}" if n + suffix in r else "-" for n in args.variants if n != "base"]
                print(f"| {r['T']} | {r['op']} {suffix.strip('_')}-only | | | {r['base' + suffix]:.3f} | "
                      + " | ".join(cells) + " |")
    return env


if __name__ == "__main__":
    main()
