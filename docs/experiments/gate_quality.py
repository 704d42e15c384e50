"""Issue 17 on one GPU: the density knob against the threshold at the same density, gates distilled
with and without retrieval data, the training-free baselines, and passkey paired with dense.

Run from a clone (after ``bash .ci/install.sh``) on one H200, about 6 minutes::

    python docs/experiments/gate_quality.py --model smollm2.gguf --train corpora/train.jsonl \\
        --eval corpora/eval.jsonl --out seer_outputs/gate_quality

Protocol of docs/design.md §4 and docs/experiments/smollm2_quality_h100.md (8192-token windows,
2 per document of ``--eval``; the sink block, the block before the diagonal and the diagonal kept
by every selection; no dense last rows), in phases that each rewrite
``OUT/gate_quality.json`` (a results envelope, ``complete: false`` until the end):

1. ``distill``: the gates, ``--steps`` steps of 8192 tokens, once per variant of
   ``--variants`` (``plain``: the paper's data and loss; ``retrieval``: ``--retrieval-mix`` of the
   sequences rewritten with retrieval structure and ``--peak-weight``; the capacity variants
   ``wide``: gate width 256, ``qmax``: Q pooled by avg and max; :data:`CAPACITY`; ``through``: plain data, the
   loss through the mean-pooled prior at ``--meanpool-prior``, section 16); gates saved in bf16;
2. ``ppl``: dense, then for each variant the density knob at each ``--densities`` value, the
   threshold solved to the same density (on 4 windows of ``--train``, held out: the calibrated
   knob; ``--calib-from eval``: on 4 of the evaluated windows) and the knob at the threshold's
   achieved density
   (:func:`seer_attn.eval.quality_run.density_knob_rows`: the issue's "within 1% of the threshold
   at the same achieved density"); with ``--coverage`` also the coverage rule solved where the
   threshold is and bisected to the threshold's achieved density; then streaming and mean-pool
   top-k calibrated to each density;
3. ``passkey``: dense and each variant's knob at ``--passkey-density`` (with the 2 last block rows
   dense, as a prompt's question needs), ``--passkey-samples`` prompts per length and depth,
   paired prompt by prompt with dense (lost, gained, sign-test p).
4. ``cost``: the time of one layer's selection, threshold against the density knob, on random
   gate scores of 32 query heads at 32k and 128k tokens (``triton.testing.do_bench``, median ms;
   what the knob adds to a prefill is that difference times the layer count).

``--phases`` picks among ppl, baselines, passkey and cost (default all; the distillation runs
unless ``--gates VARIANT=PATH`` hands over an earlier run's gates). A phase that would start
after ``--budget-s`` seconds is skipped and said so (the envelope stays
``complete: false``). ``OUT/gate_quality.csv`` holds the perplexity rows, ``OUT/gate_quality.png``
their plot; the table and the verdicts against the issue's targets are printed last.
"""
import argparse
import csv
import json
import os
import time

import torch

from seer_attn.eval.baselines import compare
from seer_attn.eval.passkey import paired_passkey, run_passkey
from seer_attn.eval.perplexity import load_documents, make_windows
from seer_attn.eval.plots import plot_ppl_vs_density
from seer_attn.eval.quality_run import KNOB_RULES, density_knob_rows
from seer_attn.eval.settings import Setting, apply_setting
from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
from seer_attn.modeling_seer.seer_layer import gate_structure
from seer_attn.training import cli_args as ca
from seer_attn.training.data import default_corpus_path
from seer_attn.training.distill import DistillConfig, run_distill
from seer_attn.training.results import write_envelope

KEEP = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0)
BASELINES = (("streaming", "nz_ratio"), ("meanpool", "nz_ratio"))
#: ``--oracle``: the reference the issue measures the gate's gap against (a dense pass per layer; not a baseline),
#: as the issue's top-k per row and under the gate's own density knob
ORACLE = ("oracle_max", "nz_ratio")


