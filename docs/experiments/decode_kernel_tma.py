"""The sparse decode kernel's K/V loads through tensor descriptors (TMA) against pointer loads
(issue 15, session 43), 8B attention shape (32 query / 8 KV heads, d128, bf16), share 0.1.

Why: session 42's end-to-end profile (decode_host_time.md) put the decode kernel at 1.22 ms of
the H100's 4.86 ms sparse token (16 layers, 4 x 128k): ~76 us a layer reading 215 MB, ~2.8 TB/s;
the H200's step sweep (results/decode/h200_step_sweep.json) 70 us there, ~3.1 TB/s of its ~4.8,
while dense decode reaches ~4.5 TB/s. One 64-token block per step by pointer loads keeps few
bytes in flight; a TMA copy is one instruction per block and Triton pipelines it over
``num_stages`` shared-memory buffers.

Each variant is replayed from its own CUDA graph (median microseconds, both launches: split
kernel and merge) on the same random cache and the same random selection of 10% of the blocks
per (sequence, KV head); its output is compared with the default's (pointer loads).
Variants: pointer loads at the default launch (``ptr``) and at other programs-per-SM targets;
TMA at stages 2-6, 4 or 8 warps, programs-per-SM targets 1-8.

    python docs/experiments/decode_kernel_tma.py [--settings 1x131072 4x131072 16x32768 16x131072] [--out F]

Prints JSON lines as it goes and a table last (best TMA and best pointer variant per setting,
with GB/s of the K/V bytes read); ``--out F`` writes a results envelope.
"""
import argparse
import importlib
import json

import torch

HQ, H, D, BS = 32, 8, 128, 64


@torch.no_grad()
def sweep(B, S, share, per_sms, stages, warps, emit):
    from seer_attn.eval.bench_decode import _decode_inputs, _graph_bench
    from seer_attn.kernels import block_sparse_decode
    dec = importlib.import_module("seer_attn.kernels.block_sparse_decode")
    q, k, v = _decode_inputs(B, S, seed=B * S)
    gen = torch.Generator(device="cuda").manual_seed(B * S + 2)
    NB = S // BS
    K = max(1, round(share * NB))
    idx = torch.rand(B, H, NB, device="cuda", generator=gen).topk(K, dim=-1).indices.sort(-1).values
    cnt = torch.full((B, H), K, dtype=torch.int32, device="cuda")
    lens = torch.full((B,), S, device="cuda")
    gbytes = B * H * K * BS * D * 2 * 2 / 1e9

    def kern():
        return block_sparse_decode(q, k, v, idx, lens, block_counts=cnt, check_lengths=False)

    default_cfg, default_per_sm = dec._config(D, True, q.dtype), dec._TARGET_PROGRAMS_PER_SM
    ref = kern().float()
    row = {"B": B, "S": S, "K": K, "gbytes": round(gbytes, 4)}
    results = []

    def run(name, cfg, per_sm, tma):
        dec.CONFIG_OVERRIDES[D] = cfg
        dec._TARGET_PROGRAMS_PER_SM = per_sm
        dec.DECODE_OPTIONS["tma"] = tma
        splits = dec.num_decode_splits(B, H, K, q.device)
        try:
            err = float((kern().float() - ref).abs().max())
            ms = _graph_bench(kern)
        except Exception as ex:  # a config that does not fit
            err, ms = None, f"{type(ex).__name__}: {str(ex)[:80]}"
        finally:
            dec.CONFIG_OVERRIDES.clear()
            dec._TARGET_PROGRAMS_PER_SM = default_per_sm
            dec.DECODE_OPTIONS["tma"] = False
        line = {"B": B, "S": S, "variant": name, "config": list(cfg), "per_sm": per_sm, "tma": tma,
                "splits": splits, "us": round(1e3 * ms, 2) if isinstance(ms, float) else ms, "max_abs_diff": err}
        if isinstance(ms, float):
            line["gb_per_s"] = round(gbytes / ms * 1e3, 1)
            results.append(line)
        emit(line)
        return line

    base = run("ptr default", default_cfg, default_per_sm, False)
    row["ptr_default_us"] = base["us"]
    for per_sm in per_sms:
        if per_sm != default_per_sm:
            run("ptr", default_cfg, per_sm, False)
    for w in warps:
        for st in stages:
            for per_sm in per_sms:
                run("tma", (1, w, st), per_sm, True)
    for kind in ("ptr", "tma"):
        mine = [r for r in results if r["tma"] == (kind == "tma")]
        if mine:
            best = min(mine, key=lambda r: r["us"])
            row[f"{kind}_best_us"] = best["us"]
            row[f"{kind}_best"] = {"config": best["config"], "per_sm": best["per_sm"], "splits": best["splits"]}
            row[f"{kind}_best_gb_per_s"] = best["gb_per_s"]
    row["max_abs_diff_tma"] = max((r["max_abs_diff"] for r in results if r["tma"]), default=None)
    emit(dict(row, variant="summary"))
    return row


