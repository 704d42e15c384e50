"""One GPU run for the quality numbers: distill a model's gates, then the docs/design.md §4
perplexity protocol for the gate (threshold and nz_ratio) beside dense and every baseline
at the same densities, and passkey retrieval dense vs sparse.

    python -m seer_attn.eval.quality_run --model /tmp/seer/smollm2.gguf \\
        --train /tmp/seer/corpora/train.jsonl --eval /tmp/seer/corpora/eval.jsonl --out results/quality

The work runs in phases (``--phases``, in this order): ``distill`` (skipped when
``--gates`` gives distilled gates), ``ppl`` (dense, the gate at each threshold and
nz_ratio, streaming at each gate density), ``baselines`` (oracle max / mass, mean-pooled
top-k and oracle coverage at ``--baseline-densities``, default: the nz_ratio rows'
densities) and ``passkey`` (dense, then the gate at each ``--passkey-threshold`` and each
``--passkey-settings`` selection such as ``oracle_max:nz_ratio=0.1``, each paired prompt by
prompt against dense: lost, gained and a sign-test p-value; ``--passkey-samples`` prompts per
length and depth). ``--keep-sink`` / ``--keep-local N`` apply to every sparse selection, the
gate's and the baselines' alike. ``quality.json`` (a results envelope of kind ``"quality"``,
:mod:`seer_attn.training.results`: provenance, config, the perplexity rows, plus ``cost`` and
``passkey``) and ``quality.md`` in ``--out`` are rewritten after every phase and every
baseline density, with ``complete: false`` until the last phase has finished, so a run
stopped by a time limit keeps what it measured and says it is partial. The distilled gates
are saved to ``--out`` in bfloat16 (a few MB); the full model folder and checkpoints go to
``--work``. The table is printed last.
"""
import argparse
import json
import os
import time

import torch

from seer_attn.training import cli_args as ca

from .baselines import setting_arg

