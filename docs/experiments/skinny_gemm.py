"""A Triton skinny GEMM (``x [M, K] @ W[N, K]^T`` for M <= 16) against cuBLAS at the decode step's
projection shapes (issue 15's end-to-end target, session 41 screen).

Session 40's profile (results/decode/h100_e2e_profile.json) put the weight GEMMs at 3.16 of the
fused sparse token's 5.48 ms (H100, 16 layers, 4 x 128k): gate/up near 2.8 TB/s, q / o / down
near 2.6, k / v near 1.4, plus five split-K reduction launches a layer. 3x needs ~0.5 ms less
sparse-token time, and the GEMMs are the only big piece left. This screen asks whether a
bandwidth-shaped kernel gets closer to the memory bound than cuBLAS on those shapes:

- one program per (BN output columns, K split), the rows of ``x`` padded to 16 for ``tl.dot``;
- split-K finished in the same launch: each program stores its partial sums, bumps its column
  tile's arrival counter, and the tile's last program adds the partials and writes the output
  (it resets the counter, so a CUDA graph replays it without a zeroing launch);
- configs: BN x BK x stages x warps x programs per SM, the best per shape kept.

Each case is timed as R calls in one CUDA graph over rotating weight copies (>= 256 MB in all, so
L2 does not hold them; gaps between the graph's nodes included, as in the model's own graph),
and checked against ``F.linear`` (max abs error over the output's scale).

    python docs/experiments/skinny_gemm.py [--m 4 16] [--shapes q k ...] [--out F]
    TRITON_INTERPRET=1 python docs/experiments/skinny_gemm.py --check   # CPU: the kernel vs torch

Prints JSON lines as it goes and a table last; ``--out F`` writes a results envelope.
"""
import argparse
import itertools
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name: (N, K) of the 8B shape's decode projections (Llama-3.1-8B: hidden 4096, 32 / 8 heads of
# 128, MLP 14336, vocabulary 128256)
SHAPES = {"qkv": (6144, 4096), "q": (4096, 4096), "k": (1024, 4096), "o": (4096, 4096),
          "gate_up": (28672, 4096), "gate": (14336, 4096), "down": (4096, 14336), "lm head": (128256, 4096)}
# how many times each appears in one token of the 16- / 32-layer model (q, k, v and gate, up as
# cuBLAS runs them today: separate)
PER_LAYER = {"q": 1, "k": 2, "o": 1, "gate": 2, "down": 1}
MERGED = {"qkv": 1, "o": 1, "gate_up": 1, "down": 1}  # the same with q/k/v and gate/up as one GEMM each


