"""``seer-attn calibrate``: "give me density rho", solved on a sample of your text and ready to ship.

    seer-attn calibrate --model SOURCE [--gates GATES] --density 0.1 [--method gain]
        [--data sample.jsonl] [--max-length 8192] [--windows 4] [--eval-windows 4] [--out DIR]

The gate's ``gain`` (default), ``coverage`` or ``threshold`` is solved so that sparse prefills over
``--windows`` windows of ``--data`` (default: the bundled training corpus) keep ``--density`` of the
causal blocks, under the keep rules it will ship with (the model's config, or ``--keep-sink``,
``--keep-local``, ``--dense-last-rows``, ``--dense-layers``): one exact pass, then secant steps over
sparse passes (:func:`~seer_attn.eval.calibration.calibrate_gate`). Calibrate at the prompt length
you will serve: an adaptive rule keeps a different share at other lengths. The gain rule keeps, per
row, the blocks that would each hold at least g of the row's kept mass; with the mean-pooled prior
(``--meanpool-prior``; default 0.5 where the sink block is kept, unless the model's config sets a
share; 0: the gate alone) it was the best selection measured at SmolLM2's 8k protocol, within 1% of
(and ahead of) the threshold at every density from 0.05 to 0.3, where the coverage rule (the default
before) missed at 0.12 and below, and its solved parameter kept the asked density on held-out text
within 2% where the gate alone overshot by 11% (docs/experiments/gate_quality.md §18; §8, §12 for
the coverage rule).

``--eval-windows N`` also measures, on N held-out windows of ``--eval-data`` (default: the
bundled eval corpus), the perplexity of dense, of the calibrated setting (and the density it
keeps there) and of the per-sequence knob ``seer_density`` at the same density, so the card
can say what the setting costs.

Writes ``OUT/calibration.json``, a results envelope of kind ``"calibration"``: the passes
(parameter, density on the sample) as rows, the solved ``settings`` (the ``seer_*`` options
that run it), the keep rules it counted, the sample, and ``gates_sha256`` (a fingerprint of
the gate tensors calibrated). ``seer-attn export --results OUT/calibration.json`` ships the
setting in the exported config and its card (and refuses the file for other gates).
"""
from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import asdict, dataclass

import torch

from seer_attn.training import cli_args as ca
from seer_attn.training.run_config import RunConfig, config_from_args, default, flag, option, text

from .calibration import calibrate_gate, pick_calibration_windows
from .perplexity import DEFAULT_MAX_LENGTH, load_documents, make_windows, model_device
from .settings import METHOD_PARAM, Setting

KIND = "calibration"
METHODS = ("gain", "coverage", "threshold")  # eval/cli.py's --calibrate-method lists them too (no torch)
#: the config fields a calibration counts (what the selection keeps whatever the scores say)
KEEP_FIELDS = ("seer_keep_diagonal", "seer_keep_sink", "seer_keep_local", "seer_dense_last_rows",
               "seer_dense_layers")
CPU_MAX_LENGTH = 2048
#: the prior's share when neither --meanpool-prior nor the model's config gives one and the sink block is kept (see
#: default_prior): with the gain rule it was the best selection measured at SmolLM2's 8k protocol and the one whose
#: solved parameter carries over to held-out text (docs/experiments/gate_quality.md section 18)
DEFAULT_MEANPOOL_PRIOR = 0.5
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CalibrateConfig(RunConfig):
    """One ``seer-attn calibrate`` run (each field is the option of the same name)."""

    density: float = option(None, ca.unit_interval, optional=False)
    model: str | None = option(None, text)  # folder / Hub id / .gguf; None: the embedded SmolLM2
    gates: str | None = option(None, text)
    method: str = option("gain", choices=METHODS)
    data: str | None = option(None, text)  # None: the bundled training corpus
    max_length: int | None = option(None, ca.int_at_least(128))  # None: 8192 on a GPU, CPU_MAX_LENGTH on a CPU
    windows: int = option(4, ca.positive_int)
    rel_tol: float = option(0.02, ca.open_unit_interval)
    max_forwards: int = option(8, ca.positive_int)
    keep_sink: bool | None = option(None, flag)  # None (each keep rule): the model's config
    keep_local: int | None = option(None, ca.nonneg_int)
    dense_last_rows: int | None = option(None, ca.nonneg_int)
    dense_layers: int | None = option(None, ca.nonneg_int)
    # None: default_prior (the model's share, else DEFAULT_MEANPOOL_PRIOR where the sink block is kept, else 0)
    meanpool_prior: float | None = option(None, ca.float_in(0, 1, low_open=False))
    eval_data: str | None = option(None, text)  # None: the bundled eval corpus
    eval_windows: int = option(0, ca.nonneg_int)
    dtype: str | None = option(None, choices=DTYPES)  # None: bfloat16 on CUDA, float32 on a CPU
    device: str | None = option(None, text)  # None: cuda when available, else cpu
    out: str = option("seer_outputs/calibrate", text)
    no_progress: bool = option(False, flag)


