"""``seer-attn eval``: lm-eval-harness on a SeerLlama model, one run per block selection.

    seer-attn eval --model DIR_OR_HUB_ID_OR_GGUF --tasks seer_ppl,seer_passkey --max-length 8192 \\
        --seer-mode sparse --selector gate --method threshold --param 2e-3 1e-3 --output results/eval

For each setting (``--settings``, or the cross product of ``--selector``/``--method`` with
``--param`` values or calibrated ``--density`` targets; default: the model as loaded) the
model is switched with ``model.set_seer_mode`` and ``lm_eval.simple_evaluate`` runs on an
``HFLM`` wrapping the loaded model, always with ``max_length`` set (HFLM otherwise falls back
to the config's ``max_position_embeddings``), with this package's task folder
(``seer_attn/eval/tasks``: ``seer_ppl``, ``seer_ppl_pg19``, ``seer_ppl_proofpile``,
``seer_passkey``) on the include path next to lm-eval's own tasks (``longbench_*`` ...).

Written to ``--output``: ``results.json`` (a results envelope of kind ``"lm_eval"``,
:mod:`seer_attn.training.results`: provenance, the run's ``config`` and one row per setting
with its seer config, calibration, achieved density and the lm-eval results),
``results.md`` (a table), ``tokenizer/`` (the tokenizer the tasks counted tokens with) and,
with several settings and matplotlib installed, ``ppl_vs_density.png``.
"""
import argparse
import json
import os
import sys

import torch

from seer_attn.modeling_seer.selection import SELECTORS, SPARSITY_METHODS
from seer_attn.training.results import envelope, write_json

from seer_attn.training import cli_args as ca

from .baselines import (Setting, _check_param, apply_setting, calibrate, pick_calibration_windows, setting_arg,
                        plot_ppl_vs_density, preserved_seer_mode)
from .perplexity import (DensityMeter, default_corpus_path, load_documents, make_windows, model_device,
                         seer_settings)

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
DEFAULT_TASKS = "seer_ppl"
MAX_LENGTH = ca.int_at_least(2)  # HFLM's rolling windows need a context token and a target
_PPL_METRICS = ("token_perplexity", "word_perplexity")


