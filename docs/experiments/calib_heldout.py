"""How well a threshold solved on a sample keeps the asked density on other text (issue 17's
calibrated knob), by three solvers: from one dense pass's gate scores (``gate_thresholds_for``),
that threshold corrected by secant steps over sparse forwards (``calibrate_threshold``) and
bisection over sparse forwards (``calibrate``). CPU-sized by default: the shipped
SmolLM2 gates, 2048-token windows, 4 calibration windows of the bundled train corpus, 8
evaluation windows of the bundled eval corpus, the keep rules of gate_quality.py::

    python docs/experiments/calib_heldout.py --length 2048 --densities 0.3 0.2

(At 2048 tokens the keep rules alone keep 0.176 of the causal blocks: 0.1 is out of reach.)

Prints one line per (density, solver): the threshold, its density on the calibration windows
and on the evaluation windows, and the seconds the solver took.
"""
import argparse
import time

import torch

from seer_attn.eval.calibration import calibrate, calibrate_threshold, gate_thresholds_for, measure_density
from seer_attn.eval.perplexity import load_documents, make_windows
from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
from seer_attn.training.data import default_corpus_path

KEEP = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0)
GATES = "training/gates/smollm2-135m-instruct.seer_gates.safetensors"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF / HF folder (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--gates", default=GATES)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.2])
    ap.add_argument("--rel-tol", type=float, default=0.02, help="the solvers' tolerance, relative to the density")
    ap.add_argument("--solvers", nargs="+", default=["dense", "secant", "bisection"],
                    choices=["dense", "secant", "bisection"])
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_seer_model(args.model, device=dev, gates=args.gates)
    tok = load_tokenizer(args.model)
    calib = make_windows(load_documents(default_corpus_path("train")), tok, args.length, 1)[:args.calib_windows]
    evals = make_windows(load_documents(default_corpus_path("eval")), tok, args.length, 1)[:args.eval_windows]
    model.set_seer_mode("sparse", **KEEP)
    lines = ["| density | solver | threshold | on calibration | on eval | s |", "|---|---|---|---|---|---|"]
    for rho in args.densities:
        solved = {}
        if "dense" in args.solvers:
            t0 = time.time()
            (tau,) = gate_thresholds_for(model, calib, [rho])
            solved["dense-pass scores"] = (tau, time.time() - t0)
        if "secant" in args.solvers:
            t0 = time.time()
            cal = calibrate_threshold(model, calib, rho, rel_tol=args.rel_tol)
            solved[f"dense pass + {len(cal.history)} sparse passes"] = (cal.param, time.time() - t0)
        if "bisection" in args.solvers:
            t0 = time.time()
            cal = calibrate(model, "threshold", rho, calib, tol=args.rel_tol * rho, strict=False)
            solved[f"bisection, {len(cal.history)} sparse passes"] = (cal.param, time.time() - t0)
        for name, (tau, secs) in solved.items():
            model.set_seer_mode("sparse", seer_sparsity_method="threshold", seer_threshold=tau, **KEEP)
            d_cal, d_eval = measure_density(model, calib), measure_density(model, evals)
            lines.append(f"| {rho:g} | {name} | {tau:.4g} | {d_cal:.4f} ({100 * (d_cal / rho - 1):+.1f}%) | "
                         f"{d_eval:.4f} ({100 * (d_eval / rho - 1):+.1f}%) | {secs:.0f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
