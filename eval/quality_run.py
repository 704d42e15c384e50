"""One GPU run for the quality numbers: distill a model's gates, then the docs/design.md §4
perplexity protocol for the gate (threshold and nz_ratio) beside dense and every baseline
at the same densities, and passkey retrieval dense vs sparse.

    python -m seer_attn.eval.quality_run --model smollm2.gguf --train corpora/train.jsonl \\
        --eval corpora/eval.jsonl --out seer_outputs/quality

or from Python, ``run_quality(QualityRunConfig(model=..., train=(...,), eval=..., out=...))``.

The work runs in phases (``--phases``, in this order): ``distill`` (skipped when
``--gates`` gives distilled gates; ``--retrieval-mix`` / ``--peak-weight`` as in ``seer-attn
distill``), ``ppl`` (dense, the gate at each threshold and nz_ratio, the density knob at each
``--densities`` value beside the threshold at the knob's own achieved density
(:func:`density_knob_rows`), streaming at each gate density), ``baselines`` (oracle max / mass, mean-pooled
top-k and oracle coverage at ``--baseline-densities``, default: the nz_ratio rows'
densities) and ``passkey`` (dense, then the gate at each ``--passkey-threshold`` and each
``--passkey-settings`` selection such as ``oracle_max:nz_ratio=0.1``, each paired prompt by
prompt against dense: lost, gained and a sign-test p-value; ``--passkey-samples`` prompts per
length and depth). ``--keep-sink`` / ``--keep-local N`` apply to every sparse selection, the
gate's and the baselines' alike. ``quality.json`` (a results envelope of kind
``"quality"``, :mod:`seer_attn.training.results`: provenance, the :class:`QualityRunConfig`
as ``config``, the perplexity rows, plus ``cost`` and ``passkey``) and ``quality.md`` in
``--out`` are rewritten after every phase and every baseline density, with ``complete:
false`` until the last phase has finished, so a run stopped by a time limit keeps what it
measured and says it is partial. The distilled gates are saved to ``--out`` in bfloat16 (a
few MB); the full model folder and checkpoints go to
``--work``. The table is printed last.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from seer_attn.training import cli_args as ca
from seer_attn.training.distill import DistillConfig, run_distill
from seer_attn.training.retrieval_data import RETRIEVAL_KINDS
from seer_attn.training.results import write_envelope
from seer_attn.training.run_config import ConfigError, RunConfig, config_from_args, default, flag, option, text

from .baselines import compare
from .calibration import calibrate, exact_gate_scores, gate_params_for, pick_calibration_windows
from .passkey import paired_passkey, run_passkey
from .settings import BASELINES, Setting, apply_setting, setting_arg, setting_text
from .tables import format_table, gate_densities, sort_rows

THRESHOLDS = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)
NZ_RATIOS = (0.1, 0.2, 0.3)
PHASES = ("distill", "ppl", "baselines", "passkey")
DEFAULT_OUTPUT = "seer_outputs/quality"
_share = ca.float_in(0, 1, low_open=False)
_nonneg_float = ca.float_in(0, None, low_open=False)


@dataclass(frozen=True, kw_only=True)
class QualityRunConfig(RunConfig):
    """One quality run (each field is the option of the same name, see :func:`quality_parser`)."""

    model: str | None = option(None, text)  # None: the embedded SmolLM2 GGUF
    gates: str | None = option(None, text)  # distilled gates: no distill phase
    train: tuple | None = option(None, text, many="+")  # None: the bundled training corpus
    eval: str | None = option(None, text)  # None: the bundled eval corpus
    seq_len: int = option(8192, ca.int_at_least(2))
    eval_length: int = option(8192, ca.int_at_least(2))
    steps: int = option(400, ca.positive_int)
    batch_size: int = option(1, ca.positive_int)
    thresholds: tuple = option(THRESHOLDS, ca.open_unit_interval, many="+")
    nz_ratios: tuple = option(NZ_RATIOS, ca.unit_interval, many="+")
    densities: tuple = option((), ca.unit_interval, many="*")
    baseline_densities: tuple | None = option(None, ca.unit_interval, many="*")
    distill_target: str = option("max", choices=("max", "mass"))
    retrieval_mix: float = option(0.0, _share)
    retrieval_kinds: tuple = option(RETRIEVAL_KINDS, many="+", choices=RETRIEVAL_KINDS)
    peak_weight: float = option(0.0, _nonneg_float)
    phases: tuple = option(PHASES, many="+", choices=PHASES)
    passkey_lengths: tuple = option((2048, 4096, 8192), ca.positive_int, many="*")
    passkey_samples: int = option(1, ca.positive_int)
    passkey_threshold: tuple | None = option(None, ca.open_unit_interval, many="+")
    passkey_settings: tuple = option((), setting_text, many="*")
    keep_sink: bool = option(False, flag)
    passkey_dense_last_rows: tuple = option((0, 2), ca.nonneg_int, many="+")
    out: str = option(DEFAULT_OUTPUT, text)
    work: str | None = option(None, text)  # None: OUT/work
    keep_local: int = option(0, ca.nonneg_int)
    no_progress: bool = option(False, flag)
    cpu: bool = option(False, flag)

    def check(self):
        for spec in self.passkey_settings:
            st = Setting.parse(spec)
            if st.selector == "dense" or st.param is None:
                raise ConfigError("{passkey_settings}: %s: give a sparse SELECTOR:METHOD=PARAM (dense always runs; "
                                  "'@DENSITY' calibration is for perplexity)" % st, "passkey_settings")
        if ("passkey" in self.phases and self.passkey_lengths and self.passkey_threshold is None
                and not self.passkey_settings and "ppl" not in self.phases):
            raise ConfigError("the passkey phase needs {passkey_threshold} or {passkey_settings} (or the ppl phase "
                              "before it, to pick the threshold closest to density 0.15)",
                              "passkey_threshold", "passkey_settings")
        if "distill" in self.phases and self.gates:
            raise ConfigError("{gates} skips distillation: drop 'distill' from {phases} or drop {gates}",
                              "gates", "phases")
        if "distill" not in self.phases and not self.gates:
            raise ConfigError("without the distill phase, {gates} must name distilled gates", "gates")
        if "distill" in self.phases:
            self.distill_config()  # its own checks (e.g. seq_len long enough to distil) before anything runs

    @property
    def work_dir(self) -> str:
        """The distillation's model folder and checkpoints (``work``, default ``OUT/work``)."""
        return self.work or os.path.join(self.out, "work")

    def distill_config(self) -> DistillConfig:
        """The distill phase's :class:`~seer_attn.training.distill.DistillConfig`."""
        return DistillConfig(model=self.model, data=self.train, seq_len=self.seq_len, steps=self.steps,
                             batch_size=self.batch_size, output=self.work_dir, bf16=not self.cpu,
                             save_steps=self.steps, logging_steps=25, cpu=self.cpu,
                             distill_target=self.distill_target, no_progress=self.no_progress,
                             retrieval_mix=self.retrieval_mix, retrieval_kinds=self.retrieval_kinds,
                             peak_weight=self.peak_weight)


