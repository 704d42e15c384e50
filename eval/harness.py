"""``seer-attn eval``: lm-eval-harness on a SeerLlama model, one run per block selection.

    seer-attn eval --model DIR_OR_HUB_ID_OR_GGUF --tasks seer_ppl,seer_passkey --max-length 8192 \\
        --seer-mode sparse --selector gate --method threshold --param 2e-3 1e-3 --output seer_outputs/eval

A run is configured by an :class:`EvalConfig` (the Python API: ``run_eval(EvalConfig(...))``);
the command line builds one from its options.

For each setting (``--settings``, or the cross product of ``--selector``/``--method`` with
``--param`` values or calibrated ``--density`` targets; default: the model as loaded) the
model is switched with ``model.set_seer_mode`` and ``lm_eval.simple_evaluate`` runs on an
``HFLM`` wrapping the loaded model, always with ``max_length`` set (HFLM otherwise falls back
to the config's ``max_position_embeddings``), with this package's task folder
(``seer_attn/eval/tasks``: ``seer_ppl``, ``seer_ppl_pg19``, ``seer_ppl_proofpile``,
``seer_passkey``) on the include path next to lm-eval's own tasks (``longbench_*`` ...).
``--decode`` (a decode setting, e.g. ``budget=2048,prior=0.7``) runs every setting's
generations with sparse decode on the model's decode gates; each run then records the kept
share of KV blocks over its decode steps (``decode_density``, per task too).

Written to ``--output``: ``results.json`` (a results envelope of kind ``"lm_eval"``,
:mod:`seer_attn.training.results`: provenance, the run's ``config``, ``resolved`` (dtype,
device, task list and metadata, settings) and one row per setting with its seer config,
calibration, achieved density and the lm-eval results),
``results.md`` (a table), ``tokenizer/`` (the tokenizer the tasks counted tokens with) and,
with several settings and matplotlib installed, ``ppl_vs_density.png``.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch

from seer_attn.modeling_seer.selection import SELECTORS, SPARSITY_METHODS
from seer_attn.training import cli_args as ca
from seer_attn.training.results import envelope, write_json
from seer_attn.training.run_config import ConfigError, RunConfig, config_from_args, default, flag, option, text

from .calibration import calibrate, pick_calibration_windows
from .perplexity import (DecodeDensityMeter, DensityMeter, default_corpus_path, load_documents, make_windows,
                         model_device, seer_settings)
from .plots import plot_ppl_vs_density
from .settings import (METHOD_PARAM, Setting, apply_decode, apply_setting, check_param, decode_setting,
                       decode_setting_name, decode_setting_of, decode_setting_text, preserved_seer_mode, setting_arg,
                       setting_text)

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
DEFAULT_TASKS = ("seer_ppl",)
DEFAULT_OUTPUT = "seer_outputs/eval"
DTYPES = ("bfloat16", "float16", "float32")
MAX_LENGTH = ca.int_at_least(2)  # HFLM's rolling windows need a context token and a target
_PPL_METRICS = ("token_perplexity", "word_perplexity")


def _task_name(value):
    tasks = ca.task_list([value]) if isinstance(value, str) else None
    if tasks is None or len(tasks) != 1 or "," in value:
        raise ValueError(f"expected one lm-eval task name, got {value!r}")
    return tasks[0]


def _metadata(value):
    return dict(ca.json_object(value))


@dataclass(frozen=True, kw_only=True)
class EvalConfig(RunConfig):
    """One ``seer-attn eval`` run (each field is the option of the same name, see
    :func:`add_eval_args`): ``max_length`` is required (HFLM must never guess it)."""

    model: str | None = option(None, text)
    gates: str | None = option(None, text)
    tokenizer: str | None = option(None, text)
    dtype: str | None = option(None, choices=DTYPES)
    device: str | None = option(None, text)
    tasks: tuple = option(DEFAULT_TASKS, _task_name, many="+")
    max_length: int = option(check=MAX_LENGTH)
    batch_size: int = option(1, ca.positive_int)
    limit: float | None = option(None, ca.positive_float)
    metadata: dict | None = option(None, _metadata)
    corpus: str | None = option(None, text)
    bootstrap_iters: int = option(0, ca.nonneg_int)
    log_samples: bool = option(False, flag)
    seer_mode: str | None = option(None, choices=("dense", "sparse"))
    selector: str | None = option(None, text)
    method: str | None = option(None, choices=SPARSITY_METHODS)
    param: tuple | None = option(None, ca.unit_interval, many="+")
    density: tuple | None = option(None, ca.unit_interval, many="+")
    settings: tuple | None = option(None, setting_text, many="+")
    calib_windows: int = option(4, ca.positive_int)
    calib_tol: float = option(0.01, ca.open_unit_interval)
    decode: str | None = option(None, decode_setting_text)  # decode of every run (None: the model's as loaded)
    output: str = option(DEFAULT_OUTPUT, text)

    def check(self):
        if self.selector is not None and self.selector not in SELECTORS:
            raise ConfigError.invalid("selector", self.selector, f"expected one of {tuple(SELECTORS)}")
        if self.param and self.density:
            raise ConfigError("give either {param} or {density}, not both", "param", "density")
        for p in (self.param or ()) if self.method else ():
            try:
                check_param(self.method, p, "{param}")
            except ValueError as err:  # its message names "{param}": the field, or --param
                raise ConfigError(str(err), "param") from None


class _MethodParam(argparse.Action):
    """``--method`` / ``--param``: the parameter's range depends on the method (a threshold
    is below 1, an nz_ratio or coverage may be 1), checked whichever option comes first."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        method = getattr(namespace, "method", None)
        for p in (getattr(namespace, "param", None) or ()) if method else ():
            try:
                check_param(method, p, "--param")
            except ValueError as err:
                raise argparse.ArgumentError(None, str(err)) from None