@torch.no_grad()
def layout(B, S, share, pads, emit):
    """The default launch (pointer loads) on caches of ``S + pad`` slots (``seq_lens`` S: the same
    blocks, other strides between heads; an S of 2^17 slots puts every head 32 MB apart) and on three
    selection patterns of the same count: uniform random blocks, runs of 8 consecutive blocks, and
    one uniform selection shared by every (sequence, KV head); session 48 added runs of 32, one run of
    consecutive blocks, every block, and SDPA flash over every block (GB/s: the bytes each reads)."""
    from seer_attn.eval.bench_decode import _graph_bench
    from seer_attn.kernels import block_sparse_decode
    gen = torch.Generator(device="cuda").manual_seed(B * S + 1)
    NB = S // BS
    K = max(8, round(share * NB) // 8 * 8)
    gbytes = B * H * K * BS * D * 2 * 2 / 1e9
    uniform = torch.rand(B, H, NB, device="cuda", generator=gen).topk(K, dim=-1).indices.sort(-1).values
    starts = torch.rand(B, H, NB // 8, device="cuda", generator=gen).topk(K // 8, dim=-1).indices * 8
    runs = (starts[..., None] + torch.arange(8, device="cuda")).flatten(2).sort(-1).values
    shared = uniform[:1, :1].expand(B, H, K).contiguous()
    # session 48 (the H200's ~3.1 TB/s plateau at every launch config): how much is the scatter?
    starts32 = torch.rand(B, H, NB // 32, device="cuda", generator=gen).topk(K // 32, dim=-1).indices * 32
    runs32 = (starts32[..., None] + torch.arange(32, device="cuda")).flatten(2).sort(-1).values
    first = torch.randint(0, NB - K + 1, (B, H, 1), device="cuda", generator=gen)
    one_run = first + torch.arange(K // 32 * 32, device="cuda")
    every = torch.arange(NB, device="cuda").expand(B, H, NB).contiguous()
    lens = torch.full((B,), S, device="cuda")
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = []

    def record(pad, pattern, n, ms):  # one timed call reading n blocks of every list
        line = {"B": B, "S": S, "K": n, "pad": pad, "pattern": pattern, "variant": "layout",
                "us": round(1e3 * ms, 2) if isinstance(ms, float) else ms}
        if isinstance(ms, float):
            line["gb_per_s"] = round(gbytes * n / K / ms * 1e3, 1)
        emit(line)
        rows.append(line)

    for pad in pads:
        k = torch.randn(B, H, S + pad, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(B, H, S + pad, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        for name, idx in (("uniform", uniform), ("runs of 8", runs), ("one selection for all", shared),
                          ("runs of 32", runs32), ("one run", one_run), ("every block", every)):
            n = idx.shape[-1]
            c = torch.full((B, H), n, dtype=torch.int32, device="cuda")
            record(pad, name, n, _graph_bench(lambda k=k, v=v, idx=idx, c=c: block_sparse_decode(
                q, k, v, idx, lens, block_counts=c, check_lengths=False)))
        if pad == 0:  # the dense reference on the same cache: SDPA's flash backend reads every block
            from seer_attn.eval.bench_decode import _sdpa
            record(0, "SDPA flash, every block", NB, _graph_bench(lambda k=k, v=v: _sdpa(q, k, v, "flash")))
        del k, v
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["1x131072", "4x131072", "16x32768", "16x131072"])
    ap.add_argument("--share", type=float, default=0.1)
    ap.add_argument("--per-sm", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--layout", type=int, nargs="*", default=None, metavar="PAD",
                    help="also time the default launch on caches of S + PAD slots and three selection patterns "
                         "(e.g. --layout 0 64 184); --no-sweep: only that")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", default=None, help="write every line and the summary here (JSON)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_kernel_tma.py needs a CUDA GPU")
    lines = []

    def emit(d):
        lines.append(d)
        print(json.dumps(d), flush=True)

    rows, layout_rows = [], []
    for setting in args.settings:
        B, S = (int(x) for x in setting.split("x"))
        if not args.no_sweep:
            rows.append(sweep(B, S, args.share, args.per_sm, args.stages, args.warps, emit))
            torch.cuda.empty_cache()
        if args.layout:
            layout_rows += layout(B, S, args.share, args.layout, emit)
    if args.out:
        from seer_attn.training.results import write_envelope
        write_envelope(args.out, "decode_kernel_tma", rows, config=vars(args),
                       model="random weights, Llama-3.1-8B attention shape", lines=lines, layout=layout_rows)
    print(f"\n# {torch.cuda.get_device_name()}  graph-replayed us (split + merge), share {args.share}")
    print("B x cache | ptr default | best ptr (cfg, per SM) | GB/s | best TMA (cfg, per SM) | GB/s | TMA / ptr")
    for r in rows:
        ratio = r["tma_best_us"] / r["ptr_default_us"] if "tma_best_us" in r else None
        print(f"{r['B']} x {r['S'] // 1024}k | {r['ptr_default_us']} | {r.get('ptr_best_us')} {r.get('ptr_best')} | "
              f"{r.get('ptr_best_gb_per_s')} | {r.get('tma_best_us')} {r.get('tma_best')} | "
              f"{r.get('tma_best_gb_per_s')} | {ratio and round(ratio, 3)}")
    if layout_rows:
        print("\nB x cache | slots past S | selection | us | GB/s")
        for r in layout_rows:
            print(f"{r['B']} x {r['S'] // 1024}k | {r['pad']} | {r['pattern']} | {r['us']} | {r.get('gb_per_s')}")


if __name__ == "__main__":
    main()
