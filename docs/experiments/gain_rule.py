"""Issue 17 screen: the ``gain`` selection rule against the threshold and the coverage at one density.

A row keeping softmax mass M of the gate loses about -log M; adding a block of probability p
gains log(1 + p / M). The gain rule (``seer_sparsity_method="gain"``,
:func:`seer_attn.modeling_seer.selection.select_gain`) keeps, per row, the free blocks (those the
keep rules do not force) in falling probability while p_k / (M_k + p_k) >= g, M_k the mass kept
before block k: the greedy spend of the blocks it keeps that maximises the summed log kept mass
of the layer, between the threshold (confident peaks first, whatever the row keeps) and the
coverage (unsure rows first). Before the rule was a method it was screened by patching the
threshold (session 31, the same rule: masks checked equal); this script now runs the method.

Runs the rule at rho x (1 -+ spread) and interpolates its perplexity (log-log) to the knob's
density of a knob_matched.py run on the same gates and windows, whose threshold and coverage
rows are the comparison::

    python docs/experiments/gain_rule.py GATES --matched results/quality/cpu_knob_matched_long_8k.json \\
        --out results/quality/cpu_gain_rule_8k.json

The perplexity protocol's keep rules and windows are knob_matched.py's.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import knob_matched  # noqa: E402
from seer_attn.eval.calibration import exact_gate_scores, gate_params_for  # noqa: E402
from seer_attn.eval.perplexity import evaluate_perplexity, load_documents, make_windows  # noqa: E402
from seer_attn.eval.settings import Setting, apply_setting  # noqa: E402
from seer_attn.modeling_seer.conversion import default_model_path, load_seer_model, load_tokenizer  # noqa: E402
from seer_attn.training.results import write_envelope  # noqa: E402

KEEP = knob_matched.KEEP


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gates")
    ap.add_argument("--matched", required=True, help="knob_matched.py's envelope on the same gates and windows")
    ap.add_argument("--spread", type=float, default=0.12)
    ap.add_argument("--out")
    args = ap.parse_args()
    matched = json.load(open(args.matched))
    cfg = matched["config"]
    if os.path.abspath(cfg["gates"]) != os.path.abspath(args.gates):
        raise SystemExit(f"{args.matched} measured {cfg['gates']}, not {args.gates}")
    torch.set_num_threads(2)
    path = default_model_path()
    model = load_seer_model(path, dtype=torch.float32, gates=args.gates)
    wins = make_windows(load_documents(cfg["eval"]), load_tokenizer(path), cfg["length"], 2)[:cfg["windows"]]
    rows, summary = [], []

    def save(complete):
        if args.out:
            write_envelope(args.out, "gain_rule_screen", rows, config={**vars(args), "matched_config": cfg},
                           model=path, complete=complete, device="cpu", summary=summary, keep=KEEP)

    model.set_seer_mode("sparse", **KEEP)
    scores = exact_gate_scores(model, wins)
    asks = [s["rho"] * f for s in matched["summary"] for f in (1 - args.spread, 1 + args.spread)]
    params = gate_params_for(model, wins, asks, method="gain", scores=scores)
    del scores
    for i, s in enumerate(matched["summary"]):
        pts = []
        for g in params[2 * i:2 * i + 2]:
            t0 = time.time()
            apply_setting(model, Setting("gate", "gain", param=g))
            model.set_seer_mode("sparse", **KEEP)
            r = evaluate_perplexity(model, windows=wins, progress=False)
            rows.append({"setting": str(Setting("gate", "gain", param=g)), "param": g, "ppl": r["ppl"],
                         "density": r["density"], "windows": r["windows"]})
            pts.append((r["density"], r["ppl"]))
            save(False)
            print(f"gain {g:.4g}: ppl {r['ppl']:.3f} at density {r['density']:.4f} ({time.time() - t0:.0f} s)",
                  flush=True)
        gain = knob_matched.interpolate(pts, s["knob_density"])
        thr, cov = s["threshold_ppl_at_knob_density"], s["coverage_ppl_at_knob_density"]
        summary.append({"rho": s["rho"], "knob_density": s["knob_density"], "gain_ppl_at_knob_density": gain,
                        "gain_densities": [p[0] for p in pts], "threshold_ppl_at_knob_density": thr,
                        "coverage_ppl_at_knob_density": cov, "gain_over_threshold": gain / thr,
                        "coverage_over_threshold": cov / thr})
        save(False)
        print(f"rho {s['rho']:g} at {s['knob_density']:.4f}: gain {gain:.3f} ({100 * (gain / thr - 1):+.2f}%), "
              f"threshold {thr:.3f}, coverage {cov:.3f} ({100 * (cov / thr - 1):+.2f}%)", flush=True)
    save(True)


if __name__ == "__main__":
    main()
