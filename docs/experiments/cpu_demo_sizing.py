"""Size the CPU demo on a GPU: which distillation (length, steps) and which thresholds make
the learned gate beat streaming at equal density in short (CPU-sized) windows.

The CPU demo's fresh distillation is simulated exactly (same command, seed and float32
weights), only faster; longer runs give candidate gates to ship with the package. Every
gates file is then evaluated in float32 on the bundled eval corpus at ``--eval-length``
tokens: the gate at a threshold grid and streaming at a top-k grid, both with the keep
rules of the demo (diagonal, sink, one local block; no dense last rows).

    python docs/experiments/cpu_demo_sizing.py --out seer_outputs/sizing \\
        --runs 2048:40 2048:120 8192:800:bf16

Runs from a clone (``bash .ci/install.sh``) on one GPU; without ``--model`` the embedded
SmolLM2 GGUF. Each distillation writes under ``OUT/runs/``; ``OUT/sizing.json`` is a results
envelope (:mod:`seer_attn.training.results`) of every row.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

KEEP = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0)


def distill(model, seq_len, steps, bf16, out, data):
    cmd = [sys.executable, "-m", "seer_attn.eval.cli", "distill", "--seq-len", str(seq_len),
           "--steps", str(steps), "--seed", "42", "--output", out, "--no-eval", "--no-progress",
           "--save-steps", str(10 ** 6)]
    if model:
        cmd += ["--model", model]
    if data:
        cmd += ["--data", data]
    if bf16:
        cmd.append("--bf16")
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def find_gates(folder):
    for root, _, files in os.walk(folder):
        if "seer_gates.safetensors" in files and "checkpoint-" not in root:
            return os.path.join(root, "seer_gates.safetensors")
    raise FileNotFoundError(f"no seer_gates.safetensors under {folder}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="+", default=["2048:40"], help="SEQ_LEN:STEPS[:bf16]")
    ap.add_argument("--keep-steps", type=int, default=500, help="copy gates of runs this long to --out (bf16)")
    ap.add_argument("--eval-length", type=int, nargs="+", default=[2048])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2, 4e-2, 8e-2, 0.15, 0.25])
    ap.add_argument("--stream-k", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, 10, 12])
    args = ap.parse_args()
    from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from seer_attn.training.results import write_envelope

    os.makedirs(args.out, exist_ok=True)
    gates = {}
    for spec in args.runs:
        parts = spec.split(":")
        L, S, bf16 = int(parts[0]), int(parts[1]), len(parts) > 2
        d = os.path.join(args.out, "runs", spec.replace(":", "_"))
        secs = distill(args.model, L, S, bf16, d, args.data)
        g = find_gates(d)
        gates[spec] = g
        print(f"distilled {spec} in {secs:.0f} s -> {g}", flush=True)

    model = load_seer_model(args.model, dtype=torch.float32, device="cuda")
    tok = load_tokenizer(args.model)
    docs = load_documents()
    rows = []
    for L in args.eval_length:
        windows = make_windows(docs, tok, L, 1)
        nb = L // 64
        model.set_seer_mode("dense")
        dense = evaluate_perplexity(model, windows=windows, progress=False)["ppl"]
        rows.append({"eval_length": L, "what": "dense", "density": 1.0, "ppl": dense})
        for k in args.stream_k:
            nz = 1 - (1 - (k + 0.5) / nb) ** 2  # top-k with k = int((1 - sqrt(1 - nz)) * NB)
            model.set_seer_mode("sparse", seer_selector="streaming", seer_sparsity_method="nz_ratio",
                                seer_nz_ratio=min(1.0, nz), **KEEP)
            r = evaluate_perplexity(model, windows=windows, progress=False)
            rows.append({"eval_length": L, "what": f"streaming k={k}", "density": r["density"], "ppl": r["ppl"]})
        for spec, g in gates.items():
            model.load_gates(g)
            if int(spec.split(":")[1]) >= args.keep_steps and L == args.eval_length[0]:  # candidates to ship (bf16)
                model.save_gates(os.path.join(args.out, f"gates_{spec.replace(':', '_')}.safetensors"),
                                 dtype=torch.bfloat16)
            for t in args.thresholds:
                model.set_seer_mode("sparse", seer_selector="gate", seer_sparsity_method="threshold",
                                    seer_threshold=t, **KEEP)
                r = evaluate_perplexity(model, windows=windows, progress=False)
                rows.append({"eval_length": L, "what": f"gate {spec} thr={t:g}", "density": r["density"],
                             "ppl": r["ppl"]})
        for r in rows:
            if r["eval_length"] == L:
                print(f"{L:6d} {r['what']:32s} density {r['density']:.3f} ppl {r['ppl']:.3f} "
                      f"(+{100 * (r['ppl'] / dense - 1):.1f}%)", flush=True)
    write_envelope(os.path.join(args.out, "sizing.json"), "cpu_demo_sizing", rows, config=vars(args),
                   model=args.model or "embedded SmolLM2-135M-Instruct GGUF", device="cuda", gates=gates)


if __name__ == "__main__":
    main()
