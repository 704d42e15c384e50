"""Where an end-to-end decode token's time goes, dense and sparse, as the graph-mode step runs it
(issue 15: >= 3x end to end at 4 x 128k, measured 2.71x fused on the H200 in session 39).

Session 39's arithmetic put ~5.5 ms of a token outside attention (the fused step at 8.4 ms minus
32 sparse layers of ~91 us) for dense and sparse alike, against ~3.4 ms for reading the 8B
shape's 15 GB of weights at 4.4 TB/s; 3x needs that part or the sparse layer to shrink. This
script replays the bench's model (``eval/bench_decode.py``: random weights, bf16, a filled
static cache) from the graph-mode step, dense (our kernel, every block) and sparse (``--share``),
with and without ``seer_compile_pointwise``, and profiles a few replays: every GPU kernel of
the graph by name, summed per token and grouped (GEMMs, the decode kernel, the gate, Triton
pointwise, other), beside the replay's wall time (the gap is launch latency between nodes).
Then the projections alone at the step's shapes (``--gemm``): q/k/v as three GEMMs or one over
concatenated weights, gate/up as two or one, down, the LM head, each replayed from a CUDA graph,
as microseconds and weight-read TB/s.

    python docs/experiments/decode_e2e_profile.py [--layers 32] [--batch 4] [--tokens 131072] [--out F]

Prints JSON lines and tables; ``--out F`` writes a results envelope.
"""
import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GROUPS = (("decode kernel", ("_decode_split_kernel", "_decode_combine_kernel")),
          ("gate", ("_gate_scores_kernel", "_top_blocks_kernel", "_prior_", "_gate_top_blocks")),
          ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "splitk", "ampere")),
          ("triton pointwise", ("triton_",)),
          ("copy", ("memcpy", "memset", "copy", "index_put", "scatter", "index_copy")))


def group(name):
    low = name.lower()
    for g, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return g
    return "other"


