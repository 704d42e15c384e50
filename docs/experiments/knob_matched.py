"""The coverage rule (and with ``--methods``, the gain rule) against the threshold at the same density,
where the GPU runs left gaps (issue 17's knob target at rho = 0.05 and 0.3; gate_quality.md sections 9, 14).

For each target density rho, the parameters of both methods that keep rho x (1 - spread) and
rho x (1 + spread) on the evaluated windows are solved from one exact pass over them
(:func:`~seer_attn.eval.calibration.gate_params_for`, both methods from the same scores); the
four settings and the per-sequence knob at rho then run over the windows, and each method's
perplexity is interpolated (log-log, between its two points) to the knob's achieved density:
coverage over threshold is the ratio the knob target asks to stay within 1%. The perplexity
protocol's keep rules (diagonal, sink, 1 local block, no dense last rows). Run from a clone
(after ``bash .ci/install.sh``; the embedded SmolLM2, float32 on the CPU)::

    python docs/experiments/knob_matched.py GATES --eval eval.jsonl --length 8192 --windows 4 \\
        --densities 0.05 0.3 --out results/quality/cpu_knob_matched_8k.json

Prints each setting's PPL and density as it goes, then one line per rho.
"""
import argparse
import math
import time

import torch

from seer_attn.eval.calibration import exact_gate_scores, gate_params_for
from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows
from seer_attn.eval.quality_run import KNOB_RULES
from seer_attn.eval.settings import Setting, apply_setting
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer
from seer_attn.training.results import write_envelope

KEEP = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0)


def interpolate(points, d):
    """PPL at density ``d`` from two ``(density, ppl)`` points, linear in log-log (outside them: the
    same line extended)."""
    (d0, p0), (d1, p1) = sorted(points)
    if d1 == d0:
        return (p0 + p1) / 2
    t = (math.log(d) - math.log(d0)) / (math.log(d1) - math.log(d0))
    return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gates", help="gates file (gates_*_bf16.safetensors of a gate_quality run)")
    ap.add_argument("--eval", help="jsonl corpus (default: the bundled eval corpus)")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=4, help="first N windows (2 per document)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.3])
    ap.add_argument("--spread", type=float, default=0.12, help="the two points per method at rho x (1 -+ spread)")
    ap.add_argument("--methods", nargs="+", default=["coverage"], choices=KNOB_RULES,
                    help="rules interpolated to the knob's density beside the threshold (the reference, always run)")
    ap.add_argument("--out", help="also write the results as a JSON envelope here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = default_model_path()
    model = load_seer_model(path, dtype=torch.float32, gates=args.gates)
    tok = load_tokenizer(path)
    wins = make_windows(load_documents(args.eval), tok, args.length, 2)[:args.windows]
    rows, summary = [], []

    def save(complete):
        if args.out:
            write_envelope(args.out, "knob_matched", rows, config=vars(args), model=path, complete=complete,
                           device="cpu", summary=summary, keep=KEEP)

    def run(setting):
        t0 = time.time()
        apply_setting(model, setting)
        model.set_seer_mode("sparse", **KEEP)
        r = evaluate_perplexity(model, windows=wins, progress=False)
        row = {"setting": str(setting), "method": setting.method, "param": setting.param, "ppl": r["ppl"],
               "density": r["density"], "windows": r["windows"]}
        rows.append(row)
        save(False)
        print(f"{setting}: ppl {r['ppl']:.3f} at density {r['density']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        return row

    model.set_seer_mode("dense")
    r = evaluate_perplexity(model, windows=wins, progress=False)
    rows.append({"setting": "dense", "method": None, "param": None, "ppl": r["ppl"], "density": 1.0,
                 "windows": r["windows"]})
    print(f"dense: ppl {r['ppl']:.3f} over {r['windows']} windows of {args.length}", flush=True)
    model.set_seer_mode("sparse", **KEEP)
    scores = exact_gate_scores(model, wins)  # one exact pass: both methods' parameters
    asks = [d * f for d in args.densities for f in (1 - args.spread, 1 + args.spread)]
    methods = ["threshold"] + list(dict.fromkeys(args.methods))
    params = {m: gate_params_for(model, wins, asks, method=m, scores=scores) for m in methods}
    del scores
    for i, rho in enumerate(args.densities):
        knob = run(Setting("gate", "density", param=rho))
        at = knob["density"]
        line = {"rho": rho, "knob_density": at, "knob_ppl": knob["ppl"]}
        for m in methods:
            pts = [run(Setting("gate", m, param=params[m][2 * i + j])) for j in (0, 1)]
            line[f"{m}_ppl_at_knob_density"] = interpolate([(p["density"], p["ppl"]) for p in pts], at)
            line[f"{m}_densities"] = [p["density"] for p in pts]
        for m in methods[1:]:
            line[f"{m}_over_threshold"] = line[f"{m}_ppl_at_knob_density"] / line["threshold_ppl_at_knob_density"]
        line["knob_over_threshold"] = knob["ppl"] / line["threshold_ppl_at_knob_density"]
        summary.append(line)
        save(False)
    save(True)
    for s in summary:
        print(f"rho {s['rho']:g}: at density {s['knob_density']:.4f} threshold {s['threshold_ppl_at_knob_density']:.3f}"
              + "".join(f", {m} {s[f'{m}_ppl_at_knob_density']:.3f} ({100 * (s[f'{m}_over_threshold'] - 1):+.1f}%)"
                        for m in methods[1:])
              + f", knob {s['knob_ppl']:.3f} ({100 * (s['knob_over_threshold'] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
