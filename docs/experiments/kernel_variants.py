"""Before/after timing of a kernel change on one GPU, same inputs, one process (issue 16).

The kernels of this checkout against a copy of an earlier ``kernels/`` package, imported under
another name, e.g. the package at commit af41b99 (before one-pass pooling and longest-rows-first
launch order):

    mkdir -p /tmp/before && git archive af41b99 kernels | tar -x -C /tmp/before
    python docs/experiments/kernel_variants.py --before /tmp/before/kernels --out seer_outputs/variants

Llama-3.1-8B attention shape (32 query / 8 KV heads, d128), bf16, B=1, causal, random block
masks as in ``bench_kernels``. Per length: dense forward, sparse forward at each density,
attn_with_pooling (max), and at ``--bwd-lengths`` the backward pass dense and at density 0.1;
before and after alternate per measurement so that clock drift hits both. Checks first that
both give the same output (and pooled map). Writes ``variants.json`` (a results envelope) and
prints the table last: median ms before, after, after / before.
"""
import argparse
import importlib.util
import json
import os
import sys

import torch

from seer_attn.training.results import write_envelope


def load_package(folder, name="kernels_before"):
    """The kernels package in ``folder`` imported as ``name`` (its relative imports resolve
    inside it)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="folder of the earlier kernels package")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    ap.add_argument("--bwd-lengths", type=int, nargs="*", default=[32768])
    ap.add_argument("--out", default="seer_outputs/variants")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton

    from seer_attn import kernels as after
    before = load_package(os.path.abspath(args.before))
    impls = {"before": before, "after": after}
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    HQ, H, D, dt, dev = 32, 8, 128, torch.bfloat16, "cuda"
    gen = torch.Generator(device=dev)
    rows, checks = [], []
    for T in args.lengths:
        torch.cuda.empty_cache()
        gen.manual_seed(T)
        q, k, v = (torch.randn(1, n, T, D, device=dev, dtype=dt, generator=gen) for n in (HQ, H, H))
        NB = (T + 63) // 64
        masks = {}
        for dens in args.densities:
            gen.manual_seed(1000 + T + int(dens * 100))
            masks[dens] = after.random_block_mask(1, HQ, NB, dens, generator=gen, device=dev)
        ops = {"dense": lambda m: m.dense_attn(q, k, v),
               "pool": lambda m: m.attn_with_pooling(q, k, v)}
        for dens, mask in masks.items():
            ops[f"d{dens:g}"] = lambda m, mask=mask: m.block_sparse_attn(q, k, v, mask)
        # same results first
        o_b, p_b = before.attn_with_pooling(q, k, v)
        o_a, p_a = after.attn_with_pooling(q, k, v)
        check = {"T": T, "pool_out_maxdiff": (o_a.float() - o_b.float()).abs().max().item(),
                 "pooled_maxdiff": (p_a - p_b).abs().max().item()}
        del o_b, p_b, o_a, p_a
        m = masks[min(masks)]
        check["sparse_maxdiff"] = (after.block_sparse_attn(q, k, v, m).float()
                                   - before.block_sparse_attn(q, k, v, m).float()).abs().max().item()
        checks.append(check)
        print("check", json.dumps(check), flush=True)
        for op, fn in ops.items():
            row = {"T": T, "op": op}
            for name in ("before", "after", "before2", "after2"):
                row[name] = bench(lambda: fn(impls[name.rstrip("2")]))
            row["before"], row["after"] = min(row.pop("before2"), row["before"]), min(row.pop("after2"), row["after"])
            rows.append(row)
            print("row", json.dumps(row), flush=True)
        if T in args.bwd_lengths:
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            do = torch.randn_like(q)
            for op in ("dense", f"d{min(masks):g}"):
                row = {"T": T, "op": "bwd_" + op}
                for name, impl in impls.items():
                    o = impl.dense_attn(qg, kg, vg) if op == "dense" else impl.block_sparse_attn(qg, kg, vg,
                                                                                                  masks[min(masks)])
                    row[name] = bench(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True))
                    del o
                rows.append(row)
                print("row", json.dumps(row), flush=True)
            del qg, kg, vg, do
        del q, k, v, masks
    os.makedirs(args.out, exist_ok=True)
    env = write_envelope(os.path.join(args.out, "variants.json"), "kernel_variants", rows, config=vars(args),
                         device=dev, model=f"random q/k/v: {HQ} query heads, {H} KV heads, head_dim {D}, bf16, batch 1",
                         checks=checks)
    print(f"\n# {env['provenance']['gpu']}, commit {(env['provenance']['commit'] or '?')[:7]}, before = {args.before}")
    print("| T | op | before ms | after ms | after / before |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['op']} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] / r['before']:.3f} |")
    return env


if __name__ == "__main__":
    main()