THRESHOLDS = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
NZ_RATIOS = (0.1, 0.2, 0.3)
PHASES = ("distill", "ppl", "baselines", "passkey")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--gates", default=None, help="distilled gates (skips the distill phase)")
    ap.add_argument("--train", nargs="+", default=None, help="training files (default: bundled corpus)")
    ap.add_argument("--eval", default=None, help="evaluation jsonl (default: bundled eval corpus)")
    ap.add_argument("--seq-len", type=ca.int_at_least(2), default=8192)
    ap.add_argument("--eval-length", type=ca.int_at_least(2), default=8192)
    ap.add_argument("--steps", type=ca.positive_int, default=400)
    ap.add_argument("--batch-size", type=ca.positive_int, default=1)
    ap.add_argument("--thresholds", type=ca.open_unit_interval, nargs="+", default=list(THRESHOLDS))
    ap.add_argument("--nz-ratios", type=ca.unit_interval, nargs="+", default=list(NZ_RATIOS))
    ap.add_argument("--baseline-densities", type=ca.unit_interval, nargs="*", default=None,
                    help="densities for the oracle and mean-pool baselines (default: those of the nz_ratio rows)")
    ap.add_argument("--distill-target", choices=("max", "mass"), default="max")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--passkey-lengths", type=ca.positive_int, nargs="*", default=[2048, 4096, 8192])
    ap.add_argument("--passkey-samples", type=ca.positive_int, default=1,
                    help="prompts per (length, depth) cell, each with its own random key (default 1)")
    ap.add_argument("--passkey-threshold", type=ca.open_unit_interval, nargs="+", default=None,
                    help="gate thresholds for passkey (default: none if --passkey-settings is given, else the one "
                         "whose density in the ppl phase is closest to 0.15)")
    ap.add_argument("--passkey-settings", nargs="+", default=[], metavar="SELECTOR:METHOD=PARAM", type=setting_arg,
                    help="more sparse passkey runs besides the gate thresholds, e.g. gate:nz_ratio=0.15 "
                         "oracle_max:nz_ratio=0.15 streaming:nz_ratio=0.2 (fixed parameters only)")
    ap.add_argument("--keep-sink", action="store_true",
                    help="keep the first (sink) block in every sparse row, for every selection (seer_keep_sink)")
    ap.add_argument("--passkey-dense-last-rows", type=ca.nonneg_int, nargs="+", default=[0, 2],
                    help="seer_dense_last_rows values for the sparse passkey runs (0: the question's rows sparse "
                         "too; 2: the model default, last two block rows dense)")
    ap.add_argument("--out", default="results/quality")
    ap.add_argument("--work", default=None, help="model folder and checkpoints (default: OUT/work)")
    ap.add_argument("--keep-local", type=ca.nonneg_int, default=0,
                    help="keep this many blocks before the diagonal in every sparse row, for every selection "
                         "(seer_keep_local)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (short logs)")
    ap.add_argument("--cpu", action="store_true", help="smoke-test on the CPU (tiny sizes only)")
    args = ap.parse_args(argv)
    for st in args.passkey_settings:
        if st.selector == "dense" or st.param is None:
            ap.error(f"argument --passkey-settings: {st}: give a sparse SELECTOR:METHOD=PARAM (dense always runs; "
                     "'@DENSITY' calibration is for perplexity)")
    if ("passkey" in args.phases and args.passkey_lengths and args.passkey_threshold is None
            and not args.passkey_settings and "ppl" not in args.phases):
        ap.error("the passkey phase needs --passkey-threshold or --passkey-settings (or the ppl phase "
                 "before it, to pick the threshold closest to density 0.15)")
    if "distill" in args.phases and args.gates:
        ap.error("--gates skips distillation: drop 'distill' from --phases or drop --gates")
    if "distill" not in args.phases and not args.gates:
        ap.error("without the distill phase, --gates must name distilled gates")
    if not args.cpu:
        ca.require_cuda(ap.prog, " (or pass --cpu for a smoke test)")
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    if args.no_progress:  # transformers' own bars too (loading weights, writing shards)
        hf_logging.disable_progress_bar()
    try:
        _run(args)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(args):
    dev, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)

    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from .perplexity import load_documents, make_windows

    os.makedirs(args.out, exist_ok=True)
    work = args.work or os.path.join(args.out, "work")
    report = Report(args)

    if "distill" in args.phases:
        dist = _distill(args, work, report)
        model = load_seer_model(dist["model_dir"], dtype=dtype, device=dev)
        # bf16: half the size (SmolLM2's float32 gates are 17.7 MB); the float32 ones stay in --work
        model.save_gates(os.path.join(args.out, f"gates_{args.distill_target}_bf16.safetensors"), dtype=torch.bfloat16)
    else:
        model = load_seer_model(args.model, dtype=dtype, device=dev, gates=args.gates)
    tok = load_tokenizer(args.model)
    windows = make_windows(load_documents(args.eval), tok, args.eval_length, 2)
    model.set_seer_mode("sparse", seer_dense_last_rows=0, seer_keep_diagonal=True, seer_keep_sink=args.keep_sink,
                         seer_keep_local=args.keep_local)

    if "ppl" in args.phases:
        _ppl(model, windows, args, report)
    if "baselines" in args.phases:
        _baselines(model, windows, args, report)
    if "passkey" in args.phases:
        _passkey(model, tok, args, report)
    report.save(complete=True)
    print("\n" + report.text())


class Report:
    """Everything measured so far, rewritten to ``quality.json`` / ``quality.md`` on each save."""

    def __init__(self, args):
        self.args, self.rows, self.cost, self.passkey = args, [], None, {}

    def text(self):
        from .baselines import format_table, sort_rows
        lines = [format_table(sort_rows(self.rows)) if self.rows else "(no perplexity rows)", ""]
        if self.cost:
            lines.append(f"training: {json.dumps(self.cost)}")
        for name, res in self.passkey.items():
            acc = " ".join(f"{n}: {a:.3f}" for n, a in res["per_length"].items())
            line = f"passkey {name}: accuracy {res['accuracy']:.3f} ({acc})"
            if res.get("density") is not None:
                dens = " ".join(f"{n}: {d:.3f}" for n, d in (res.get("density_per_length") or {}).items())
                line += f"; density {res['density']:.3f} ({dens})"
            if res.get("vs_dense"):
                v = res["vs_dense"]
                line += f"; vs dense: lost {v['lost']}, gained {v['gained']} of {v['n']} (sign test p={v['p_value']:.3g})"
            lines.append(line)
        return "\n".join(lines)

    def save(self, complete=False):
        from seer_attn.training.results import write_envelope

        from .baselines import sort_rows
        args = self.args
        passkey = {k: {**v, "samples": [{kk: vv for kk, vv in r.items() if kk != "prompt"}  # prompts: MBs
                                        for r in v.get("samples", ())]} for k, v in self.passkey.items()}
        config = ca.config_of(args, passkey_settings=[str(s) for s in args.passkey_settings])
        write_envelope(os.path.join(args.out, "quality.json"), "quality", sort_rows(self.rows), config=config,
                       model=args.model or ca.DEFAULT_MODEL_LABEL, device="cpu" if args.cpu else "cuda",
                       complete=complete, cost=self.cost, passkey=passkey)
        status = "" if complete else "**partial run: not every phase finished**\n\n"
        _atomic_write(os.path.join(args.out, "quality.md"), status + self.text() + "\n")


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _distill(args, work, report):
    from seer_attn.training.distill import add_distill_args, run_distill
    d = add_distill_args(argparse.ArgumentParser()).parse_args([])
    d.model, d.data, d.seq_len, d.steps, d.batch_size = args.model, args.train, args.seq_len, args.steps, \
        args.batch_size
    d.output, d.bf16, d.save_steps, d.logging_steps = work, not args.cpu, args.steps, 25
    d.cpu, d.distill_target, d.no_progress = args.cpu, args.distill_target, args.no_progress
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    dist = run_distill(d)
    train_s = time.time() - t0
    report.cost = {"train_seconds": train_s, "steps": args.steps, "seq_len": args.seq_len,
                   "steps_per_s": args.steps / train_s,
                   "peak_gib": None if args.cpu else torch.cuda.max_memory_allocated() / 2**30,
                   "final_loss": dist.get("final_loss"), "distill_target": args.distill_target}
    report.save()
    print("cost", json.dumps(report.cost), flush=True)
    return dist


