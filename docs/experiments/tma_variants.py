"""Forward-kernel variants on one GPU, same inputs, one process (issue 16): K/V tiles loaded
through Hopper tensor descriptors (TMA) or by pointers, and launch configs with TMA
(docs/experiments/tma_variants.md has the runs, and two variants timed then removed).

    python docs/experiments/tma_variants.py --out seer_outputs/tma_variants

Llama-3.1-8B attention shape by default (32 query / 8 KV heads, d128; ``--heads 9 3
--head-dim 64`` is SmolLM2's), bf16, B=1, causal, random block
masks as in ``bench_kernels``. Each variant sets ``block_sparse_attn.FWD_OPTIONS`` and
``CONFIG_OVERRIDES``; every variant's output is compared with the pointer-load kernel's first
(max abs difference), then each (op, variant) is timed in two rounds (variants alternate
within a round, so clock drift hits all) and the lower median kept. SDPA cuDNN and flash on
the same q/k/v give the bar. Writes ``tma_variants.json`` (a results envelope) and prints the
table last: median ms per variant, and each variant over the pointer-load kernel.
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
    sp, de, off, on = ("fwd", True, D), ("fwd", False, D), {"tma": False}, {"tma": True}
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
    }


def kernel_ms(fn, n=10):
    """Mean GPU time of the forward kernel per call (torch.profiler), without host work."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    us = sum(e.self_device_time_total for e in prof.key_averages() if "_attn_fwd_kernel" in e.key)
    return us / n / 1000.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    ap.add_argument("--variants", nargs="+", default=list(variants(128)), choices=list(variants(128)))
    ap.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "H"))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--profile", nargs="*", default=["8192:d0.1", "32768:d0.1", "8192:dense"],
                    help="T:op pairs also timed as GPU kernel time alone (torch.profiler)")
    ap.add_argument("--out", default="seer_outputs/tma_variants")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seer_attn import kernels
    D = args.head_dim
    VARIANTS = variants(D)
    bsa = sys.modules["seer_attn.kernels.block_sparse_attn"]
    defaults = dict(bsa.FWD_OPTIONS)

    def use(name):
        opts, cfg, _ = VARIANTS[name]
        bsa.FWD_OPTIONS.clear()
        bsa.FWD_OPTIONS.update(defaults, **opts)
        bsa.CONFIG_OVERRIDES.clear()
        bsa.CONFIG_OVERRIDES.update(cfg)

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    (HQ, H), dt, dev = args.heads, torch.bfloat16, "cuda"
    gen = torch.Generator(device=dev)
    rows, checks, errors = [], [], {}
    for T in args.lengths:
        torch.cuda.empty_cache()
        gen.manual_seed(T)
        q, k, v = (torch.randn(1, n, T, D, device=dev, dtype=dt, generator=gen) for n in (HQ, H, H))
        NB = (T + 63) // 64
        ops = {"dense": ("dense", lambda: kernels.dense_attn(q, k, v)),
               "pool": ("dense", lambda: kernels.attn_with_pooling(q, k, v)[0])}
        for dens in args.densities:
            gen.manual_seed(1000 + T + int(dens * 100))
            mask = kernels.random_block_mask(1, HQ, NB, dens, generator=gen, device=dev)
            ops[f"d{dens:g}"] = ("sparse", lambda mask=mask: kernels.block_sparse_attn(q, k, v, mask))
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
                if name == "base":
                    ref[op] = out
                else:
                    checks.append({"T": T, "op": op, "variant": name,
                                   "maxdiff": (out.float() - ref[op].float()).abs().max().item()})
                del out
        print("checks", json.dumps([c for c in checks if c["T"] == T]), flush=True)
        del ref
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        for op, (kind, fn) in ops.items():
            row = {"T": T, "op": op, "sdpa_cudnn": cudnn, "sdpa_flash": flash}
            names = [n for n in args.variants if VARIANTS[n][2] in ("all", kind) and n not in errors]
            for rnd in range(2):
                for name in names:
                    use(name)
                    ms = bench(fn)
                    row[name] = ms if rnd == 0 else min(ms, row[name])
            if f"{T}:{op}" in args.profile:
                for name in names:
                    use(name)
                    row[f"{name}_kernel"] = kernel_ms(fn)
            rows.append(row)
            print("row", json.dumps(row), flush=True)
        ops = None  # the next length allocates its own inputs
    use("base")
    os.makedirs(args.out, exist_ok=True)
    env = write_envelope(os.path.join(args.out, "tma_variants.json"), "tma_variants", rows, config=vars(args),
                         device=dev, model=f"random q/k/v: {HQ} query heads, {H} KV heads, head_dim {D}, bf16, batch 1",
                         checks=checks, errors=errors,
                         variants={n: [o, {str(k): c for k, c in cfg.items()}, a] for n, (o, cfg, a) in VARIANTS.items()
                                   if n in args.variants})
    print(f"\n# {env['provenance']['gpu']}, commit {(env['provenance']['commit'] or '?')[:7]}; errors: {errors}")
    print("| T | op | cuDNN | base | " + " | ".join(n for n in args.variants if n != "base") + " |")
    for r in rows:
        cells = [f"{r[n]:.3f} ({r[n] / r['base']:.3f})" if n in r else "-" for n in args.variants if n != "base"]
        print(f"| {r['T']} | {r['op']} | {r['sdpa_cudnn']:.3f} | {r['base']:.3f} | " + " | ".join(cells) + " |")
        if "base_kernel" in r:
            cells = [f"{r[n + '_kernel']:.3f}" if n + "_kernel" in r else "-" for n in args.variants if n != "base"]
            print(f"| {r['T']} | {r['op']} kernel only | | {r['base_kernel']:.3f} | " + " | ".join(cells) + " |")
    return env


if __name__ == "__main__":
    main()