def references(args):
    """(selector, method) of every reference row the baselines phase runs: the issue's baselines, then the oracle
    (``--oracle``: top-k and the density knob) and the baselines under the knob (``--knob-baselines``)."""
    return list(BASELINES) + ([ORACLE, (ORACLE[0], "density")] if args.oracle else []) + (
        [(sel, "density") for sel, _ in BASELINES] if args.knob_baselines else [])


def reference_setting(sel, method, density):
    """The knob takes the density as its parameter; a top-k is calibrated to it."""
    return Setting(sel, method, param=density) if method == "density" else \
        Setting(sel, method, target_density=density)
PHASES = ("ppl", "baselines", "passkey", "cost")
VARIANTS = ("plain", "retrieval", "wide", "qmax", "through")
#: the gate-capacity variants' distillation options (issue 17's "gate capacity"): plain data and loss,
#: other gates (``wide``: projections twice the paper's width; ``qmax``: Q pooled by max beside avg)
CAPACITY = {"wide": {"gate_hidden_size": 256}, "qmax": {"q_pooling": ("avg", "max")}}
#: distilled through the mean-pooled prior at ``--meanpool-prior`` (seer_distill_prior, section 16): plain data,
#: the loss reads the mixture the rows select from
THROUGH = "through"
#: the issue's dense PPL and targets on this protocol (results/quality/h100_sink_local_*.json)
DENSE_H100, TARGET_LOW = 11.299, 12.2


def gates_arg(text):
    """``VARIANT=PATH`` of ``--gates``, checked (a one-line error names a bad entry); kept as given, so the
    envelope's config records the command line's form (:func:`given_gates` splits it)."""
    variant, sep, path = text.partition("=")
    if not sep or variant not in VARIANTS or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not VARIANT=PATH with VARIANT one of {list(VARIANTS)}")
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{text!r}: no such gates file {path}")
    return text


def given_gates(args) -> dict:
    """``{variant: path}`` of ``--gates``."""
    return dict(g.split("=", 1) for g in getattr(args, "gates", []))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF / HF folder (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--train", nargs="+", default=None, help="distillation data (default: the bundled corpus)")
    ap.add_argument("--eval", default=None, help="evaluation jsonl (default: the bundled eval corpus)")
    ap.add_argument("--out", default="seer_outputs/gate_quality")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS[:2]), choices=VARIANTS,
                    help="gate sets compared (default: plain retrieval); wide / qmax: the capacity variants; "
                         "through: distilled through the prior at --meanpool-prior")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--eval-length", type=int, default=8192)
    ap.add_argument("--retrieval-mix", type=float, default=0.25)
    ap.add_argument("--peak-weight", type=float, default=0.0)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.2, 0.1, 0.05])
    ap.add_argument("--baseline-tol", type=float, default=0.01,
                    help="density tolerance of the baselines (their top-k densities step by ~0.015 at 8k)")
    ap.add_argument("--calib-from", choices=["train", "eval"], default="train",
                    help="where the threshold rows' thresholds are solved: 4 windows of --train (held out: "
                         "the calibrated knob a user gets) or of --eval (the windows evaluated; before 2026-12-04)")
    ap.add_argument("--coverage", action="store_true",
                    help="density knob rows also of the coverage rule: solved where the threshold is, and "
                         "bisected to the threshold's achieved density (the knob's PPL against the threshold)")
    ap.add_argument("--gain", action="store_true",
                    help="density knob rows also of the gain rule (per row, the blocks that would each hold >= g of "
                         "the row's kept mass), solved and bisected as --coverage's are")
    ap.add_argument("--meanpool-prior", type=ca.float_in(0, 1, low_open=False), default=0.0, metavar="A",
                    help="seer_meanpool_prior of every gate row: the share A of the mean-pooled q.k prior in the "
                         "gate's scores (section 15; 0: the gate alone)")
    ap.add_argument("--oracle", action="store_true",
                    help="with the baselines phase: the oracle top-k of the true max-pooled map at each density too "
                         "(the gate's gap to it, issue 17's first target; not counted as a baseline)")
    ap.add_argument("--knob-baselines", action="store_true",
                    help="with the baselines phase: streaming and mean-pool under the gate's density knob too "
                         "(their scores allocated over the layer as the gate's are; not the issue's baselines)")
    ap.add_argument("--gates", nargs="+", type=gates_arg, default=[], metavar="VARIANT=PATH",
                    help="gates of a variant from an earlier run (e.g. plain=OUT/gates_plain_bf16.safetensors): "
                         "that variant is not distilled again")
    ap.add_argument("--passkey-density", type=float, default=0.12)
    ap.add_argument("--passkey-settings", nargs="*", default=[], metavar="SETTING",
                    help="gate selections to run passkey with besides the knob at --passkey-density, each gate "
                         "set, e.g. gate:threshold=0.03 gate:nz_ratio=0.1 (paired with dense the same way)")
    ap.add_argument("--passkey-lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--passkey-samples", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=330.0, help="no phase starts after this many seconds")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                    help="what runs after the distillation (default: all); e.g. --variants retrieval --phases "
                         "passkey for the passkey of one gate set alone")
    ap.add_argument("--cpu", action="store_true", help="smoke test on the CPU (give tiny sizes)")
    args = ap.parse_args(argv)
    if THROUGH in args.variants and not 0 < args.meanpool_prior < 1:
        ap.error(f"--variants {THROUGH} needs 0 < --meanpool-prior < 1 (the share it is distilled through and served "
                 f"with), got {args.meanpool_prior:g}")
    return args