def _ppl(model, windows, args, report):
    from .baselines import Setting, compare, gate_densities
    gate = [Setting("gate", "threshold", param=t) for t in args.thresholds]
    gate += [Setting("gate", "nz_ratio", param=r) for r in args.nz_ratios]
    report.rows += compare(model, [Setting("dense")] + gate, windows=windows, with_baselines=False,
                           progress=not args.no_progress)
    report.save()
    dens = gate_densities(report.rows)
    report.rows += compare(model, [Setting("streaming", "nz_ratio", target_density=x) for x in dens],
                           windows=windows, with_baselines=False, tol=0.01, progress=not args.no_progress)
    report.save()


def _baselines(model, windows, args, report):
    from .baselines import BASELINES, Setting, compare, gate_densities
    dens = args.baseline_densities
    if dens is None:
        dens = gate_densities(report.rows, method="nz_ratio")
    if not dens:
        raise SystemExit("the baselines phase needs --baseline-densities (or the ppl phase before it)")
    done = {r["setting"] for r in report.rows}
    for t in dens:
        todo = [Setting(sel, m, target_density=t) for sel, m in BASELINES]
        todo = [s for s in todo if str(s) not in done]
        report.rows += compare(model, todo, windows=windows, with_baselines=False, tol=0.01,
                               progress=not args.no_progress)
        report.save()


def _passkey(model, tok, args, report):
    from .baselines import Setting, apply_setting
    from .passkey import paired_passkey, run_passkey
    if not args.passkey_lengths:
        return
    thrs = args.passkey_threshold
    if thrs is None and args.passkey_settings:
        thrs = []  # only the named settings
    elif thrs is None:
        cand = [r for r in report.rows if r["selector"] == "gate" and r["method"] == "threshold" and r.get("density")]
        if not cand:
            raise SystemExit("the passkey phase needs --passkey-threshold (or the ppl phase before it)")
        thrs = [min(cand, key=lambda r: abs(r["density"] - 0.15))["param"]]
    model.set_seer_mode("dense")
    report.passkey["dense"] = run_passkey(model, tok, args.passkey_lengths, samples_per_cell=args.passkey_samples,
                                           progress=not args.no_progress)
    report.save()
    sink = ("_keep_sink" if args.keep_sink else "") + (f"_keep_local_{args.keep_local}" if args.keep_local else "")
    runs = [(f"seer_threshold_{thr:g}", Setting("gate", "threshold", param=thr)) for thr in thrs]
    runs += [(str(st), st) for st in args.passkey_settings]
    for name, setting in runs:
        for rows in args.passkey_dense_last_rows:
            apply_setting(model, setting)
            model.set_seer_mode("sparse", seer_dense_last_rows=rows, seer_keep_sink=args.keep_sink,
                                seer_keep_local=args.keep_local)
            res = run_passkey(model, tok, args.passkey_lengths, samples_per_cell=args.passkey_samples,
                              progress=not args.no_progress)
            res["vs_dense"] = paired_passkey(report.passkey["dense"], res)
            report.passkey[f"{name}_dense_last_rows_{rows}{sink}"] = res
            report.save()

if __name__ == "__main__":
    main()