def add_calibrate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``calibrate`` options (defaults: :class:`CalibrateConfig`'s)."""
    d = lambda name: default(CalibrateConfig, name)  # noqa: E731
    p.add_argument("--density", type=ca.unit_interval, required=True,
                   help="the share of causal blocks to keep, 0 < density <= 1 (e.g. 0.1: a tenth of the attention)")
    p.add_argument("--model", default=None,
                   help="a Seer folder or Hub id (full or gates-only), or a stock checkpoint or .gguf file with "
                        "--gates (default: the embedded SmolLM2-135M-Instruct GGUF with the gates shipped for it)")
    p.add_argument("--gates", default=None, help="gates file or folder (seer_gates.safetensors) to load onto --model")
    p.add_argument("--method", choices=METHODS, default=d("method"),
                   help="gain: per row, blocks that would each hold >= g of the row's kept mass (the most log-mass for "
                        "the blocks kept; default); coverage: fewest blocks holding a share of the gate's probability "
                        "per row (spends blocks where the gate is unsure); threshold: blocks whose gate probability "
                        "is >= t")
    p.add_argument("--data", default=None,
                   help="jsonl sample of your text ('text' field), one window per document (default: the bundled "
                        "training corpus)")
    p.add_argument("--max-length", type=ca.int_at_least(128), default=None,
                   help=f"tokens per window: the prompt length you will serve (default: {DEFAULT_MAX_LENGTH} on a GPU, "
                        f"{CPU_MAX_LENGTH} on a CPU)")
    p.add_argument("--windows", type=ca.positive_int, default=d("windows"),
                   help="windows of the sample solved on, evenly spread over its documents (default: %(default)s)")
    p.add_argument("--rel-tol", type=ca.open_unit_interval, default=d("rel_tol"),
                   help="accepted relative density error on the sample (default: %(default)s)")
    p.add_argument("--max-forwards", type=ca.positive_int, default=d("max_forwards"),
                   help="sparse passes over the sample at most (default: %(default)s)")
    p.add_argument("--keep-sink", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the first (sink) block of every row (default: as the model's config)")
    p.add_argument("--keep-local", type=ca.nonneg_int, default=None,
                   help="keep the N blocks before the diagonal (default: as the model's config)")
    p.add_argument("--dense-last-rows", type=ca.nonneg_int, default=None,
                   help="keep the last N block rows of a prompt in full, where its question sits (default: as the "
                        "model's config)")
    p.add_argument("--dense-layers", type=ca.nonneg_int, default=None,
                   help="the first N layers attend densely (default: as the model's config)")
    p.add_argument("--meanpool-prior", type=ca.float_in(0, 1, low_open=False), default=None, metavar="A",
                   help="seer_meanpool_prior: the share A of the mean-pooled q.k prior in the gate's scores, "
                        "shipped with the solved parameter (0: the gate alone; default: the model's config when it "
                        f"sets one, else {DEFAULT_MEANPOOL_PRIOR:g} where the keep rules keep the sink block, else 0)")
    p.add_argument("--eval-data", default=None, help="held-out jsonl for --eval-windows (default: the bundled eval "
                                                     "corpus)")
    p.add_argument("--eval-windows", type=ca.nonneg_int, default=d("eval_windows"),
                   help="also measure perplexity of dense, the calibrated setting and the density knob on this many "
                        "held-out windows (default: 0, none)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=d("out"), help="folder of calibration.json (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def default_prior(cfg) -> float:
    """The prior's share when ``--meanpool-prior`` is not given: the model's when its config sets one
    (gates distilled through the prior), else :data:`DEFAULT_MEANPOOL_PRIOR` where the keep rules keep
    the sink block and 0 where they do not: with the sink left to the scores the mixture costs
    perplexity, likely by ranking the sink low (SmolLM2 at 2k on the CPU, gain at 0.2: 30.7 against the
    gate alone's 25.4 without the sink kept, 11.79 against 12.10 with it; gate_quality.md section 18)."""
    if cfg.seer_meanpool_prior:
        return cfg.seer_meanpool_prior
    return DEFAULT_MEANPOOL_PRIOR if cfg.seer_keep_sink else 0.0


def gates_sha256(model) -> str:
    """Fingerprint of the model's gate tensors: sha256 over their names and values rounded to
    bfloat16 (so a float32 and a bfloat16 copy of the same gates agree)."""
    h = hashlib.sha256()
    for name, t in sorted(model.gate_state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def gates_to_load(model_source, gates):
    """The gates file to load onto ``model_source``: ``gates`` when given; for the embedded
    SmolLM2 (None) the gates shipped with the package; a Seer checkpoint carries its own
    (None). A stock checkpoint or GGUF file has no trained gates: ValueError naming it."""
    if gates is not None:
        return gates
    if model_source is None:
        from .demo import SHIPPED_GATES
        if os.path.isfile(SHIPPED_GATES):
            return SHIPPED_GATES
    elif not str(model_source).lower().endswith(".gguf"):
        from transformers import AutoConfig

        from seer_attn.modeling_seer.families import FAMILIES
        from seer_attn.modeling_seer.hub_utils import resolve_source
        source, _ = resolve_source(model_source)
        if AutoConfig.from_pretrained(source).model_type in {f.seer_model_type for f in FAMILIES.values()}:
            return None
    raise ValueError(f"--model {model_source or '(embedded SmolLM2)'} has no trained gates (a stock checkpoint or GGUF "
                     "file): give --gates, or a Seer folder that holds them")


def _windows(path, tok, length, n, what, option_name):
    docs = load_documents(path)
    wins = make_windows(docs, tok, length, 1)
    if not wins:
        raise ValueError(f"{option_name} {path or f'(the bundled {what} corpus)'}: no document has {length} tokens "
                         "(give longer documents or a smaller --max-length)")
    return pick_calibration_windows(wins, n), len(wins)


def run_calibrate(config: CalibrateConfig) -> dict:
    """Solve the setting (module docstring); prints the result and the next step, writes
    ``calibration.json``. Returns the envelope."""
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from seer_attn.training.cli_args import user_input
    from seer_attn.training.data import default_corpus_path
    from seer_attn.training.results import write_envelope

    from .baselines import compare

    if not isinstance(config, CalibrateConfig):
        raise TypeError(f"run_calibrate takes a CalibrateConfig, got {type(config).__name__}")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cpu = torch.device(device).type == "cpu"
    length = config.max_length or (CPU_MAX_LENGTH if on_cpu else DEFAULT_MAX_LENGTH)
    dtype = config.dtype or ("float32" if on_cpu else "bfloat16")
    data = config.data or default_corpus_path("train")
    with user_input():  # bad data, model or gates: one line
        load_documents(data)  # before the model loads
        if config.eval_windows:
            load_documents(config.eval_data)
        gates = gates_to_load(config.model, config.gates)
        model = load_seer_model(config.model, dtype=getattr(torch, dtype), device=device, gates=gates)
        tok = load_tokenizer(config.model)
        wins, available = _windows(data, tok, length, config.windows, "training", "--data")
    rules = {f"seer_{k}": getattr(config, k) for k in ("keep_sink", "keep_local", "dense_last_rows", "dense_layers",
                                                       "meanpool_prior") if getattr(config, k) is not None}
    model.set_seer_mode("sparse", seer_selector="gate", **rules)
    if config.meanpool_prior is None:
        model.set_seer_mode("sparse", seer_meanpool_prior=default_prior(model.config))
    keep = {k: getattr(model.config, k) for k in KEEP_FIELDS}
    print(f"[calibrate] {config.method} of the gate{f' ({gates})' if gates else ''} for density {config.density:g} on "
          f"{len(wins)} windows of {length} tokens of {config.data or 'the bundled training corpus'} ({available} "
          "available); keep rules " + ", ".join(f"{k}={v}" for k, v in keep.items())
          + f"; mean-pooled prior share {model.config.seer_meanpool_prior:g}", flush=True)
    cal = calibrate_gate(model, wins, config.density, method=config.method, rel_tol=config.rel_tol,
                         max_forwards=config.max_forwards)
    settings = {"seer_mode": "sparse", "seer_selector": "gate", "seer_sparsity_method": config.method,
                METHOD_PARAM[config.method]: cal.param,  # already 6 significant digits: the value each pass measured
                # the parameter was solved on the gate's scores with this prior (0: none): it ships with it
                "seer_meanpool_prior": model.config.seer_meanpool_prior}
    rows = [{"pass": i + 1, "param": p, "density": d} for i, (p, d) in enumerate(cal.history)]
    ppl = []
    if config.eval_windows:
        with user_input():
            held, _ = _windows(config.eval_data, tok, length, config.eval_windows, "eval", "--eval-data")
        setting = Setting("gate", config.method, param=settings[METHOD_PARAM[config.method]])
        kw = dict(windows=held, with_baselines=False, progress=not config.no_progress)
        both = compare(model, [Setting("dense"), setting], **kw)
        dense, got = (next(r for r in both if r["selector"] == sel) for sel in ("dense", "gate"))
        knob = compare(model, [Setting("gate", "density", param=got["density"])], **kw)[0]
        knob.update(matched_to=got["setting"], ppl_ratio=knob["ppl"] / got["ppl"])
        ppl = [dense, got, knob]
    sample = {"data": config.data or "the bundled training corpus", "windows": len(wins), "max_length": length}
    env = write_envelope(
        os.path.join(config.out, "calibration.json"), KIND, rows, config=asdict(config),
        model=config.model or ca.DEFAULT_MODEL_LABEL, device=model_device(model), settings=settings, keep=keep,
        method=config.method, param=settings[METHOD_PARAM[config.method]], target_density=config.density,
        density=cal.density, within_tol=cal.within_tol, gates=gates, gates_sha256=gates_sha256(model), sample=sample,
        ppl=ppl, resolved={"max_length": length, "dtype": dtype, "device": device})
    print(summary(env))
    return env


def summary(env) -> str:
    """What a calibration envelope found, the perplexity rows if measured, and how to use it."""
    s, cfg = env["sample"], env["config"]
    name, n = METHOD_PARAM[env["method"]], len(env["rows"])
    lines = [f"[calibrate] {env['method']} {env['param']:.6g} keeps {env['density']:.4f} of the causal blocks on the "
             f"sample (asked {env['target_density']:g}, {n} sparse pass{'es' if n > 1 else ''}"
             + ("" if env["within_tol"] else f"; NOT within {cfg['rel_tol']:.0%} of it: the keep rules' floor, a "
                "setting's ceiling, or too few --max-forwards") + ")"]
    if env.get("ppl"):
        lines.append(f"[calibrate] held-out perplexity, {s['max_length']}-token windows:")
        for r in env["ppl"]:
            lines.append(f"  {r['setting']:<28} ppl {r['ppl']:.3f}  density {r['density']:.3f}")
    kw = ", ".join(f"{k}={v!r}" for k, v in env["settings"].items() if k != "seer_mode")
    lines += [f"[calibrate] in Python: model.set_seer_mode(\"sparse\", {kw})",
              f"[calibrate] on the Hub: seer-attn export --model ... --results "
              f"{os.path.join(cfg['out'], 'calibration.json')} --output DIR  (ships {name} in the config and "
              "the card)"]
    return "\n".join(lines)


def main(argv=None):
    """``python -m seer_attn.eval.calibrate_run`` (the same as ``seer-attn calibrate``)."""
    ap = add_calibrate_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run_calibrate(config_from_args(CalibrateConfig, ap.parse_args(argv), parser=ap))


if __name__ == "__main__":
    main()