class Run:
    """What was measured so far, rewritten to OUT/gate_quality.json after each step."""

    def __init__(self, args):
        self.args, self.t0 = args, time.time()
        self.rows, self.cost, self.passkey, self.skipped = [], {}, {}, []

    def elapsed(self):
        return time.time() - self.t0

    def may_start(self, what):
        if self.elapsed() <= self.args.budget_s:
            return True
        self.skipped.append(what)
        print(f"[gate_quality] skipped {what}: {self.elapsed():.0f} s > --budget-s {self.args.budget_s:g}", flush=True)
        return False

    def save(self, complete=False):
        a = self.args
        passkey = {k: {**v, "samples": [{kk: vv for kk, vv in r.items() if kk != "prompt"} for r in v["samples"]]}
                   for k, v in self.passkey.items()}
        write_envelope(os.path.join(a.out, "gate_quality.json"), "gate_quality", self.rows, config=vars(a),
                       model=a.model or "embedded SmolLM2-135M GGUF", device="cpu" if a.cpu else "cuda",
                       complete=complete and not self.skipped, cost=self.cost, passkey=passkey,
                       skipped=self.skipped, seconds=self.elapsed())
        with open(os.path.join(a.out, "gate_quality.csv"), "w", newline="") as f:
            cols = ["label", "setting", "selector", "method", "param", "target_density", "density", "ppl",
                    "matched_to", "ppl_ratio"]
            w = csv.DictWriter(f, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)


def distill(args, variant, run):
    extra = dict(retrieval_mix=args.retrieval_mix, peak_weight=args.peak_weight) if variant == "retrieval" else \
        dict(distill_prior=args.meanpool_prior) if variant == THROUGH else dict(CAPACITY.get(variant, {}))
    config = DistillConfig(model=args.model, data=args.train, seq_len=args.seq_len, steps=args.steps,
                           output=os.path.join(args.out, "work", variant), bf16=not args.cpu, cpu=args.cpu,
                           save_steps=args.steps, logging_steps=25, no_progress=True, seed=42, **extra)
    t = time.time()
    res = run_distill(config)
    run.cost[variant] = {"train_seconds": time.time() - t, "steps": args.steps, "final_loss": res["final_loss"],
                         **extra}
    return res["gates_path"]