def profile_replays(step, n):
    """GPU kernels of ``n`` calls of ``step`` (a replay): {name: (us per call, launches per call)}."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count:
            out[e.key] = (t / n, e.count / n)
    return out


def e2e(args):
    from seer_attn.eval.bench_decode import _model, graph_decode_time, static_filled
    model = _model(args.layers)
    B, T = args.batch, args.tokens
    cache, state = static_filled(model, B, T, 6 * args.steps + 64, args.shared_kv)
    rows = []
    from seer_attn.kernels import decode_select
    from seer_attn.modeling_seer import decode_graph
    dec_mod = importlib.import_module("seer_attn.kernels.block_sparse_decode")  # (the package's attribute: the op)
    kept = (decode_select.TOP_BLOCKS_BITS, decode_graph.FUSED_APPEND, decode_select.TOP_BLOCKS_EARLY_STOP,
            decode_graph.ONE_LAUNCH_WINDOW)
    kept_dec = (dict(dec_mod.CONFIG_OVERRIDES), dict(dec_mod.DECODE_OPTIONS), dec_mod._TARGET_PROGRAMS_PER_SM)

    def restore_decode_launch():
        dec_mod.CONFIG_OVERRIDES.clear()
        dec_mod.CONFIG_OVERRIDES.update(kept_dec[0])
        dec_mod.DECODE_OPTIONS.update(kept_dec[1])
        dec_mod._TARGET_PROGRAMS_PER_SM = kept_dec[2]
    kept_bits = kept[0]
    merged = False
    for variant in args.variants:
        fused = variant != "eager"
        if variant.startswith("merged") and not merged:
            model.seer_merge_projections()
            merged = True
        if fused:
            model.seer_compile_pointwise()
        decode_select.TOP_BLOCKS_BITS = 8 if variant.endswith("radix") else kept_bits
        decode_graph.FUSED_APPEND = variant != "fused_stock_append"
        # session 41's options (the defaults since session 42), on only in merged_early so that the variants before
        # it keep measuring what they measured: the bisection's early stop, the window in one launch
        decode_select.TOP_BLOCKS_EARLY_STOP = decode_graph.ONE_LAUNCH_WINDOW = variant.startswith("merged_early")
        # session 43: the decode kernel's K/V blocks through tensor descriptors at --tma-config's launch
        restore_decode_launch()
        if variant == "merged_early_tma":
            warps, stages, per_sm = args.tma_config
            dec_mod.CONFIG_OVERRIDES[128] = (1, warps, stages)
            dec_mod.DECODE_OPTIONS["tma"] = True
            dec_mod._TARGET_PROGRAMS_PER_SM = per_sm
        for mode, share in (("dense", 1.0), ("sparse", args.share)):
            model.set_seer_mode("dense", seer_decode_sparsity=True, seer_decode_share=share,
                                seer_decode_meanpool_prior=0.0)
            wall, dec = graph_decode_time(model, cache, B, T, args.steps)
            kernels = profile_replays(dec.step, args.profile_steps)
            by_group = {}
            for name, (us, n) in kernels.items():
                g = by_group.setdefault(group(name), [0.0, 0.0])
                g[0] += us
                g[1] += n
            row = {"B": B, "T": T, "layers": args.layers, "shared_kv": args.shared_kv, "variant": variant, "mode": mode,
                   "share": share,
                   "wall_ms": round(1e3 * wall, 3),
                   "kernel_ms": round(sum(us for us, _ in kernels.values()) / 1e3, 3),
                   "launches": round(sum(n for _, n in kernels.values()), 1),
                   "groups_ms": {g: round(v[0] / 1e3, 3) for g, v in sorted(by_group.items())},
                   "group_launches": {g: round(v[1], 1) for g, v in sorted(by_group.items())},
                   "top": [[name[:90], round(us, 1), round(n, 1)] for name, (us, n) in
                           sorted(kernels.items(), key=lambda kv: -kv[1][0])[:args.top]]}
            rows.append(row)
            print("e2e", json.dumps(row), flush=True)
            del dec
            torch.cuda.empty_cache()
    model.seer_compile_pointwise(enable=False)
    restore_decode_launch()
    (decode_select.TOP_BLOCKS_BITS, decode_graph.FUSED_APPEND, decode_select.TOP_BLOCKS_EARLY_STOP,
     decode_graph.ONE_LAUNCH_WINDOW) = kept
    del cache, state, model
    torch.cuda.empty_cache()
    return rows


def _kernel_us(fn, n=20):
    """GPU-kernel microseconds of one call of ``fn`` replayed from a CUDA graph (summed over its
    kernels; no launch latency) and its kernel count."""
    from seer_attn.eval.bench_decode import capture_graph
    graph = capture_graph(fn)
    graph.replay()
    kernels = profile_replays(graph.replay, n)
    return sum(us for us, _ in kernels.values()), sum(c for _, c in kernels.values())


@torch.no_grad()
def gemms(args):
    """The decode step's projections at the 8B shape, replayed from CUDA graphs."""
    from seer_attn.eval.bench_decode import _graph_bench
    torch.manual_seed(0)
    E, F, HQ, HK, D, V = 4096, 14336, 32, 8, 128, 128256
    dt = torch.bfloat16
    w = {n: torch.randn(o, E, device="cuda", dtype=dt) * 0.02 for n, o in
         (("q", HQ * D), ("k", HK * D), ("v", HK * D), ("o", E), ("gate", F), ("up", F), ("head", V))}
    w["qkv"] = torch.cat([w["q"], w["k"], w["v"]])
    w["kv"] = torch.cat([w["k"], w["v"]])
    w["gate_up"] = torch.cat([w["gate"], w["up"]])
    w["down"] = torch.randn(E, F, device="cuda", dtype=dt) * 0.02
    F_ = torch.nn.functional
    rows = []
    for M in args.gemm:
        x = torch.randn(M, E, device="cuda", dtype=dt)
        h = torch.randn(M, F, device="cuda", dtype=dt)
        cases = {
            "q,k,v (3)": (lambda: (F_.linear(x, w["q"]), F_.linear(x, w["k"]), F_.linear(x, w["v"])),
                          w["qkv"].numel()),
            "qkv (1)": (lambda: F_.linear(x, w["qkv"]), w["qkv"].numel()),
            "k,v (2)": (lambda: (F_.linear(x, w["k"]), F_.linear(x, w["v"])), w["kv"].numel()),
            "kv (1)": (lambda: F_.linear(x, w["kv"]), w["kv"].numel()),
            "o": (lambda: F_.linear(x, w["o"]), w["o"].numel()),
            "gate,up (2)": (lambda: (F_.linear(x, w["gate"]), F_.linear(x, w["up"])), w["gate_up"].numel()),
            "gate_up (1)": (lambda: F_.linear(x, w["gate_up"]), w["gate_up"].numel()),
            "down": (lambda: F_.linear(h, w["down"]), w["down"].numel()),
            "lm head": (lambda: F_.linear(x, w["head"]), w["head"].numel()),
        }
        for name, (fn, n) in cases.items():
            ms = _graph_bench(fn)
            kus, launches = _kernel_us(fn)
            row = {"M": M, "gemm": name, "us": None if isinstance(ms, str) else round(1e3 * ms, 2),
                   "kernel_us": round(kus, 2), "launches": launches, "tb_s": round(2 * n / kus / 1e6, 2)}
            rows.append(row)
            print("gemm", json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20, help="replays timed")
    ap.add_argument("--profile-steps", type=int, default=5, help="replays profiled")
    ap.add_argument("--top", type=int, default=60, help="kernels listed per row")
    ap.add_argument("--gemm", type=int, nargs="*", default=[1, 4, 16], help="rows of the projection benchmark")
    ap.add_argument("--variants", nargs="*",
                    default=["fused_stock_append", "fused", "fused_radix", "merged", "merged_radix"],
                    choices=["eager", "fused", "fused_stock_append", "fused_radix", "merged", "merged_radix",
                             "merged_early", "merged_early_tma"],
                    help="eager; fused (seer_compile_pointwise; the cache writes in one launch, decode_append); "
                         "fused_stock_append (fused with the static cache's own update, as up to session 40); "
                         "merged (fused, q/k/v and gate/up as one GEMM each: seer_merge_projections; up to session "
                         "41 this script's own copy); _radix: top_blocks by radix select (TOP_BLOCKS_BITS 8; else "
                         "the module's setting); merged_early: merged with top_blocks' early stop and the window in "
                         "one launch (TOP_BLOCKS_EARLY_STOP, ONE_LAUNCH_WINDOW, the defaults since session 42; the other "
                         "variants run without them); merged_early_tma: merged_early with the decode kernel's K/V "
                         "through tensor descriptors at --tma-config; merged changes the model for the variants "
                         "after it")
    ap.add_argument("--tma-config", type=int, nargs=3, default=[4, 3, 4], metavar=("WARPS", "STAGES", "PER_SM"),
                    help="merged_early_tma's decode launch: warps, stages, programs per SM")
    ap.add_argument("--shared-kv", action="store_true",
                    help="every layer's KV cache one buffer (bench_decode's --shared-kv: 32 layers on an 80 GB GPU)")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_e2e_profile.py needs a CUDA GPU")
    rows = [] if args.no_e2e else e2e(args)
    grows = gemms(args) if args.gemm else []
    print("\n# variant | mode | wall ms | kernel ms | launches | " + " | ".join(g for g, _ in GROUPS) + " | other")
    for r in rows:
        g = r["groups_ms"]
        print(f"{r['variant']} | {r['mode']} | {r['wall_ms']} | {r['kernel_ms']} | {r['launches']} | "
              + " | ".join(str(g.get(k, 0)) for k, _ in GROUPS) + f" | {g.get('other', 0)}")
    print("# M | gemm | replayed us | kernel us | kernels | weight TB/s (kernel time)")
    for r in grows:
        print(f"{r['M']} | {r['gemm']} | {r['us']} | {r['kernel_us']} | {r['launches']} | {r['tb_s']}")
    if args.out:
        from seer_attn.training.results import write_envelope
        write_envelope(args.out, "decode_e2e_profile", rows, config=vars(args), gemm=grows,
                       model=f"random 8B-shaped SeerLlama, {args.layers} layers, bf16")


if __name__ == "__main__":
    main()
