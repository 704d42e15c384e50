"""The Seer gate against training-free block selections, at equal causal block density, and
``seer-attn compare``.

Every comparison runs the same perplexity protocol (:mod:`seer_attn.eval.perplexity`) for
dense attention, the learned gate (``threshold`` / ``nz_ratio`` / ``coverage``) and the
baselines that ``config.seer_selector`` offers (docs/design.md §4):

==============  ==========  ==================================================
selector        method      meaning
==============  ==========  ==================================================
``streaming``   nz_ratio    sink block + most recent blocks
``oracle_max``  nz_ratio    top-k of the true max-pooled attention map
``oracle_mass`` nz_ratio    top-k of the true block attention mass
``meanpool``    nz_ratio    top-k of mean-pooled q.k (MoBA-like)
``oracle_mass`` coverage    fewest blocks holding a share of the true mass
==============  ==========  ==================================================

The pieces live in their own modules: settings (``SELECTOR:METHOD=PARAM`` /
``SELECTOR:METHOD@DENSITY`` / ``dense``) in :mod:`~seer_attn.eval.settings`, density
calibration in :mod:`~seer_attn.eval.calibration`, tables in :mod:`~seer_attn.eval.tables`,
the plot in :mod:`~seer_attn.eval.plots`; this module runs the comparison (:func:`compare`:
it adds the baselines at the density of every sparse setting it is given, so each table
shows them side by side) and the command line, configured by :class:`CompareConfig`. Their
public names are importable from here too.

    python -m seer_attn.eval.baselines --max-length 8192 --densities 0.21 0.11 --out seer_outputs/compare
"""
import argparse
import os
from dataclasses import asdict, dataclass

import torch

from seer_attn.modeling_seer.selection import SPARSITY_METHODS, baseline_pairs
from seer_attn.training import cli_args as ca
from seer_attn.training.run_config import RunConfig, config_from_args, default, flag, option, text

from .calibration import (Calibration, CalibrationError, calibrate, gate_thresholds_for,  # noqa: F401
                          measure_density, pick_calibration_windows)
from .perplexity import (DEFAULT_MAX_LENGTH, DEFAULT_WINDOWS_PER_DOC, evaluate_perplexity, load_documents,
                         make_windows, model_device)
from .plots import plot_ppl_vs_density  # noqa: F401
from .settings import (BASELINES, DEFAULT_DENSITIES, METHOD_PARAM, SELECTOR_LABELS, Setting,  # noqa: F401
                       apply_setting, check_param, default_settings, preserved_seer_mode, setting_arg, setting_text)
from .tables import format_table, gate_densities, row_label, sort_rows  # noqa: F401

def run_setting(model, setting, windows, *, calib_windows=None, tol=0.01, batch_size=1, progress=True) -> dict:
    """Evaluate one setting (calibrating it first when it has a target density): a table row."""
    setting = Setting.parse(setting)
    calib = None
    with preserved_seer_mode(model):
        if setting.target_density is not None:
            calib = calibrate(model, setting.method, setting.target_density, calib_windows or windows,
                              selector=setting.selector, tol=tol, batch_size=batch_size, progress=progress)
            apply_setting(model, setting, param=calib.param)
        else:
            apply_setting(model, setting)
        res = evaluate_perplexity(model, windows=windows, batch_size=batch_size, progress=progress,
                                  desc=f"perplexity {setting}")
    return {
        "setting": str(setting),
        "selector": setting.selector,
        "method": setting.method,
        "param": calib.param if calib else setting.param,
        "target_density": setting.target_density,
        "density": 1.0 if setting.selector == "dense" else res["density"],
        "calib_density": calib.density if calib else None,
        "ppl": res["ppl"],
        "nll": res["nll"],
        "tokens": res["tokens"],
        "windows": res["windows"],
        "per_source": {s: v["ppl"] for s, v in res["per_source"].items()},
    }