def main(argv=None):
    args = parse_args(argv)
    keep = dict(KEEP, seer_meanpool_prior=args.meanpool_prior)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu with tiny sizes)")
    try:  # refused before any distillation
        extra = [Setting.parse(spec) for spec in args.passkey_settings]
    except ValueError as e:
        raise SystemExit(f"--passkey-settings: {e}") from None
    bad = [str(x) for x in extra if x.selector != "gate" or x.param is None]
    if bad:
        raise SystemExit(f"--passkey-settings {bad}: give gate:METHOD=PARAM (the gate sets are what is compared)")
    os.makedirs(args.out, exist_ok=True)
    run = Run(args)
    dev, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)

    given = given_gates(args)
    bad = [v for v in given if v not in args.variants]
    if bad:
        raise SystemExit(f"--gates names variants {bad} that are not among --variants {args.variants}")
    gates = {}
    for v in args.variants:
        if v in given:
            gates[v] = given[v]
        elif run.may_start(f"distill {v}"):
            gates[v] = distill(args, v, run)
            run.save()
    if not gates:
        raise SystemExit("no gates distilled within the budget")
    tok = load_tokenizer(args.model)
    windows = make_windows(load_documents(args.eval), tok, args.eval_length, 2)
    calib = None if args.calib_from == "eval" else \
        make_windows(load_documents(args.train[0] if args.train else default_corpus_path("train")), tok,
                     args.eval_length, 1)
    models = {}

    def model_with(path):
        """The model with the gates of ``path`` loaded (one model per gate structure: the capacity variants')."""
        key = json.dumps(gate_structure(path), sort_keys=True)
        if key not in models:
            models[key] = load_seer_model(args.model, dtype=dtype, device=dev, gates=path)
        return models[key].load_gates(path)

    for v, path in gates.items():  # the float32 gates stay in OUT/work; a bf16 copy beside the results
        model_with(path).save_gates(os.path.join(args.out, f"gates_{v}_bf16.safetensors"), dtype=torch.bfloat16)
    model = model_with(next(iter(gates.values())))
    model.set_seer_mode("sparse", **keep)
    if {"ppl", "baselines"} & set(args.phases):
        run.rows += compare(model, [Setting("dense")], windows=windows, with_baselines=False, progress=False)
    for v, path in gates.items():
        if "ppl" in args.phases and run.may_start(f"density knob rows of {v}"):
            model = model_with(path)
            model.set_seer_mode("sparse", **keep)
            for r in density_knob_rows(model, windows, args.densities, calib=calib, rules=rules_of(args)):
                run.rows.append({**r, "label": f"gate {v} ({r['method']})"})
            run.save()
    for sel, method in references(args):
        what = f"{sel} baseline" if (sel, method) in BASELINES else f"{sel} {method}"
        if "baselines" in args.phases and run.may_start(what):
            run.rows += compare(model, [reference_setting(sel, method, d) for d in args.densities],
                                windows=windows, with_baselines=False, tol=args.baseline_tol, progress=False)
            run.save()

    if "passkey" in args.phases and args.passkey_lengths and run.may_start("passkey"):
        model.set_seer_mode("dense")
        run.passkey["dense"] = run_passkey(model, tok, args.passkey_lengths, samples_per_cell=args.passkey_samples,
                                           progress=False)
        run.save()
        for v, path in gates.items():
            for i, setting in enumerate([Setting("gate", "density", param=args.passkey_density)] + extra):
                name = v if i == 0 else f"{v} {setting}"
                if not run.may_start(f"passkey {name}"):
                    continue
                model = model_with(path)
                apply_setting(model, setting)
                model.set_seer_mode("sparse", **{**keep, "seer_dense_last_rows": 2})
                res = run_passkey(model, tok, args.passkey_lengths, samples_per_cell=args.passkey_samples,
                                  progress=False)
                res["vs_dense"] = paired_passkey(run.passkey["dense"], res)
                run.passkey[name] = res
                run.save()
    if "cost" in args.phases and not args.cpu and run.may_start("selection cost"):
        run.cost["selection_ms"] = selection_cost()
    run.save(complete=True)
    if run.rows:
        plot_ppl_vs_density(run.rows, os.path.join(args.out, "gate_quality.png"), title="SmolLM2, 8k, eval.jsonl")
    print(report(run))


