"""Kernel benchmark: correctness at real lengths, then median times and ratios in one run.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head_dim 128), bf16,
batch 1, causal. Columns: SDPA flash (FA2) and cuDNN backends, FlexAttention (dense, and
with the same 64x64 block masks as ours), ours at several densities, attn_with_pooling,
and the backward pass (dense SDPA flash vs ours).

    python -m seer_attn.eval.bench_kernels --lengths 8192 32768 131072 --out seer_outputs/kernels

Writes ``kernels.csv``, ``kernels.json`` (a results envelope of kind ``"kernels"``,
:mod:`seer_attn.training.results`: provenance, config, rows, plus ``checks`` and ``tuning``)
and, when matplotlib is installed, ``kernels.png``; ``--plot CSV`` redraws the PNG from a CSV
elsewhere. Needs a CUDA GPU (without one: a one-line error, exit code 2).
Times: ``triton.testing.do_bench`` medians (CUDA events), never wall clock.
"""
import argparse
import csv
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from seer_attn.training import cli_args as ca
from seer_attn.training.run_config import ConfigError, RunConfig, config_from_args, default, flag, option, text


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    with sdpa_kernel(be):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def flex_block_mask(mask, idx, cnt, T, block_size):
    """FlexAttention BlockMask holding exactly our block selection: off-diagonal kept blocks
    are "full" blocks, diagonal blocks "partial" ones (mask_mod applied)."""
    from torch.nn.attention.flex_attention import BlockMask

    def causal(b, h, q_idx, kv_idx):  # also encodes the selection, for flex's dense eager fallback
        return mask[b, h, q_idx // block_size, kv_idx // block_size] & (q_idx >= kv_idx)

    NB = idx.shape[-1]
    rows = torch.arange(NB, device=idx.device).view(1, 1, NB)
    last = idx.gather(-1, (cnt - 1).clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    has_diag = (cnt > 0) & (last == rows)
    full_cnt = (cnt - has_diag.int()).int()
    part_idx = torch.zeros_like(idx)
    part_idx[..., 0] = rows.int()
    return BlockMask.from_kv_blocks(has_diag.int(), part_idx.contiguous(), full_cnt, idx.contiguous(),
                                    BLOCK_SIZE=block_size, mask_mod=causal, seq_lengths=(T, T))


@dataclass(frozen=True, kw_only=True)
class KernelBenchConfig(RunConfig):
    """One kernel benchmark run (each field is the option of the same name)."""

    lengths: tuple = option((8192, 32768, 65536, 131072), ca.positive_int, many="+")
    densities: tuple = option((1.0, 0.5, 0.3, 0.1), ca.unit_interval, many="+")
    heads: int = option(32, ca.positive_int)
    kv_heads: int = option(8, ca.positive_int)
    head_dim: int = option(128, ca.positive_int)
    bwd_lengths: tuple = option((8192, 32768), ca.positive_int, many="*")
    flex_lengths: tuple | None = option(None, ca.positive_int, many="*")  # None: every length
    tune: bool = option(False, flag)
    out: str = option("seer_outputs/kernels", text)

    def check(self):
        if self.heads % self.kv_heads:
            raise ConfigError("{kv_heads}=%d does not divide {heads}=%d" % (self.kv_heads, self.heads),
                              "kv_heads", "heads")


def _default(name):
    return default(KernelBenchConfig, name)


def parser() -> argparse.ArgumentParser:
    """The command line of the benchmark (module docstring; defaults: :class:`KernelBenchConfig`'s)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=ca.positive_int, nargs="+", default=_default("lengths"))
    ap.add_argument("--densities", type=ca.unit_interval, nargs="+", default=_default("densities"))
    ap.add_argument("--heads", type=ca.positive_int, default=_default("heads"))
    ap.add_argument("--kv-heads", type=ca.positive_int, default=_default("kv_heads"))
    ap.add_argument("--head-dim", type=ca.positive_int, default=_default("head_dim"))
    ap.add_argument("--bwd-lengths", type=ca.positive_int, nargs="*", default=_default("bwd_lengths"))
    ap.add_argument("--flex-lengths", type=ca.positive_int, nargs="*", default=None, help="default: all lengths")
    ap.add_argument("--tune", action="store_true", help="sweep launch configs at 32k first, keep the fastest")
    ap.add_argument("--out", default=_default("out"), help="output folder (default: %(default)s)")
    ap.add_argument("--plot", default=None, help="only redraw the PNG from this CSV")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    config = config_from_args(KernelBenchConfig, args, parser=ap)
    if args.plot:
        return plot(args.plot, os.path.splitext(args.plot)[0] + ".png")
    ca.require_cuda(ap.prog)
    return run_kernel_bench(config)


def run_kernel_bench(config: KernelBenchConfig) -> dict:
    """The benchmark (module docstring) as ``config`` says, on the CUDA GPU; returns the
    envelope written to ``kernels.json``."""
    if not isinstance(config, KernelBenchConfig):
        raise TypeError(f"run_kernel_bench takes a KernelBenchConfig, got {type(config).__name__}")
    if not torch.cuda.is_available():
        raise ValueError("the kernel benchmark needs a CUDA GPU, and torch sees none")

    import triton
    from seer_attn.kernels import attn_with_pooling, block_mask_to_indices, block_sparse_attn, random_block_mask
    from seer_attn.kernels.block_sparse_attn import CONFIG_OVERRIDES, dense_attn
    from seer_attn.kernels.reference import block_sparse_attn_ref

    dev = "cuda"
    HQ, H, D, BS = config.heads, config.kv_heads, config.head_dim, 64
    dt = torch.bfloat16
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    os.makedirs(config.out, exist_ok=True)
    rows, checks, tuning = [], [], []
    gen = torch.Generator(device=dev)

    def inputs(T, grad=False):
        gen.manual_seed(T)
        q = torch.randn(1, HQ, T, D, device=dev, dtype=dt, generator=gen)
        k = torch.randn(1, H, T, D, device=dev, dtype=dt, generator=gen)
        v = torch.randn(1, H, T, D, device=dev, dtype=dt, generator=gen)
        return [t.requires_grad_(grad) for t in (q, k, v)]

    def masks(T, density):
        gen.manual_seed(1000 + T + int(density * 100))
        NB = (T + BS - 1) // BS
        return random_block_mask(1, HQ, NB, density, generator=gen, device=dev)

    if config.tune:
        T = 32768
        q, k, v = inputs(T)
        m = masks(T, 0.1)
        cands = {
            ("fwd", True): [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 8, 3),
                            (64, 128, 8, 2)],
            ("fwd", False): [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 4), (128, 64, 8, 3)],
        }
        for (kern, sparse), cfgs in cands.items():
            best = None
            for cfg in cfgs:
                CONFIG_OVERRIDES[(kern, sparse, D)] = cfg
                fn = (lambda: block_sparse_attn(q, k, v, m)) if sparse else (lambda: dense_attn(q, k, v))
                try:
                    ms = bench(fn)
                except Exception as e:  # a config that does not fit (shared memory) is skipped, reported
                    tuning.append({"kernel": kern, "sparse": sparse, "config": cfg, "ms": None, "error": str(e)[:80]})
                    print(f"tune {kern} sparse={sparse} {cfg}: failed {str(e)[:80]}", flush=True)
                    continue
                tuning.append({"kernel": kern, "sparse": sparse, "config": cfg, "ms": ms})
                print(f"tune {kern} sparse={sparse} {cfg}: {ms:.3f} ms", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            CONFIG_OVERRIDES[(kern, sparse, D)] = best[1]
        print("chosen:", {str(k): v for k, v in CONFIG_OVERRIDES.items()}, flush=True)
        q = k = v = m = None

    for T in config.lengths:
        torch.cuda.empty_cache()
        q, k, v = inputs(T)
        NB = (T + BS - 1) // BS
        causal_flops = 4.0 * HQ * D * (T * (T + 1) / 2)  # QK^T and PV over the causal triangle
        # ---- correctness first
        ref = sdpa(q, k, v, "flash")
        ours_dense = dense_attn(q, k, v)
        full = torch.ones(1, HQ, NB, NB, dtype=torch.bool, device=dev)
        ours_full = block_sparse_attn(q, k, v, full)
        o_pool, pooled = attn_with_pooling(q, k, v)
        rs = pooled.sum(-1)
        check = {"T": T, "dense_vs_sdpa": rel_err(ours_dense, ref), "mask1_vs_sdpa": rel_err(ours_full, ref),
                 "pool_out_vs_sdpa": rel_err(o_pool, ref),
                 "pool_rowsum_maxdev": (rs - 1).abs().max().item(),
                 "pool_upper_max": pooled.triu(1).abs().max().item(),
                 "nan": bool(torch.isnan(ours_dense).any() or torch.isnan(pooled).any())}
        if T <= 8192:
            m = masks(T, 0.3)
            check["sparse0.3_vs_ref"] = rel_err(block_sparse_attn(q, k, v, m), block_sparse_attn_ref(q, k, v, m))
            sdpa_err = rel_err(ref, block_sparse_attn_ref(q, k, v, full))
            check["sdpa_vs_fp32ref"] = sdpa_err
        checks.append(check)
        print("check", json.dumps(check), flush=True)
        del ours_dense, ours_full, o_pool, pooled, rs, ref
        # ---- timings
        row = {"T": T}
        row["sdpa_flash"] = bench(lambda: sdpa(q, k, v, "flash"))
        try:
            row["sdpa_cudnn"] = bench(lambda: sdpa(q, k, v, "cudnn"))
        except RuntimeError as e:
            print("cudnn unavailable:", str(e)[:100])
            row["sdpa_cudnn"] = float("nan")
        row["ours_dense"] = bench(lambda: dense_attn(q, k, v))
        row["attn_with_pooling"] = bench(lambda: attn_with_pooling(q, k, v))
        flex = config.flex_lengths is None or T in config.flex_lengths
        if flex:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex_c = torch.compile(flex_attention, dynamic=False)
            # compiled mask_mod: the eager path materialises T x T (128 GiB at 128k)
            cm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=dev, _compile=True)
            row["flex_dense"] = bench(lambda: flex_c(q, k, v, block_mask=cm, enable_gqa=True))
        for dens in config.densities:
            m = masks(T, dens)
            tag = f"{dens:g}"
            row[f"ours_d{tag}"] = bench(lambda: block_sparse_attn(q, k, v, m))
            row[f"mask_to_idx_d{tag}"] = bench(lambda: block_mask_to_indices(m))
            row[f"achieved_d{tag}"] = (m & torch.ones(NB, NB, dtype=torch.bool, device=dev).tril()).sum().item() / (
                HQ * NB * (NB + 1) / 2)
            if flex:
                idx, cnt = block_mask_to_indices(m)
                bm = flex_block_mask(m, idx, cnt, T, BS)
                fo = flex_c(q, k, v, block_mask=bm, enable_gqa=True, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})
                if T <= 32768:
                    check_key = f"flex_vs_ours_d{tag}_T{T}"
                    checks.append({check_key: rel_err(fo, block_sparse_attn(q, k, v, m))})
                row[f"flex64_d{tag}"] = bench(lambda: flex_c(q, k, v, block_mask=bm, enable_gqa=True,
                                                             kernel_options={"BLOCK_M": 64, "BLOCK_N": 64}))
                del idx, cnt, bm, fo
        row["tflops_sdpa_flash"] = causal_flops / row["sdpa_flash"] / 1e9
        row["tflops_ours_dense"] = causal_flops / row["ours_dense"] / 1e9
        if T in config.bwd_lengths:
            qg, kg, vg = inputs(T, grad=True)
            do = torch.randn_like(qg)
            o_ref = sdpa(qg, kg, vg, "flash")
            row["bwd_sdpa_flash"] = bench(lambda: torch.autograd.grad(o_ref, (qg, kg, vg), do, retain_graph=True))
            o_d = dense_attn(qg, kg, vg)
            g_ours = torch.autograd.grad(o_d, (qg, kg, vg), do, retain_graph=True)
            g_ref = torch.autograd.grad(o_ref, (qg, kg, vg), do, retain_graph=True)
            checks.append({f"bwd_dense_vs_sdpa_T{T}": [rel_err(a, b) for a, b in zip(g_ours, g_ref)]})
            row["bwd_ours_dense"] = bench(lambda: torch.autograd.grad(o_d, (qg, kg, vg), do, retain_graph=True))
            for dens in (0.5, 0.1):
                m = masks(T, dens)
                o_s = block_sparse_attn(qg, kg, vg, m)
                row[f"bwd_ours_d{dens:g}"] = bench(lambda: torch.autograd.grad(o_s, (qg, kg, vg), do,
                                                                               retain_graph=True))
                if T <= 8192:
                    o_r = block_sparse_attn_ref(qg, kg, vg, m)
                    gs = torch.autograd.grad(o_s, (qg, kg, vg), do, retain_graph=True)
                    gr = torch.autograd.grad(o_r, (qg, kg, vg), do)
                    checks.append({f"bwd_d{dens:g}_vs_ref_T{T}": [rel_err(a, b) for a, b in zip(gs, gr)]})
                    del o_r, gs, gr
                del o_s
            del qg, kg, vg, do, o_ref, o_d, g_ours, g_ref
        rows.append(row)
        print("row", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        q = k = v = None  # free this length's inputs before the next allocation

    env = write_results(config, rows, checks, tuning, {str(k): v for k, v in CONFIG_OVERRIDES.items()}, dev)
    try:
        plot(os.path.join(config.out, "kernels.csv"), os.path.join(config.out, "kernels.png"))
    except ImportError:
        print("matplotlib missing: CSV written, redraw with --plot", os.path.join(config.out, "kernels.csv"))
    print_table(rows, env["provenance"])
    return env


def write_results(config, rows, checks, tuning, configs, device) -> dict:
    """Write ``kernels.json`` (the envelope, returned: ``config`` the :class:`KernelBenchConfig`,
    ``resolved`` the shape and the launch configurations used) and ``kernels.csv`` to ``config.out``."""
    from seer_attn.training.results import write_envelope
    shape = {"HQ": config.heads, "H": config.kv_heads, "D": config.head_dim, "dtype": "bf16", "B": 1}
    env = write_envelope(os.path.join(config.out, "kernels.json"), "kernels", rows, config=asdict(config),
                         resolved={"shape": shape, "configs": configs}, device=device,
                         model=f"random q/k/v: {config.heads} query heads, {config.kv_heads} KV heads, "
                               f"head_dim {config.head_dim}, bf16, batch 1", checks=checks, tuning=tuning)
    write_csv(os.path.join(config.out, "kernels.csv"), rows)
    return env


def write_csv(path, rows):
    """``rows`` as CSV: the union of their keys, ``T`` first."""
    keys = sorted({k for r in rows for k in r}, key=lambda s: (s != "T", s))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def print_table(rows, prov):
    v, commit = prov["versions"], (prov["commit"] or "unknown")[:7]
    print(f"\n# {prov['gpu']}  torch {v['torch']}  triton {v.get('triton')}  commit {commit}")
    cols = ["sdpa_flash", "sdpa_cudnn", "flex_dense", "ours_dense", "ours_d1", "ours_d0.5", "ours_d0.3",
            "ours_d0.1", "flex64_d0.5", "flex64_d0.3", "flex64_d0.1", "attn_with_pooling"]
    print("median ms | " + " | ".join(["T"] + cols))
    for r in rows:
        print(" | ".join([str(r["T"])] + [f"{r[c]:.2f}" if c in r else "-" for c in cols]))
    print("ratios | T | d1/flash | pool/flash | d0.1 ms | d0.1/flex64 | bwd flash/bwd d0.1 | bwd flash/bwd ours dense")
    for r in rows:
        def g(a, b):
            return f"{r[a] / r[b]:.2f}" if a in r and b in r else "-"
        print(f"ratios | {r['T']} | {g('ours_d1', 'sdpa_flash')} | {g('attn_with_pooling', 'sdpa_flash')} | "
              f"{r.get('ours_d0.1', float('nan')):.2f} | {g('ours_d0.1', 'flex64_d0.1')} | "
              f"{g('bwd_sdpa_flash', 'bwd_ours_d0.1')} | {g('bwd_sdpa_flash', 'bwd_ours_dense')}")


def plot(csv_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    Ts = [int(r["T"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in ["sdpa_flash", "sdpa_cudnn", "flex_dense", "ours_dense", "ours_d1", "ours_d0.5", "ours_d0.3", "ours_d0.1",
              "flex64_d0.1", "attn_with_pooling"]:
        ys = [float(r[c]) if r.get(c) not in (None, "") else math.nan for r in rows]
        if any(not math.isnan(y) for y in ys):
            ax.plot(Ts, ys, marker="o", label=c)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("median ms (causal prefill, bf16)")
    ax.set_title("Attention forward: SDPA / FlexAttention / seer-attn")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print("wrote", png_path)


if __name__ == "__main__":
    main()