def _default(name):
    return default(QualityRunConfig, name)


def quality_parser() -> argparse.ArgumentParser:
    """The command line (defaults: :class:`QualityRunConfig`'s)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--gates", default=None, help="distilled gates (skips the distill phase)")
    ap.add_argument("--train", nargs="+", default=None, help="training files (default: bundled corpus)")
    ap.add_argument("--eval", default=None, help="evaluation jsonl (default: bundled eval corpus)")
    ap.add_argument("--seq-len", type=ca.int_at_least(2), default=_default("seq_len"))
    ap.add_argument("--eval-length", type=ca.int_at_least(2), default=_default("eval_length"))
    ap.add_argument("--steps", type=ca.positive_int, default=_default("steps"))
    ap.add_argument("--batch-size", type=ca.positive_int, default=_default("batch_size"))
    ap.add_argument("--thresholds", type=ca.open_unit_interval, nargs="+", default=_default("thresholds"))
    ap.add_argument("--nz-ratios", type=ca.unit_interval, nargs="+", default=_default("nz_ratios"))
    ap.add_argument("--densities", type=ca.unit_interval, nargs="*", default=_default("densities"),
                    help="density-knob values (gate:density=RHO) for the ppl phase, each beside the threshold solved "
                         "to the same density and the knob again at the threshold's achieved density")
    ap.add_argument("--baseline-densities", type=ca.unit_interval, nargs="*", default=None,
                    help="densities for the oracle and mean-pool baselines (default: those of the nz_ratio rows)")
    ap.add_argument("--distill-target", choices=("max", "mass"), default=_default("distill_target"))
    ap.add_argument("--retrieval-mix", type=_share, default=_default("retrieval_mix"),
                    help="distill phase: share of sequences rewritten with retrieval structure (seer-attn distill)")
    ap.add_argument("--retrieval-kinds", nargs="+", choices=RETRIEVAL_KINDS, default=_default("retrieval_kinds"),
                    help="distill phase: kinds of retrieval sequences (default: all)")
    ap.add_argument("--peak-weight", type=_nonneg_float, default=_default("peak_weight"),
                    help="distill phase: seer_distill_peak_weight, extra KL weight of rows with a peaked true map")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=_default("phases"))
    ap.add_argument("--passkey-lengths", type=ca.positive_int, nargs="*", default=_default("passkey_lengths"))
    ap.add_argument("--passkey-samples", type=ca.positive_int, default=_default("passkey_samples"),
                    help="prompts per (length, depth) cell, each with its own random key (default %(default)s)")
    ap.add_argument("--passkey-threshold", type=ca.open_unit_interval, nargs="+", default=None,
                    help="gate thresholds for passkey (default: none if --passkey-settings is given, else the one "
                         "whose density in the ppl phase is closest to 0.15)")
    ap.add_argument("--passkey-settings", nargs="+", default=_default("passkey_settings"),
                    metavar="SELECTOR:METHOD=PARAM", type=setting_arg,
                    help="more sparse passkey runs besides the gate thresholds, e.g. gate:nz_ratio=0.15 "
                         "oracle_max:nz_ratio=0.15 streaming:nz_ratio=0.2 (fixed parameters only)")
    ap.add_argument("--keep-sink", action="store_true",
                    help="keep the first (sink) block in every sparse row, for every selection (seer_keep_sink)")
    ap.add_argument("--passkey-dense-last-rows", type=ca.nonneg_int, nargs="+",
                    default=_default("passkey_dense_last_rows"),
                    help="seer_dense_last_rows values for the sparse passkey runs (0: the question's rows sparse "
                         "too; 2: the model default, last two block rows dense)")
    ap.add_argument("--out", default=_default("out"), help="output folder (default: %(default)s)")
    ap.add_argument("--work", default=None, help="model folder and checkpoints (default: OUT/work)")
    ap.add_argument("--keep-local", type=ca.nonneg_int, default=_default("keep_local"),
                    help="keep this many blocks before the diagonal in every sparse row, for every selection "
                         "(seer_keep_local)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (short logs)")
    ap.add_argument("--cpu", action="store_true", help="smoke-test on the CPU (tiny sizes only)")
    return ap


def main(argv=None):
    ap = quality_parser()
    config = config_from_args(QualityRunConfig, ap.parse_args(argv), parser=ap)
    if not config.cpu:
        ca.require_cuda(ap.prog, " (or pass --cpu for a smoke test)")
    return run_quality(config)


def run_quality(config: QualityRunConfig) -> dict:
    """Run every phase ``config`` names (module docstring); needs a CUDA GPU unless
    ``config.cpu``. Returns the envelope last written to ``quality.json``."""
    if not isinstance(config, QualityRunConfig):
        raise TypeError(f"run_quality takes a QualityRunConfig, got {type(config).__name__}")
    if not config.cpu and not torch.cuda.is_available():
        raise ValueError("cpu=False needs a CUDA GPU, and torch sees none (cpu=True runs a smoke test)")
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    if config.no_progress:  # transformers' own bars too (loading weights, writing shards)
        hf_logging.disable_progress_bar()
    try:
        return _run(config)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(config):
    dev, dtype = ("cpu", torch.float32) if config.cpu else ("cuda", torch.bfloat16)

    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from .perplexity import load_documents, make_windows

    os.makedirs(config.out, exist_ok=True)
    report = Report(config)

    if "distill" in config.phases:
        dist = _distill(config, report)
        model = load_seer_model(dist["model_dir"], dtype=dtype, device=dev)
        # bf16: half the size (SmolLM2's float32 gates are 17.7 MB); the float32 ones stay in --work
        model.save_gates(os.path.join(config.out, f"gates_{config.distill_target}_bf16.safetensors"),
                         dtype=torch.bfloat16)
    else:
        model = load_seer_model(config.model, dtype=dtype, device=dev, gates=config.gates)
    tok = load_tokenizer(config.model)
    windows = make_windows(load_documents(config.eval), tok, config.eval_length, 2)
    model.set_seer_mode("sparse", seer_dense_last_rows=0, seer_keep_diagonal=True, seer_keep_sink=config.keep_sink,
                         seer_keep_local=config.keep_local)

    if "ppl" in config.phases:
        _ppl(model, windows, config, report)
    if "baselines" in config.phases:
        _baselines(model, windows, config, report)
    if "passkey" in config.phases:
        _passkey(model, tok, config, report)
    env = report.save(complete=True)
    print("\n" + report.text())
    return env


class Report:
    """Everything measured so far, rewritten to ``quality.json`` / ``quality.md`` on each save."""

    def __init__(self, config):
        self.config, self.rows, self.cost, self.passkey = config, [], None, {}

    def text(self):
        lines = [format_table(sort_rows(self.rows)) if self.rows else "(no perplexity rows)", ""]
        for r in self.rows:
            if r.get("matched_to"):
                thr = next(t for t in self.rows if t["setting"] == r["matched_to"])
                lines.append(f"density knob vs {r['matched_to']} at density {thr['density']:.4f}: PPL "
                             f"{r['ppl']:.3f} vs {thr['ppl']:.3f} ({100 * (r['ppl_ratio'] - 1):+.2f}%)")
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

    def save(self, complete=False) -> dict:
        config = self.config
        passkey = {k: {**v, "samples": [{kk: vv for kk, vv in r.items() if kk != "prompt"}  # prompts: MBs
                                        for r in v.get("samples", ())]} for k, v in self.passkey.items()}
        env = write_envelope(os.path.join(config.out, "quality.json"), "quality", sort_rows(self.rows),
                             config=asdict(config), model=config.model or ca.DEFAULT_MODEL_LABEL,
                             device="cpu" if config.cpu else "cuda", complete=complete, cost=self.cost,
                             passkey=passkey)
        status = "" if complete else "**partial run: not every phase finished**\n\n"
        _atomic_write(os.path.join(config.out, "quality.md"), status + self.text() + "\n")
        return env


def _atomic_write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _distill(config, report):
    if not config.cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    dist = run_distill(config.distill_config())
    train_s = time.time() - t0
    report.cost = {"train_seconds": train_s, "steps": config.steps, "seq_len": config.seq_len,
                   "steps_per_s": config.steps / train_s,
                   "peak_gib": None if config.cpu else torch.cuda.max_memory_allocated() / 2**30,
                   "final_loss": dist.get("final_loss"), "distill_target": config.distill_target}
    report.save()
    print("cost", json.dumps(report.cost), flush=True)
    return dist


def _ppl(model, windows, config, report):
    gate = [Setting("gate", "threshold", param=t) for t in config.thresholds]
    gate += [Setting("gate", "nz_ratio", param=r) for r in config.nz_ratios]
    report.rows += compare(model, [Setting("dense")] + gate, windows=windows, with_baselines=False,
                           progress=not config.no_progress)
    report.save()
    if config.densities:
        report.rows += density_knob_rows(model, windows, config.densities, progress=not config.no_progress)
        report.save()
    dens = gate_densities(report.rows)
    report.rows += compare(model, [Setting("streaming", "nz_ratio", target_density=x) for x in dens],
                           windows=windows, with_baselines=False, tol=0.01, progress=not config.no_progress)
    report.save()


#: gate methods that can serve as the density knob besides the threshold (``density_knob_rows``' ``rules``)
KNOB_RULES = ("coverage", "gain")


def density_knob_rows(model, windows, densities, *, calib=None, calib_windows=4, rules=(),
                      progress=False) -> list:
    """The density knob against the threshold at the same achieved density.

    For each ``rho`` of ``densities``, three perplexity rows on ``windows``: the knob
    (``gate:density=rho``); the threshold solved to keep ``rho`` on ``calib_windows`` windows
    (:func:`~seer_attn.eval.calibration.gate_params_for`, one exact pass shared with the coverage
    rows), which lands near ``rho``; and the knob at that threshold's achieved density, marked ``matched_to`` (the
    threshold's setting) with ``ppl_ratio`` (its PPL over the threshold's). The knob keeps what
    it is asked to the block, so the last two rows compare the two at one density. Each row
    records ``knob_density``: its ``rho``.

    ``calib``: windows to solve the thresholds on instead, e.g. held out from ``windows``:
    then the threshold row is the *calibrated* knob a user gets (a threshold that keeps
    ``rho`` on average over text like the calibration sample) and its achieved density on
    ``windows`` says how well that promise holds. The threshold rows record ``calibrated_on``
    (``"held-out"`` or ``"evaluated"``: some of ``windows`` themselves).

    ``rules``: other gate methods that can serve as the knob (``"coverage"``: a calibrated knob
    that spends the budget where the gate is unsure, broad rows and layers get more blocks;
    ``"gain"``: the most log-mass for the blocks kept). Two more rows per rule and ``rho``: the
    rule solved on the same calibration windows, and the rule bisected over sparse forwards on
    ``windows`` to the threshold row's achieved density, marked ``<rule>_matched_to`` with
    ``ppl_ratio`` (its PPL over the threshold's) and ``density_error`` (what the bisection left)."""
    targets = [float(d) for d in densities]
    bad = [r for r in rules if r not in KNOB_RULES]
    if bad:
        raise ValueError(f"rules={bad} are invalid: expected methods from {KNOB_RULES}")
    held_out = calib is not None
    calib = pick_calibration_windows(calib if held_out else windows, calib_windows)
    scores = exact_gate_scores(model, calib)  # one exact pass serves every method
    thresholds = gate_params_for(model, calib, targets, method="threshold", scores=scores)
    solved = {m: gate_params_for(model, calib, targets, method=m, scores=scores) for m in rules}

    def row(setting):
        return compare(model, [setting], windows=windows, with_baselines=False, progress=progress)[0]

    rows = []
    for i, (rho, tau) in enumerate(zip(targets, thresholds)):
        knob, thr = row(Setting("gate", "density", param=rho)), row(Setting("gate", "threshold", param=tau))
        thr["calibrated_on"] = "held-out" if held_out else "evaluated"
        matched = row(Setting("gate", "density", param=thr["density"]))
        matched.update(matched_to=thr["setting"], ppl_ratio=matched["ppl"] / thr["ppl"])
        new = [knob, thr, matched]
        for m in rules:
            cal = row(Setting("gate", m, param=solved[m][i]))
            cal["calibrated_on"] = thr["calibrated_on"]
            fit = calibrate(model, m, thr["density"], windows, tol=1e-3, strict=False)
            same = row(Setting("gate", m, param=fit.param))
            same.update({f"{m}_matched_to": thr["setting"], "ppl_ratio": same["ppl"] / thr["ppl"],
                         "density_error": same["density"] - thr["density"]})
            new += [cal, same]
        for r in new:
            r["knob_density"] = rho
        rows += new
    return rows


def _baselines(model, windows, config, report):
    dens = config.baseline_densities
    if dens is None:
        dens = gate_densities(report.rows, method="nz_ratio")
    if not dens:
        raise SystemExit("the baselines phase needs --baseline-densities (or the ppl phase before it)")
    done = {r["setting"] for r in report.rows}
    for t in dens:
        todo = [Setting(sel, m, target_density=t) for sel, m in BASELINES]
        todo = [s for s in todo if str(s) not in done]
        report.rows += compare(model, todo, windows=windows, with_baselines=False, tol=0.01,
                               progress=not config.no_progress)
        report.save()


def _passkey(model, tok, config, report):
    if not config.passkey_lengths:
        return
    thrs = config.passkey_threshold
    if thrs is None and config.passkey_settings:
        thrs = []  # only the named settings
    elif thrs is None:
        cand = [r for r in report.rows if r["selector"] == "gate" and r["method"] == "threshold" and r.get("density")]
        if not cand:
            raise SystemExit("the passkey phase needs --passkey-threshold (or the ppl phase before it)")
        thrs = [min(cand, key=lambda r: abs(r["density"] - 0.15))["param"]]
    model.set_seer_mode("dense")
    report.passkey["dense"] = run_passkey(model, tok, config.passkey_lengths, samples_per_cell=config.passkey_samples,
                                           progress=not config.no_progress)
    report.save()
    sink = ("_keep_sink" if config.keep_sink else "") + \
        (f"_keep_local_{config.keep_local}" if config.keep_local else "")
    runs = [(f"seer_threshold_{thr:g}", Setting("gate", "threshold", param=thr)) for thr in thrs]
    runs += [(st, Setting.parse(st)) for st in config.passkey_settings]
    for name, setting in runs:
        for rows in config.passkey_dense_last_rows:
            apply_setting(model, setting)
            model.set_seer_mode("sparse", seer_dense_last_rows=rows, seer_keep_sink=config.keep_sink,
                                seer_keep_local=config.keep_local)
            res = run_passkey(model, tok, config.passkey_lengths, samples_per_cell=config.passkey_samples,
                              progress=not config.no_progress)
            res["vs_dense"] = paired_passkey(report.passkey["dense"], res)
            report.passkey[f"{name}_dense_last_rows_{rows}{sink}"] = res
            report.save()


if __name__ == "__main__":
    main()