def selection_cost(lengths=(32768, 131072), heads=32, density=0.1):
    """Median ms of one layer's block selection, ``threshold`` against ``density``, on random causal
    gate scores ``[1, heads, T/64, T/64]`` on the GPU (sink and local block kept)."""
    from triton.testing import do_bench

    from seer_attn.modeling_seer.selection import causal_fill, select_blocks
    out = {}
    for T in lengths:
        NB = T // 64
        scores = causal_fill(torch.randn(1, heads, NB, NB, device="cuda") * 3)
        kw = dict(keep_sink=True, keep_local=1, dense_last_rows=0)
        out[f"{T // 1024}k"] = {
            "threshold": do_bench(lambda s=scores: select_blocks(s, "threshold", threshold=1e-2, **kw)),
            "density": do_bench(lambda s=scores: select_blocks(s, "density", density=density, **kw))}
        del scores
        torch.cuda.empty_cache()
    return out


def rules_of(args):
    """The knob rules asked for besides the threshold and the density knob (``--coverage``, ``--gain``)."""
    return tuple(m for m in KNOB_RULES if getattr(args, m, False))


def report(run):
    """The closing table: PPL (achieved density) per target density of each selection, the knob
    against the threshold at one density, passkey, and the issue's targets met or not."""
    rows, dens, lines = run.rows, run.args.densities, []
    dense = next((r["ppl"] for r in rows if r["selector"] == "dense"), None)
    if dense is not None:
        lines.append(f"dense PPL {dense:.3f} (the issue's H100 runs: {DENSE_H100})")
    if getattr(run.args, "meanpool_prior", 0.0):
        lines.append(f"gate rows with the mean-pooled prior, seer_meanpool_prior={run.args.meanpool_prior:g}")
    lines.append("| selection | " + " | ".join(f"{d:g}" for d in dens) + " |")
    lines.append("|---|" + "---|" * len(dens))

    def cell(r):
        return "—" if r is None or r.get("ppl") is None else f"{r['ppl']:.3f} ({r['density']:.3f})"

    def gate_row(v, d, kind):
        """kind: knob, threshold, matched (the knob at the threshold's density), RULE (a rule of
        rules_of solved to d) or "RULE matched" (that rule at the threshold's density)."""
        rule, _, matched = kind.partition(" ")
        for r in rows:
            if r.get("label", "").startswith(f"gate {v} ") and r.get("knob_density") == d:
                method, m = r["method"], r.get("matched_to")
                if kind == "knob" and method == "density" and not m or kind == "threshold" and method == "threshold" \
                        or kind == "matched" and m:
                    return r
                if rule in KNOB_RULES and method == rule \
                        and bool(r.get(f"{rule}_matched_to")) == bool(matched):
                    return r
        return None

    def base_row(sel, d, method="nz_ratio"):
        want = str(reference_setting(sel, method, d))
        return next((r for r in rows if r["setting"] == want), None)

    held = " on held-out windows" if run.args.calib_from == "train" else ""
    kinds = {"knob": "density knob", "threshold": "threshold solved to it" + held,
             "matched": "knob at the threshold's density"}
    for rule in rules_of(run.args):
        kinds.update({rule: f"{rule} solved to it" + held, f"{rule} matched": f"{rule} at the threshold's density"})
    for v in gates_of(run):
        for kind, name in kinds.items():
            lines.append(f"| gate {v}: {name} | " + " | ".join(cell(gate_row(v, d, kind)) for d in dens) + " |")
    for sel, method in references(run.args):
        lines.append(f"| {sel} ({method}) | " + " | ".join(cell(base_row(sel, d, method)) for d in dens) + " |")
    lines.append("")
    for v in gates_of(run):
        for d in dens:
            m = gate_row(v, d, "matched")
            if m is not None:
                lines.append(f"gate {v} at {d:g}: knob vs {m['matched_to']} at density {m['density']:.4f}: "
                             f"{100 * (m['ppl_ratio'] - 1):+.2f}% (target <= +1%: "
                             f"{'met' if m['ppl_ratio'] <= 1.01 else 'missed'})")
            for rule in rules_of(run.args):
                c = gate_row(v, d, f"{rule} matched")
                if c is not None:
                    lines.append(f"gate {v} at {d:g}: {rule} vs {c[f'{rule}_matched_to']} at density "
                                 f"{c['density']:.4f} ({c['density_error']:+.4f}): {100 * (c['ppl_ratio'] - 1):+.2f}% "
                                 f"(target <= +1%: {'met' if c['ppl_ratio'] <= 1.01 else 'missed'})")
                c = gate_row(v, d, rule)
                if c is not None and c.get("calibrated_on") == "held-out":
                    lines.append(f"gate {v} at {d:g}: the {rule} calibrated on held-out windows keeps "
                                 f"{c['density']:.4f} ({100 * (c['density'] / d - 1):+.1f}% of the asked density)")
            t = gate_row(v, d, "threshold")
            if t is not None and t.get("calibrated_on") == "held-out":
                lines.append(f"gate {v} at {d:g}: the threshold calibrated on held-out windows keeps "
                             f"{t['density']:.4f} ({100 * (t['density'] / d - 1):+.1f}% of the asked density)")
        gate = [r for r in rows if r.get("label", "").startswith(f"gate {v} ") and r.get("ppl")]
        low = [r["ppl"] for r in gate if r["density"] <= 0.1 + 1e-3]
        if low:
            lines.append(f"gate {v}: best PPL at density <= 0.10: {min(low):.3f} (target <= {TARGET_LOW}; "
                         f"{'met' if min(low) <= TARGET_LOW else 'missed'})")
        for d in dens:
            knob, base = gate_row(v, d, "knob"), [base_row(sel, d) for sel, _ in BASELINES]
            base = [b for b in base if b is not None and b.get("ppl")]
            if knob is not None and knob.get("ppl") and base:
                best = min(base, key=lambda b: b["ppl"])
                lines.append(f"gate {v} at {d:g}: knob {knob['ppl']:.3f} vs best baseline {best['setting']} "
                             f"{best['ppl']:.3f} ({'ahead' if knob['ppl'] < best['ppl'] else 'BEHIND'})")
            for method in ("nz_ratio", "density"):
                oracle = base_row(ORACLE[0], d, method)
                if knob is not None and knob.get("ppl") and oracle is not None and oracle.get("ppl"):
                    lines.append(f"gate {v} at {d:g}: knob {knob['ppl']:.3f} at {knob['density']:.3f} vs the oracle "
                                 f"({method}) {oracle['ppl']:.3f} at {oracle['density']:.3f} "
                                 f"({100 * (knob['ppl'] / oracle['ppl'] - 1):+.1f}%)")
            for rule in rules_of(run.args):
                cov = gate_row(v, d, rule)
                if cov is not None and cov.get("ppl") and base:
                    best = min(base, key=lambda b: b["ppl"])
                    verdict = ("ahead" if cov["ppl"] < best["ppl"] else "BEHIND") \
                        if cov["density"] <= best["density"] else "denser than the baseline: no verdict"
                    lines.append(f"gate {v} at {d:g}: {rule} {cov['ppl']:.3f} at {cov['density']:.3f} vs best "
                                 f"baseline {best['setting']} {best['ppl']:.3f} at {best['density']:.3f} ({verdict})")
    for name, res in run.passkey.items():
        line = f"passkey {name}: {res['accuracy']:.3f} (" + " ".join(
            f"{n}: {a:.3f}" for n, a in res["per_length"].items()) + ")"
        if res.get("density") is not None:
            line += f"; density {res['density']:.3f} (" + " ".join(
                f"{n}: {d:.3f}" for n, d in res["density_per_length"].items()) + ")"
        if res.get("vs_dense"):
            p = res["vs_dense"]
            line += f"; vs dense: lost {p['lost']}, gained {p['gained']} of {p['n']}, sign test p={p['p_value']:.3g}"
        lines.append(line)
    lines.append(f"cost: {json.dumps(run.cost)}; skipped: {run.skipped or 'nothing'}; {run.elapsed():.0f} s")
    return "\n".join(lines)


def gates_of(run):
    """The variants whose gates were distilled or handed over (``--gates``), in the order run."""
    given = given_gates(run.args)
    return [v for v in run.args.variants if v in run.cost or v in given]


if __name__ == "__main__":
    main()
