"""One GPU run for the quality numbers: distill a model's gates, then the DESIGN §5
perplexity protocol for the gate (threshold and nz_ratio) beside dense and the streaming
baseline at the same densities, and passkey retrieval dense vs sparse.

    python -m seer_attn.eval.quality_run --model /tmp/seer/smollm2.gguf \\
        --train /tmp/seer/corpora/train.jsonl --eval /tmp/seer/corpora/eval.jsonl --out results/quality

Prints a table last; writes ``quality.json`` (rows, training cost, passkey, GPU, commit)
and ``quality.md``. ``--distill-target mass`` distills against the mass-pooled target.
"""
import argparse
import json
import os
import time

import torch

THRESHOLDS = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
NZ_RATIOS = (0.1, 0.2, 0.3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--train", nargs="+", default=None, help="training files (default: bundled corpus)")
    ap.add_argument("--eval", default=None, help="evaluation jsonl (default: bundled eval corpus)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--eval-length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    ap.add_argument("--nz-ratios", type=float, nargs="+", default=list(NZ_RATIOS))
    ap.add_argument("--distill-target", choices=("max", "mass"), default="max")
    ap.add_argument("--passkey-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--passkey-threshold", type=float, default=None,
                    help="gate threshold for passkey (default: the one whose density is closest to 0.15)")
    ap.add_argument("--out", default="results/quality")
    ap.add_argument("--cpu", action="store_true", help="smoke-test on the CPU (tiny sizes only)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("quality_run needs a CUDA GPU (or --cpu for a smoke test)")
    dev, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)

    from seer_attn.training.distill import add_distill_args, run_distill
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from .baselines import Setting, compare, format_table
    from .passkey import run_passkey
    from .perplexity import load_documents, make_windows

    os.makedirs(args.out, exist_ok=True)
    d = add_distill_args(argparse.ArgumentParser()).parse_args([])
    d.model, d.data, d.seq_len, d.steps, d.batch_size = args.model, args.train, args.seq_len, args.steps, \
        args.batch_size
    d.output, d.bf16, d.save_steps, d.logging_steps = os.path.join(args.out, "model"), not args.cpu, args.steps, 25
    d.cpu = args.cpu
    if args.distill_target != "max":
        d.model = _with_target(args.model, args.distill_target, args.out)
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    dist = run_distill(d)
    train_s = time.time() - t0
    cost = {"train_seconds": train_s, "steps": args.steps, "steps_per_s": args.steps / train_s,
            "peak_gib": None if args.cpu else torch.cuda.max_memory_allocated() / 2**30,
            "final_loss": dist.get("final_loss")}
    print("cost", json.dumps(cost), flush=True)

    model = load_seer_model(dist["model_dir"], dtype=dtype, device=dev)
    tok = load_tokenizer(dist["model_dir"])
    windows = make_windows(load_documents(args.eval), tok, args.eval_length, 2)
    model.set_seer_mode("sparse", seer_dense_last_rows=0, seer_keep_diagonal=True)
    gate = [Setting("gate", "threshold", param=t) for t in args.thresholds]
    gate += [Setting("gate", "nz_ratio", param=r) for r in args.nz_ratios]
    rows = compare(model, [Setting("dense")] + gate, windows=windows, with_baselines=False)
    dens = sorted({round(r["density"], 3) for r in rows if r["selector"] == "gate" and r.get("density")})
    rows += compare(model, [Setting("streaming", "nz_ratio", target_density=x) for x in dens], windows=windows,
                    with_baselines=False, tol=0.01)
    table = format_table(rows)
    print(table, flush=True)

    thr = args.passkey_threshold
    if thr is None:
        cand = [r for r in rows if r["selector"] == "gate" and r["method"] == "threshold" and r.get("density")]
        thr = min(cand, key=lambda r: abs(r["density"] - 0.15))["param"]
    passkey = {}
    if args.passkey_lengths:
        model.set_seer_mode("dense")
        passkey["dense"] = run_passkey(model, tok, args.passkey_lengths)
        model.set_seer_mode("sparse", seer_sparsity_method="threshold", seer_threshold=thr)
        passkey[f"seer_threshold_{thr:g}"] = run_passkey(model, tok, args.passkey_lengths)
    lines = [table, "", f"training: {json.dumps(cost)}", ""]
    for name, res in passkey.items():
        lines.append(f"passkey {name}: accuracy {res['accuracy']:.3f} per length {res['per_length']} "
                     f"density {res.get('density')}")
    report = "\n".join(lines)
    meta = {"gpu": "cpu" if args.cpu else torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
            "commit": dist.get("commit")}
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"meta": meta, "cost": cost, "rows": rows,
                   "passkey": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in passkey.items()}},
                  f, indent=1, default=str)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(report + "\n")
    print("\n" + report)


def _with_target(model, target, out):
    """A converted copy of ``model`` whose config distills against ``target``."""
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    m = load_seer_model(model, seer_distill_target=target)
    path = os.path.join(out, f"base_{target}")
    m.save_pretrained(path)
    load_tokenizer(model).save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