def compare(model, settings=None, tokenizer=None, *, densities=DEFAULT_DENSITIES, with_baselines=True,
            corpus=None, documents=None, windows=None, max_length=DEFAULT_MAX_LENGTH,
            windows_per_doc=DEFAULT_WINDOWS_PER_DOC, partial_windows=False, n_calib=4, tol=0.01, batch_size=1,
            progress=True) -> list:
    """Perplexity and achieved density of several block selections on the same windows.

    Args:
        model: a ``SeerLlamaForCausalLM``; its mode is restored afterwards.
        settings: :class:`Setting` objects or strings (module docstring); None:
            :func:`default_settings` at ``densities``.
        with_baselines: also run dense and every baseline of :func:`baseline_pairs` at the
            target density of each sparse setting (its measured density for a fixed
            parameter), unless already present. A setting whose density cannot be
            calibrated (:class:`CalibrationError`) gives a row with ``error`` and no PPL.
        corpus / documents / windows / max_length / windows_per_doc / partial_windows:
            the evaluation data, as in :func:`~seer_attn.eval.perplexity.evaluate_perplexity`.
        n_calib: windows (evenly spaced over the evaluation windows) used to calibrate.
        tol: calibration tolerance on the density.

    Returns:
        list of rows (dicts: ``setting``, ``selector``, ``method``, ``param``,
        ``target_density``, ``density``, ``calib_density``, ``ppl``, ``nll``, ``tokens``,
        ``windows``, ``per_source``), in :func:`sort_rows` order.
    """
    if windows is None:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to build the evaluation windows (or pass windows=...)")
        if documents is None:
            documents = load_documents(corpus)
        windows = make_windows(documents, tokenizer, max_length, windows_per_doc, partial_windows)
    if not windows:
        raise ValueError(f"no evaluation window of max_length={max_length} tokens in the documents")
    if not isinstance(n_calib, int) or n_calib < 1:
        raise ValueError(f"n_calib={n_calib!r} is invalid: expected a positive integer")
    calib_windows = pick_calibration_windows(windows, n_calib)
    todo = [Setting.parse(s) for s in (settings if settings is not None else default_settings(densities))]
    rows, done = [], set()

    def run(s):
        if str(s) in done:
            return
        done.add(str(s))
        try:
            rows.append(run_setting(model, s, windows, calib_windows=calib_windows, tol=tol, batch_size=batch_size,
                                    progress=progress))
        except CalibrationError as err:  # a density this selection cannot keep: a table row says so
            rows.append(_failed_row(s, err))

    if with_baselines:
        run(Setting("dense"))
    for s in todo:
        run(s)
    if with_baselines:
        targets = []
        for r in list(rows):
            if r["selector"] == "dense" or r.get("error"):
                continue
            t = r["target_density"] if r["target_density"] is not None else round(r["density"], 4)
            if all(abs(t - x) > 1e-9 for x in targets):
                targets.append(t)
        for t in targets:
            for sel, method in baseline_pairs():
                run(Setting(sel, method, target_density=t))
    return sort_rows(rows)


def _failed_row(setting, err):
    return {"setting": str(setting), "selector": setting.selector, "method": setting.method, "param": None,
            "target_density": setting.target_density, "density": None, "calib_density": None, "ppl": None,
            "nll": None, "tokens": None, "windows": None, "per_source": {}, "error": str(err)}

# ----------------------------------------------------------------------------- seer-attn compare

#: ``seer-attn compare`` on a CPU without ``--max-length``: 8192 tokens would take hours there
CPU_MAX_LENGTH = 1024
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True, kw_only=True)
class CompareConfig(RunConfig):
    """One ``seer-attn compare`` run (each field is the option of the same name)."""

    model: str | None = option(None, text)  # folder / Hub id / .gguf; None: the embedded SmolLM2
    gates: str | None = option(None, text)
    corpus: str | None = option(None, text)  # None: the bundled eval corpus
    max_length: int | None = option(None, ca.int_at_least(2))  # None: DEFAULT_MAX_LENGTH (GPU) / CPU_MAX_LENGTH
    windows_per_doc: int = option(DEFAULT_WINDOWS_PER_DOC, ca.positive_int)
    partial_windows: bool = option(False, flag)
    settings: tuple | None = option(None, setting_text, many="*")  # None: default_settings(densities, gate_methods)
    densities: tuple = option(DEFAULT_DENSITIES, ca.unit_interval, many="+")
    gate_methods: tuple = option(("threshold",), choices=SPARSITY_METHODS, many="+")
    no_gate: bool = option(False, flag)
    tol: float = option(0.01, ca.open_unit_interval)
    dtype: str | None = option(None, choices=DTYPES)  # None: bfloat16 on CUDA, float32 on a CPU
    device: str | None = option(None, text)  # None: cuda when available, else cpu
    out: str = option("seer_outputs/compare", text)


def _default(name):
    return default(CompareConfig, name)