def _default(name):
    return default(EvalConfig, name)


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``seer-attn eval`` (see the module docstring; defaults: :class:`EvalConfig`'s);
    out-of-range values are argparse errors (:mod:`seer_attn.training.cli_args`)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="SeerLlama or Llama folder / Hub id, or a .gguf file (default: the embedded SmolLM2-135M)")
    g.add_argument("--gates", default=None, help="gates file, folder or Hub id to load into the model")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder / Hub id (default: the model's)")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="base weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g = parser.add_argument_group("lm-eval")
    g.add_argument("--tasks", default=_default("tasks"), type=ca.task_list,
                   help="comma-separated lm-eval task names: seer_ppl, seer_ppl_pg19, seer_ppl_proofpile, "
                        "seer_passkey, or any lm-eval task such as longbench_passage_retrieval_en")
    g.add_argument("--max-length", type=MAX_LENGTH, required=True,
                   help="HFLM max_length: rolling-window length for perplexity, left-truncation length for prompts")
    g.add_argument("--batch-size", type=ca.positive_int, default=_default("batch_size"),
                   help="HFLM batch size; keep 1 for sparse runs (HFLM right-pads loglikelihood batches "
                        "without a mask, and padding changes the pooled block scores)")
    g.add_argument("--limit", type=ca.positive_float, default=None, help="documents per task (testing only)")
    g.add_argument("--metadata", default=None, type=ca.json_object,
                   help="JSON object of extra task metadata, e.g. '{\"passkey_lengths\": [2048, 4096]}'")
    g.add_argument("--corpus", default=None,
                   help="jsonl corpus for seer_ppl and for density calibration (default: the bundled eval corpus)")
    g.add_argument("--bootstrap-iters", type=ca.nonneg_int, default=_default("bootstrap_iters"),
                   help="lm-eval stderr bootstrap iterations")
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
    g.add_argument("--calib-windows", type=ca.positive_int, default=_default("calib_windows"),
                   help="corpus windows used to calibrate --density")
    g.add_argument("--calib-tol", type=ca.open_unit_interval, default=_default("calib_tol"),
                   help="accepted density error of the calibration")
    g.add_argument("--decode", type=decode_setting_text, default=_default("decode"), metavar="SETTING",
                   help="decode in every run: dense, or sparse decode share=X / budget=N / mass=P with optional "
                        ",local=N, ,prior=A and ,keys=i8|f8|model (e.g. budget=2048,prior=0.7; generation tasks "
                        "such as seer_passkey and LongBench; needs a model with decode gates; default: as the model "
                        "is set)")
    parser.add_argument("--output", default=_default("output"), help="output folder (default: %(default)s)")
    return parser


# ----------------------------------------------------------------------------- settings

def settings_for(config, model) -> list:
    """The list of :class:`Setting` the eval run ``config`` (an :class:`EvalConfig`) covers on
    ``model`` (see the module docstring)."""
    if config.settings:
        return [Setting.parse(s) for s in config.settings]
    cfg = model.config
    mode = config.seer_mode or cfg.seer_mode
    if mode == "dense":
        extra = [n for n in ("selector", "method", "param", "density") if getattr(config, n) is not None]
        if extra:
            raise ValueError(f"--{'/--'.join(extra)} given with dense mode; add --seer-mode sparse")
        return [Setting("dense")]
    if mode != "sparse":
        raise ValueError(f"seer mode {mode!r} cannot be evaluated: expected dense or sparse (distill is for training)")
    selector = config.selector or cfg.seer_selector
    method = config.method or cfg.seer_sparsity_method
    if config.density:
        return [Setting(selector, method, target_density=d) for d in config.density]
    params = config.param or [getattr(cfg, METHOD_PARAM[method])]
    return [Setting(selector, method, param=p) for p in params]


def _task_metadata(config, tokenizer_dir):
    meta = dict(config.metadata or {})
    meta.setdefault("tokenizer", tokenizer_dir)
    meta["max_length"] = config.max_length
    if config.corpus:
        meta.setdefault("corpus", os.path.abspath(config.corpus))
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
    several), the kept share of KV blocks over sparse decode steps when a run decoded sparsely,
    then every main metric of every task."""
    cols = []
    for run in runs:
        for task, metrics in run["metrics"].items():
            for m in metrics:
                if (task, m) not in cols:
                    cols.append((task, m))
    dens_cols = list(dict.fromkeys(t for run in runs for t in run.get("task_density", {})))
    if len(dens_cols) < 2:
        dens_cols = []  # one task: its density is the overall one
    sparse_decode = any(run.get("decode", "dense") != "dense" for run in runs)
    head = ["setting", "density"] + [f"density {t}" for t in dens_cols] + \
        (["decode", "decode density"] if sparse_decode else []) + [f"{t} {m}" for t, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def dens(run, d):
        return "1.000" if run["setting"] == "dense" else ("—" if d is None else f"{d:.3f}")

    for run in runs:
        cells = [run["setting"], dens(run, run["density"])]
        cells += [dens(run, run.get("task_density", {}).get(t)) for t in dens_cols]
        if sparse_decode:
            d = run.get("decode_density")
            cells += [run.get("decode", "dense"), "1.000" if run.get("decode", "dense") == "dense" else
                      ("—" if d is None else f"{d:.3f}")]
        cells += [f"{run['metrics'].get(t, {}).get(m):.4g}" if run["metrics"].get(t, {}).get(m) is not None else "—"
                  for t, m in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run

def _load(config):
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.dtype) if config.dtype else (torch.bfloat16 if str(device).startswith("cuda")
                                                           else torch.float32)
    model = load_seer_model(config.model, dtype=dtype, device=device, gates=config.gates)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    return model.eval(), tokenizer, str(dtype).replace("torch.", "")


def run_eval(config: EvalConfig) -> dict:
    """Run ``seer-attn eval`` as ``config`` says. Returns the envelope written to
    results.json, with ``table`` and ``plot`` added."""
    if not isinstance(config, EvalConfig):
        raise TypeError(f"run_eval takes an EvalConfig, got {type(config).__name__}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = list(config.tasks)
    os.makedirs(config.output, exist_ok=True)
    model, tokenizer, dtype = _load(config)
    with ca.user_input():  # e.g. --param with a dense model: one line from seer-attn, exit 2
        settings = settings_for(config, model)
        decode = None if config.decode is None else decode_setting(config.decode)
        if decode and not getattr(model.config, "seer_decode_gate", False):
            raise ValueError(f"--decode {config.decode} needs a model with decode gates (seer_decode_gate): distil "
                             "them with seer-attn decode-quality, or load gates that hold them")
    tok_dir = os.path.abspath(os.path.join(config.output, "tokenizer"))
    tokenizer.save_pretrained(tok_dir)  # the tasks count tokens with exactly this tokenizer
    metadata = _task_metadata(config, tok_dir)
    from_hub_or_dir = isinstance(config.model, str) and not config.model.endswith(".gguf")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=config.max_length, batch_size=config.batch_size,
              trust_remote_code=from_hub_or_dir)

    calib_windows = None
    if any(s.target_density is not None for s in settings):
        docs = load_documents(config.corpus or default_corpus_path())
        windows = make_windows(docs, tokenizer, config.max_length)
        if not windows:
            raise ValueError(f"no calibration window: no corpus document has {config.max_length} tokens")
        calib_windows = pick_calibration_windows(windows, config.calib_windows)

    runs = []
    # calibrate every density target first, so that an unreachable one fails before any lm-eval run
    calibs = [None if s.target_density is None else
              calibrate(model, s.method, s.target_density, calib_windows, selector=s.selector, tol=config.calib_tol,
                        progress=True)
              for s in settings]
    task_manager = TaskManager(include_path=TASKS_DIR, metadata=metadata)
    with preserved_seer_mode(model):
        for i, (setting, calib) in enumerate(zip(settings, calibs)):
            apply_setting(model, setting, param=calib.param if calib else None)
            if decode is not None:
                apply_decode(model, decode, prefill=model.config.seer_mode)
            decode_name = decode_setting_name(decode_setting_of(model))
            print(f"[seer-attn eval] run {i + 1}/{len(settings)}: {setting}, decode {decode_name}", file=sys.stderr)
            run = {"setting": str(setting), "decode": decode_name, "seer": seer_settings(model),
                   "calibration": None if calib is None else {
                       "target_density": calib.target_density, "param": calib.param, "density": calib.density,
                       "tol": calib.tol, "windows": len(calib_windows)},
                   "density": None, "task_density": {}, "prefills": 0, "decode_density": None,
                   "task_decode_density": {}, "metrics": {},
                   "lm_eval": {k: {} for k in ("results", "groups", "versions", "n-shot", "higher_is_better",
                                               "n-samples")}}
            samples, all_densities, all_decode = {}, [], []
            for task in tasks:  # one lm-eval call per requested task: the density of each is its own
                with DensityMeter(model) as meter, DecodeDensityMeter(model) as decode_meter:
                    res = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=config.limit,
                                          bootstrap_iters=config.bootstrap_iters, log_samples=config.log_samples)
                run["task_density"][task] = meter.mean
                all_densities += meter.values
                if decode_name != "dense":
                    run["task_decode_density"][task] = decode_meter.mean
                    all_decode += decode_meter.values
                for key, val in run["lm_eval"].items():
                    val.update(res.get(key) or {})
                samples.update(res.get("samples") or {})
            run["density"] = sum(all_densities) / len(all_densities) if all_densities else None
            run["prefills"] = len(all_densities)
            run["decode_density"] = sum(all_decode) / len(all_decode) if all_decode else None
            run["metrics"] = _main_metrics(run["lm_eval"]["results"])
            if config.log_samples:
                path = os.path.join(config.output, f"samples_{i}.json")
                with open(path, "w") as f:
                    json.dump(samples, f, default=str)
                run["samples_file"] = os.path.basename(path)
            runs.append(run)

    resolved = {"tasks": tasks, "dtype": dtype, "device": str(model_device(model)), "task_metadata": metadata,
                "settings": [str(s) for s in settings], "decode": [r["decode"] for r in runs]}
    out = envelope("lm_eval", runs, config=asdict(config), resolved=resolved,
                   model=config.model or ca.DEFAULT_MODEL_LABEL, device=model_device(model))
    write_json(os.path.join(config.output, "results.json"), out)
    table = format_results_table(out["rows"])
    prov = out["provenance"]
    with open(os.path.join(config.output, "results.md"), "w") as f:
        decodes = ", ".join(dict.fromkeys(resolved["decode"]))
        f.write(f"{prov['model']} · max_length {config.max_length} · decode {decodes} · {prov['gpu']} · "
                f"commit {(prov['commit'] or 'unknown')[:12]}{' (dirty)' if prov['commit_dirty'] else ''}\n\n")
        f.write(table + "\n")
    print(table)
    out["table"] = table
    out["plot"] = _plot(out["rows"], os.path.join(config.output, "ppl_vs_density.png"), config.max_length)
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
    return run_eval(config_from_args(EvalConfig, parser.parse_args(argv), parser=parser))


if __name__ == "__main__":
    main()