class _MethodParam(argparse.Action):
    """``--method`` / ``--param``: the parameter's range depends on the method (a threshold
    is below 1, an nz_ratio or coverage may be 1), checked whichever option comes first."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        method = getattr(namespace, "method", None)
        for p in (getattr(namespace, "param", None) or ()) if method else ():
            try:
                _check_param(method, p, "--param")
            except ValueError as err:
                raise argparse.ArgumentError(None, str(err)) from None


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``seer-attn eval`` (see the module docstring); out-of-range values are
    argparse errors (:mod:`seer_attn.training.cli_args`)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="SeerLlama or Llama folder / Hub id, or a .gguf file (default: the embedded SmolLM2-135M)")
    g.add_argument("--gates", default=None, help="gates file, folder or Hub id to load into the model")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder / Hub id (default: the model's)")
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="base weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g = parser.add_argument_group("lm-eval")
    g.add_argument("--tasks", default=DEFAULT_TASKS, type=ca.task_list,
                   help="comma-separated lm-eval task names: seer_ppl, seer_ppl_pg19, seer_ppl_proofpile, "
                        "seer_passkey, or any lm-eval task such as longbench_passage_retrieval_en")
    g.add_argument("--max-length", type=MAX_LENGTH, required=True,
                   help="HFLM max_length: rolling-window length for perplexity, left-truncation length for prompts")
    g.add_argument("--batch-size", type=ca.positive_int, default=1,
                   help="HFLM batch size; keep 1 for sparse runs (HFLM right-pads loglikelihood batches "
                        "without a mask, and padding changes the pooled block scores)")
    g.add_argument("--limit", type=ca.positive_float, default=None, help="documents per task (testing only)")
    g.add_argument("--metadata", default=None, type=ca.json_object,
                   help="JSON object of extra task metadata, e.g. '{\"passkey_lengths\": [2048, 4096]}'")
    g.add_argument("--corpus", default=None,
                   help="jsonl corpus for seer_ppl and for density calibration (default: the bundled eval corpus)")
    g.add_argument("--bootstrap-iters", type=ca.nonneg_int, default=0, help="lm-eval stderr bootstrap iterations")
    g.add_argument("--log-samples", action="store_true", help="also write every sample to samples_<run>.json")
    g = parser.add_argument_group("block selection")
    g.add_argument("--seer-mode", default=None, choices=["dense", "sparse"],
                   help="default: the model's configured mode")
    g.add_argument("--selector", default=None, choices=list(SELECTORS), help="a registered block selector")
    g.add_argument("--method", default=None, choices=list(SPARSITY_METHODS), action=_MethodParam)
    g.add_argument("--param", type=ca.unit_interval, nargs="+", default=None, action=_MethodParam,
                   help="threshold / nz_ratio / coverage value(s); several values give several runs")
    g.add_argument("--density", type=ca.unit_interval, nargs="+", default=None,
                   help="target densities: calibrate the method's parameter to each (instead of --param)")
    g.add_argument("--settings", nargs="+", default=None, type=setting_arg,
                   help="explicit settings, e.g. dense gate:threshold=2e-3 streaming:nz_ratio@0.21 "
                        "(overrides --seer-mode/--selector/--method/--param/--density)")
    g.add_argument("--calib-windows", type=ca.positive_int, default=4,
                   help="corpus windows used to calibrate --density")
    g.add_argument("--calib-tol", type=ca.open_unit_interval, default=0.01,
                   help="accepted density error of the calibration")
    parser.add_argument("--output", required=True, help="output folder")
    return parser


# ----------------------------------------------------------------------------- settings

def settings_from_args(args, model) -> list:
    """The list of :class:`Setting` an eval run covers (see the module docstring)."""
    if args.settings:
        return [Setting.parse(s) for s in args.settings]
    if args.param and args.density:
        raise ValueError("give either --param or --density, not both")
    cfg = model.config
    mode = args.seer_mode or cfg.seer_mode
    if mode == "dense":
        extra = [n for n in ("selector", "method", "param", "density") if getattr(args, n) is not None]
        if extra:
            raise ValueError(f"--{'/--'.join(extra)} given with dense mode; add --seer-mode sparse")
        return [Setting("dense")]
    if mode != "sparse":
        raise ValueError(f"seer mode {mode!r} cannot be evaluated: expected dense or sparse (distill is for training)")
    selector = args.selector or cfg.seer_selector
    method = args.method or cfg.seer_sparsity_method
    if args.density:
        return [Setting(selector, method, target_density=d) for d in args.density]
    params = args.param or [getattr(cfg, {"threshold": "seer_threshold", "nz_ratio": "seer_nz_ratio",
                                          "coverage": "seer_coverage"}[method])]
    return [Setting(selector, method, param=p) for p in params]


def _metadata(args, tokenizer_dir):
    meta = dict(ca.json_object(args.metadata)) if args.metadata else {}
    meta.setdefault("tokenizer", tokenizer_dir)
    meta["max_length"] = args.max_length
    if args.corpus:
        meta.setdefault("corpus", os.path.abspath(args.corpus))
    return meta


def _main_metrics(results) -> dict:
    """``{task: {metric: value}}`` without stderr, filter suffix or per-depth passkey cells."""
    out = {}
    for task, res in results.items():
        for key, val in res.items():
            if "," not in key or "_stderr" in key or "_depth" in key or not isinstance(val, (int, float)):
                continue
            out.setdefault(task, {})[key.split(",")[0]] = val
    return out


def format_results_table(runs) -> str:
    """Markdown table: one row per setting, its density (overall, then per task when there are
    several), then every main metric of every task."""
    cols = []
    for run in runs:
        for task, metrics in run["metrics"].items():
            for m in metrics:
                if (task, m) not in cols:
                    cols.append((task, m))
    dens_cols = list(dict.fromkeys(t for run in runs for t in run.get("task_density", {})))
    if len(dens_cols) < 2:
        dens_cols = []  # one task: its density is the overall one
    head = ["setting", "density"] + [f"density {t}" for t in dens_cols] + [f"{t} {m}" for t, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def dens(run, d):
        return "1.000" if run["setting"] == "dense" else ("—" if d is None else f"{d:.3f}")

    for run in runs:
        cells = [run["setting"], dens(run, run["density"])]
        cells += [dens(run, run.get("task_density", {}).get(t)) for t in dens_cols]
        cells += [f"{run['metrics'].get(t, {}).get(m):.4g}" if run["metrics"].get(t, {}).get(m) is not None else "—"
                  for t, m in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run

def _load(args):
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if str(device).startswith("cuda")
                                                           else torch.float32)
    model = load_seer_model(args.model, dtype=dtype, device=device, gates=args.gates)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    return model.eval(), tokenizer, str(dtype).replace("torch.", "")


def run_eval(args) -> dict:
    """Run ``seer-attn eval``: ``args`` parsed by :func:`add_eval_args`, or a dict of its
    options (``max_length`` and ``output`` required; checked as the command line checks them).
    Returns the envelope written to results.json, with ``table`` and ``plot`` added."""
    if isinstance(args, dict):
        args = ca.namespace_from_dict(add_eval_args(argparse.ArgumentParser()), args)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = ca.task_list(args.tasks)
    os.makedirs(args.output, exist_ok=True)
    model, tokenizer, dtype = _load(args)
    settings = settings_from_args(args, model)
    tok_dir = os.path.abspath(os.path.join(args.output, "tokenizer"))
    tokenizer.save_pretrained(tok_dir)  # the tasks count tokens with exactly this tokenizer
    metadata = _metadata(args, tok_dir)
    from_hub_or_dir = isinstance(args.model, str) and not args.model.endswith(".gguf")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=args.max_length, batch_size=args.batch_size,
              trust_remote_code=from_hub_or_dir)

    calib_windows = None
    if any(s.target_density is not None for s in settings):
        docs = load_documents(args.corpus or default_corpus_path())
        windows = make_windows(docs, tokenizer, args.max_length)
        if not windows:
            raise ValueError(f"no calibration window: no corpus document has {args.max_length} tokens")
        calib_windows = pick_calibration_windows(windows, args.calib_windows)

    runs = []
    # calibrate every density target first, so that an unreachable one fails before any lm-eval run
    calibs = [None if s.target_density is None else
              calibrate(model, s.method, s.target_density, calib_windows, selector=s.selector, tol=args.calib_tol,
                        progress=True)
              for s in settings]
    task_manager = TaskManager(include_path=TASKS_DIR, metadata=metadata)
    with preserved_seer_mode(model):
        for i, (setting, calib) in enumerate(zip(settings, calibs)):
            apply_setting(model, setting, param=calib.param if calib else None)
            print(f"[seer-attn eval] run {i + 1}/{len(settings)}: {setting}", file=sys.stderr)
            run = {"setting": str(setting), "seer": seer_settings(model),
                   "calibration": None if calib is None else {
                       "target_density": calib.target_density, "param": calib.param, "density": calib.density,
                       "tol": calib.tol, "windows": len(calib_windows)},
                   "density": None, "task_density": {}, "prefills": 0, "metrics": {},
                   "lm_eval": {k: {} for k in ("results", "groups", "versions", "n-shot", "higher_is_better",
                                               "n-samples")}}
            samples, all_densities = {}, []
            for task in tasks:  # one lm-eval call per requested task: the density of each is its own
                with DensityMeter(model) as meter:
                    res = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=args.limit,
                                          bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples)
                run["task_density"][task] = meter.mean
                all_densities += meter.values
                for key, val in run["lm_eval"].items():
                    val.update(res.get(key) or {})
                samples.update(res.get("samples") or {})
            run["density"] = sum(all_densities) / len(all_densities) if all_densities else None
            run["prefills"] = len(all_densities)
            run["metrics"] = _main_metrics(run["lm_eval"]["results"])
            if args.log_samples:
                path = os.path.join(args.output, f"samples_{i}.json")
                with open(path, "w") as f:
                    json.dump(samples, f, default=str)
                run["samples_file"] = os.path.basename(path)
            runs.append(run)

    config = ca.config_of(args, tasks=tasks, dtype=dtype, device=str(model_device(model)), task_metadata=metadata,
                          settings=[str(s) for s in settings])
    out = envelope("lm_eval", runs, config=config, model=args.model or ca.DEFAULT_MODEL_LABEL,
                   device=model_device(model))
    write_json(os.path.join(args.output, "results.json"), out)
    table = format_results_table(out["rows"])
    prov = out["provenance"]
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(f"{prov['model']} · max_length {args.max_length} · {prov['gpu']} · "
                f"commit {(prov['commit'] or 'unknown')[:12]}{' (dirty)' if prov['commit_dirty'] else ''}\n\n")
        f.write(table + "\n")
    print(table)
    out["table"] = table
    out["plot"] = _plot(out["rows"], os.path.join(args.output, "ppl_vs_density.png"), args.max_length)
    return out


def _plot(runs, path, max_length):
    if len(runs) < 2:
        return None
    for task_metric in _PPL_METRICS:
        rows = []
        for run in runs:
            found = [(t, m[task_metric]) for t, m in run["metrics"].items() if task_metric in m]
            if not found:
                continue
            task, val = found[0]
            s = Setting.parse(run["setting"])
            density = run["task_density"].get(task, run["density"])
            rows.append({"selector": s.selector, "method": s.method,
                         "density": 1.0 if s.selector == "dense" else density, "ppl": val})
        if len(rows) >= 2:
            return plot_ppl_vs_density(rows, path, title=f"{task_metric} vs density, {max_length} tokens")
    return None


def main(argv=None):
    parser = add_eval_args(argparse.ArgumentParser(description="lm-eval-harness on a SeerLlama model"))
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    main()