def compare_parser() -> argparse.ArgumentParser:
    """The command line of ``seer-attn compare`` (defaults: :class:`CompareConfig`'s)."""
    ap = argparse.ArgumentParser(description="Perplexity of the Seer gate and the baselines at equal density")
    ap.add_argument("--model", default=None, help="model folder / Hub id / .gguf (default: embedded SmolLM2)")
    ap.add_argument("--gates", default=None, help="gates file or folder to load")
    ap.add_argument("--corpus", default=None, help="jsonl corpus (default: the bundled eval corpus)")
    ap.add_argument("--max-length", type=ca.int_at_least(2), default=None,
                    help=f"tokens per window (default: {DEFAULT_MAX_LENGTH} on a GPU, {CPU_MAX_LENGTH} on a CPU)")
    ap.add_argument("--windows-per-doc", type=ca.positive_int, default=_default("windows_per_doc"))
    ap.add_argument("--partial-windows", action="store_true")
    ap.add_argument("--settings", nargs="*", default=None, type=setting_arg,
                    help="e.g. dense gate:threshold=2e-3 streaming:nz_ratio@0.21")
    ap.add_argument("--densities", type=ca.unit_interval, nargs="+", default=_default("densities"))
    ap.add_argument("--gate-methods", nargs="+", default=_default("gate_methods"), choices=list(SPARSITY_METHODS))
    ap.add_argument("--no-gate", action="store_true", help="baselines only (untrained gates are meaningless)")
    ap.add_argument("--tol", type=ca.open_unit_interval, default=_default("tol"),
                    help="accepted density error of calibration")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--out", default=_default("out"), help="output folder (default: %(default)s)")
    return ap


def run_compare(config: CompareConfig) -> list:
    """Dense, the gate and every baseline at equal density, as ``config`` says; prints the
    table, writes ``baselines.json`` (a results envelope of kind ``"ppl_compare"``,
    :mod:`seer_attn.training.results`: ``config`` is the :class:`CompareConfig`, ``resolved``
    the length, dtype, device and settings the run chose), ``baselines.md`` and
    ``baselines.png`` to ``config.out``. Without ``max_length`` a CPU run uses
    :data:`CPU_MAX_LENGTH` tokens (and says so). Returns the rows."""
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from seer_attn.training.results import write_envelope

    if not isinstance(config, CompareConfig):
        raise TypeError(f"run_compare takes a CompareConfig, got {type(config).__name__}")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = torch.device(device).type == "cpu"
    max_length = config.max_length or (CPU_MAX_LENGTH if on_cpu else DEFAULT_MAX_LENGTH)
    if config.max_length is None and on_cpu:
        print(f"[seer-attn compare] on the CPU: --max-length {CPU_MAX_LENGTH} ({DEFAULT_MAX_LENGTH}, the GPU "
              "default, takes hours here); pass --max-length to choose", flush=True)
    dtype = config.dtype or ("float32" if on_cpu else "bfloat16")
    documents = load_documents(config.corpus)  # a bad corpus fails before the model loads
    model = load_seer_model(config.model, dtype=getattr(torch, dtype), device=device, gates=config.gates)
    tok = load_tokenizer(config.model)
    settings = config.settings
    if settings is None:
        settings = default_settings(config.densities, () if config.no_gate else config.gate_methods)
    rows = compare(model, settings, tok, documents=documents, max_length=max_length,
                   windows_per_doc=config.windows_per_doc, partial_windows=config.partial_windows, tol=config.tol)
    table = format_table(rows)
    print(table)
    os.makedirs(config.out, exist_ok=True)
    resolved = {"max_length": max_length, "dtype": dtype, "device": device, "settings": [str(s) for s in settings]}
    write_envelope(os.path.join(config.out, "baselines.json"), "ppl_compare", rows, config=asdict(config),
                   resolved=resolved, model=config.model or ca.DEFAULT_MODEL_LABEL, device=model_device(model))
    with open(os.path.join(config.out, "baselines.md"), "w") as f:
        f.write(table + "\n")
    plot_ppl_vs_density(rows, os.path.join(config.out, "baselines.png"), title=f"PPL vs density, {max_length} tokens")
    return rows


def main(argv=None):
    """``seer-attn compare`` (:func:`run_compare` with the options' :class:`CompareConfig`)."""
    ap = compare_parser()
    return run_compare(config_from_args(CompareConfig, ap.parse_args(argv), parser=ap))


if __name__ == "__main__":
    main()