@triton.jit
def _skinny_kernel(X, W, OUT, PART, ARRIVED, M, N, K, SPLIT, s_xm, s_wn, s_om,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    n_ok = rn < N
    m_ok = rm < M
    per = tl.cdiv(tl.cdiv(K, BK), SPLIT) * BK  # the K range of each split, whole BK chunks
    k0 = pid_k * per
    k1 = tl.minimum(k0 + per, K)
    acc = tl.zeros((BM, BN), tl.float32)
    for kk in tl.range(k0, k1, BK, num_stages=STAGES):
        ks = kk + rk
        k_ok = ks < k1
        w = tl.load(W + rn.to(tl.int64)[:, None] * s_wn + ks[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        x = tl.load(X + rm[:, None] * s_xm + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        tl.store(OUT + rm[:, None] * s_om + rn[None, :], acc.to(OUT.dtype.element_ty), mask=out_mask)
    else:
        part = PART + pid_k.to(tl.int64) * BM * N + rm[:, None] * N + rn[None, :]
        tl.store(part, acc, mask=out_mask)
        tl.debug_barrier()
        last = tl.atomic_add(ARRIVED + pid_n, 1, sem="acq_rel") == SPLIT - 1
        if last:
            tl.atomic_xchg(ARRIVED + pid_n, 0)
            tot = tl.zeros((BM, BN), tl.float32)
            for s in range(0, SPLIT):
                tot += tl.load(PART + s * BM * N + rm[:, None] * N + rn[None, :], mask=out_mask, other=0.0,
                               cache_modifier=".cg")
            tl.store(OUT + rm[:, None] * s_om + rn[None, :], tot.to(OUT.dtype.element_ty), mask=out_mask)


class Skinny:
    """``x @ w.T`` for rows ``M <= 16`` with one config; its split-K scratch and counters are
    allocated once (a CUDA graph can replay it)."""

    BM = 16

    def __init__(self, N, K, device, bn=64, bk=128, stages=4, warps=4, split=1):
        if K % 8:
            raise ValueError(f"K must be a multiple of 8, got {K}")
        self.N, self.K, self.bn, self.bk, self.stages, self.warps = N, K, bn, bk, stages, warps
        self.split = max(1, min(split, triton.cdiv(K, bk)))
        self.part = torch.empty(self.split * self.BM * N, dtype=torch.float32, device=device)
        self.arrived = torch.zeros(triton.cdiv(N, bn), dtype=torch.int32, device=device)

    def __call__(self, x, w, out=None):
        M = x.shape[0]
        if M > self.BM or w.shape != (self.N, self.K) or x.shape[1] != self.K:
            raise ValueError(f"skinny GEMM of x {tuple(x.shape)} and w {tuple(w.shape)}: needs M <= {self.BM}, "
                             f"w [{self.N}, {self.K}]")
        out = torch.empty(M, self.N, dtype=x.dtype, device=x.device) if out is None else out
        grid = (triton.cdiv(self.N, self.bn), self.split)
        _skinny_kernel[grid](x, w, out, self.part, self.arrived, M, self.N, self.K, self.split, x.stride(0),
                             w.stride(0), out.stride(0), BM=self.BM, BN=self.bn, BK=self.bk, STAGES=self.stages,
                             num_warps=self.warps)
        return out


def check_cpu():
    """The kernel against torch in the interpreter (fp16 / fp32: its bf16 ``tl.dot`` is broken)."""
    torch.manual_seed(0)
    bad = 0
    for (M, N, K), dt, split, bn in itertools.product([(1, 40, 96), (4, 64, 256), (16, 33, 200)],
                                                      [torch.float16, torch.float32], [1, 3], [16, 32]):
        x = torch.randn(M, K, dtype=dt)
        w = torch.randn(N, K, dtype=dt)
        op = Skinny(N, K, "cpu", bn=bn, bk=32, stages=1, split=split)
        ref = x.float() @ w.float().T
        # twice: the arrival counters must be back at zero after a call
        err = max((op(x, w).float() - ref).abs().max().item() / ref.abs().max().item() for _ in range(2))
        ok = err < (2e-3 if dt == torch.float16 else 1e-5)
        bad += not ok
        print(f"M {M} N {N} K {K} {str(dt)[6:]} split {split} bn {bn}: rel err {err:.2e} {'ok' if ok else 'BAD'}")
    return bad


def _graph_us(calls, reps=20):
    """Microseconds per call of ``calls`` (a list of thunks) captured back to back in one CUDA
    graph, median of ``reps`` replays."""
    from seer_attn.eval.bench_decode import capture_graph

    def run():
        for c in calls:
            c()
    g = capture_graph(run)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return 1e3 * times[len(times) // 2] / len(calls)


def configs(N, K, sms):
    for bn, bk, stages, warps, per_sm in itertools.product((32, 64, 128), (128, 256), (3, 4, 6), (4, 8), (1, 2, 4)):
        tiles = triton.cdiv(N, bn)
        split = max(1, min(triton.cdiv(K, bk), round(per_sm * sms / tiles)))
        yield dict(bn=bn, bk=bk, stages=stages, warps=warps, split=split)


@torch.no_grad()
def bench(args):
    torch.manual_seed(0)
    dt = torch.bfloat16
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    F_ = torch.nn.functional
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        nbytes = 2 * N * K
        copies = max(2, math.ceil(256e6 / nbytes))
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        for M in args.m:
            x = torch.randn(M, K, device=dev, dtype=dt)
            ref = F_.linear(x.float(), ws[0].float())
            outs = [torch.empty(M, N, device=dev, dtype=dt) for _ in ws]
            cublas = _graph_us([lambda w=w, o=o: torch.mm(x, w.T, out=o) for w, o in zip(ws, outs)])
            best, tried = None, {}
            for cfg in configs(N, K, sms):
                key = tuple(sorted(cfg.items()))
                if key in tried:
                    continue
                try:
                    op = Skinny(N, K, dev, **cfg)
                    y = op(x, ws[0])
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    t = _graph_us([lambda w=w, o=o: op(x, w, o) for w, o in zip(ws, outs)])
                except Exception as e:  # a config that does not compile (shared memory) is skipped
                    tried[key] = f"{type(e).__name__}"
                    continue
                tried[key] = t if err < 2e-2 else "wrong"
                if err < 2e-2 and (best is None or t < best[0]):
                    best = (t, cfg, err)
            row = {"shape": name, "N": N, "K": K, "M": M, "cublas_us": round(cublas, 2),
                   "cublas_tb_s": round(nbytes / cublas / 1e6, 2), "configs": len(tried),
                   "failed": sorted({v for v in tried.values() if isinstance(v, str)})}
            if best:
                row.update(triton_us=round(best[0], 2), triton_tb_s=round(nbytes / best[0] / 1e6, 2),
                           speedup=round(cublas / best[0], 3), config=best[1], rel_err=round(best[2], 5))
            rows.append(row)
            print("gemm", json.dumps(row), flush=True)
            del outs
        del ws
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="*", default=[4, 16], help="rows (the batch of a decode step)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--check", action="store_true", help="the kernel against torch (CPU interpreter)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.check:
        raise SystemExit(1 if check_cpu() else 0)
    if not torch.cuda.is_available():
        raise SystemExit("skinny_gemm.py needs a CUDA GPU (or --check under TRITON_INTERPRET=1)")
    rows = bench(args)
    print("\n# shape | M | cuBLAS us | TB/s | Triton us | TB/s | speed-up | config")
    for r in rows:
        print(f"{r['shape']} | {r['M']} | {r['cublas_us']} | {r['cublas_tb_s']} | {r.get('triton_us')} | "
              f"{r.get('triton_tb_s')} | {r.get('speedup')} | {r.get('config')}")
    for M in args.m:  # one layer's projections: as today's model runs them, and merged
        by = {r["shape"]: r for r in rows if r["M"] == M}
        for label, plan in (("separate", PER_LAYER), ("merged", MERGED)):
            if all(s in by and "triton_us" in by[s] for s in plan):
                cb = sum(n * by[s]["cublas_us"] for s, n in plan.items())
                tr = sum(n * by[s]["triton_us"] for s, n in plan.items())
                print(f"# M {M}, {label}: a layer's projections cuBLAS {cb:.1f} us, Triton {tr:.1f} us "
                      "(best config per shape)")
    if args.out:
        from seer_attn.training.results import write_envelope
        write_envelope(args.out, "skinny_gemm", rows, config=vars(args), model="8B decode projection shapes, bf16")


if __name__ == "__main__":
    main()
