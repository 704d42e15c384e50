"""The Seer gate against training-free block selections, at equal causal block density.

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

The selectors, their labels and baseline methods come from the selector registry
(:data:`seer_attn.modeling_seer.selection.SELECTORS`): a new baseline is one entry there.

A setting is written ``SELECTOR:METHOD=PARAM`` (fixed parameter, e.g.
``gate:threshold=2e-3``), ``SELECTOR:METHOD@DENSITY`` (parameter calibrated by
:func:`calibrate` so that the kept share of causal blocks is ``DENSITY``, e.g.
``streaming:nz_ratio@0.21``) or ``dense``. :func:`compare` adds the baselines at the
density of every sparse setting it is given, so each table shows them side by side.

    python -m seer_attn.eval.baselines --max-length 8192 --densities 0.21 0.11 --out results/baselines
"""
import argparse
import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from seer_attn.modeling_seer.selection import (SELECTORS, SPARSITY_METHODS, ScoreInputs, baseline_pairs,
                                               causal_density, select_blocks_for)

from .perplexity import (DEFAULT_MAX_LENGTH, DEFAULT_WINDOWS_PER_DOC, evaluate_perplexity, load_documents,
                         make_windows, model_device)

METHOD_PARAM = {"threshold": "seer_threshold", "nz_ratio": "seer_nz_ratio", "coverage": "seer_coverage"}
#: (selector, method) of the training-free baselines, in table order, as registered at import
#: (:data:`~seer_attn.modeling_seer.selection.SELECTORS`; the functions here read it live).
BASELINES = baseline_pairs()


class _Labels(Mapping):
    """Selector name -> table label, read live from the selector registry (plus ``dense``)."""

    def __getitem__(self, name):
        return "dense" if name == "dense" else SELECTORS[name].label

    def __iter__(self):
        return iter(("dense", *SELECTORS))

    def __len__(self):
        return len(SELECTORS) + 1


SELECTOR_LABELS = _Labels()
DEFAULT_DENSITIES = (0.21, 0.11)
# Search interval of each method's parameter: (low, high, log-scale, density grows with the parameter)
_SEARCH = {"threshold": (1e-7, 0.99, True, False), "nz_ratio": (1e-3, 1.0, False, True),
           "coverage": (1e-3, 1.0, False, True)}
# Smallest bisection step, as a share of the search interval (log-interval for the threshold:
# a factor 1.0016): finer than any density step of top-k at 128k tokens (k / 2048).
_MIN_STEP = 1e-4


def _check_param(method, value, what="param"):
    v = float(value)
    ok = 0.0 < v < 1.0 if method == "threshold" else 0.0 < v <= 1.0
    if not ok or math.isnan(v):
        bound = "0 < threshold < 1" if method == "threshold" else f"0 < {method} <= 1"
        raise ValueError(f"{what}={value!r} is invalid for method {method!r}: expected {bound}")
    return v


@dataclass(frozen=True)
class Setting:
    """One block selection to evaluate: ``dense``, or a selector + method with either a fixed
    ``param`` (threshold / nz_ratio / coverage) or a ``target_density`` to calibrate to."""

    selector: str
    method: str | None = None
    param: float | None = None
    target_density: float | None = None

    def __post_init__(self):
        if self.selector == "dense":
            if self.method is not None or self.param is not None or self.target_density is not None:
                raise ValueError(f"the dense setting takes no method/param/density, got {self!r}")
            return
        if self.selector not in SELECTORS:
            raise ValueError(f"selector={self.selector!r} is invalid: expected 'dense' or one of {tuple(SELECTORS)}")
        if self.method not in SPARSITY_METHODS:
            raise ValueError(f"method={self.method!r} is invalid: expected one of {SPARSITY_METHODS}")
        if (self.param is None) == (self.target_density is None):
            raise ValueError(f"setting {self.selector}:{self.method} needs exactly one of param or target_density")
        if self.param is not None:
            object.__setattr__(self, "param", _check_param(self.method, self.param))
        else:
            d = float(self.target_density)
            if not 0.0 < d <= 1.0:
                raise ValueError(f"target_density={self.target_density!r} is invalid: expected 0 < density <= 1")
            object.__setattr__(self, "target_density", d)

    @classmethod
    def parse(cls, spec) -> "Setting":
        """``dense``, ``SELECTOR:METHOD=PARAM`` or ``SELECTOR:METHOD@DENSITY`` (see module docstring)."""
        if isinstance(spec, Setting):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a setting is a Setting or a string, got {type(spec).__name__}")
        s = spec.strip()
        if s == "dense":
            return cls("dense")
        sel, sep, rest = s.partition(":")
        if not sep:
            raise ValueError(f"setting {spec!r} is invalid: expected 'dense', 'SELECTOR:METHOD=PARAM' or "
                             "'SELECTOR:METHOD@DENSITY' (e.g. 'gate:threshold=2e-3', 'streaming:nz_ratio@0.21')")
        for op in ("=", "@"):
            method, found, value = rest.partition(op)
            if found:
                try:
                    num = float(value)
                except ValueError:
                    raise ValueError(f"setting {spec!r}: {value!r} is not a number") from None
                if op == "=":
                    return cls(sel.strip(), method.strip(), param=num)
                return cls(sel.strip(), method.strip(), target_density=num)
        raise ValueError(f"setting {spec!r} is invalid: give '=PARAM' or '@DENSITY' after the method")

    def __str__(self):
        if self.selector == "dense":
            return "dense"
        if self.param is not None:
            return f"{self.selector}:{self.method}={self.param:g}"
        return f"{self.selector}:{self.method}@{self.target_density:g}"


def setting_arg(text) -> Setting:
    """argparse ``type=`` check: a :class:`Setting` from its string form; a bad one is a
    one-line usage error."""
    from seer_attn.training.cli_args import ArgValueError
    try:
        return Setting.parse(text)
    except (TypeError, ValueError) as err:
        raise ArgValueError(str(err)) from None


def default_settings(densities=DEFAULT_DENSITIES, gate_methods=("threshold",)) -> list:
    """Dense, the gate (each of ``gate_methods``) and every baseline at each target density."""
    out = [Setting("dense")]
    for d in densities:
        out += [Setting("gate", m, target_density=d) for m in gate_methods]
        out += [Setting(sel, m, target_density=d) for sel, m in baseline_pairs()]
    return out


def apply_setting(model, setting, param=None):
    """Put ``model`` in the mode of ``setting`` (``param`` overrides the setting's own)."""
    setting = Setting.parse(setting)
    if setting.selector == "dense":
        model.set_seer_mode("dense")
        return model
    value = param if param is not None else setting.param
    if value is None:
        raise ValueError(f"setting {setting} has a target density, not a parameter: calibrate it first")
    value = _check_param(setting.method, value)
    model.set_seer_mode("sparse", seer_selector=setting.selector, seer_sparsity_method=setting.method,
                        **{METHOD_PARAM[setting.method]: value})
    return model


@contextlib.contextmanager
def preserved_seer_mode(model):
    """Restore the model's mode and every other ``seer_*`` option (selection, keep rules) on exit."""
    saved = {k: v for k, v in vars(model.config).items() if k.startswith("seer_")}
    try:
        yield model
    finally:
        model.set_seer_mode(saved.pop("seer_mode"), **saved)


@torch.no_grad()
def measure_density(model, windows, batch_size=1) -> float:
    """Mean kept share of causal blocks over ``windows`` (model in sparse mode; only the last
    position's logits are computed)."""
    if getattr(model.config, "seer_mode", None) != "sparse":
        raise ValueError(f"measure_density needs a model in sparse mode, got seer_mode="
                         f"{getattr(model.config, 'seer_mode', None)!r}")
    if not windows:
        raise ValueError("measure_density needs at least one window")
    if SELECTORS[model.config.seer_selector].content_free:
        return _content_free_density(model.config, windows)
    dev = model_device(model)
    vals = []
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        if len({w.input_ids.numel() for w in group}) > 1:
            for w in group:  # unequal lengths: one at a time
                vals.append(_one_density(model, w.input_ids[None].to(dev)))
            continue
        ids = torch.stack([w.input_ids for w in group]).to(dev)
        before = model.seer_density()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        d = model.seer_density()
        if d is None or d is before:
            raise RuntimeError("the model reported no block density for a sparse forward")
        vals.extend(d.float().mean(dim=(0, 2)).tolist())
    return sum(vals) / len(vals)


def _content_free_density(cfg, windows):
    """A content-free selection (e.g. streaming) reads only the block count: its density
    follows from the window lengths, so no forward pass is needed (same selection code as
    the model's, on placeholder tensors of the window's length)."""
    vals = []
    for w in windows:
        x = torch.zeros(1, 1, w.input_ids.numel(), 1)
        scores = SELECTORS[cfg.seer_selector].scores(ScoreInputs(x, x, x, x, x, cfg.seer_block_size, 1.0))
        vals.append(causal_density(select_blocks_for(scores, cfg)).mean().item())
    return sum(vals) / len(vals)


def _one_density(model, ids):
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return model.seer_density().float().mean().item()


class CalibrationError(ValueError):
    """The target density is out of reach, or not met within the tolerance."""


@dataclass
class Calibration:
    """Result of :func:`calibrate`: ``param`` gives ``density`` (target ``target_density``)."""

    selector: str
    method: str
    target_density: float
    param: float
    density: float
    tol: float
    within_tol: bool
    history: list = field(default_factory=list)  # (param, density) in evaluation order


def calibrate(model, method, target_density, windows, *, selector="gate", tol=0.01, max_iter=20, strict=True,
              batch_size=1, progress=False) -> Calibration:
    """Find the ``method`` parameter at which ``selector`` keeps ``target_density`` of the
    causal blocks on ``windows`` (bisection; the density is monotone in the parameter:
    falling with the threshold, rising with nz_ratio and coverage).

    Args:
        model: a ``SeerLlamaForCausalLM``; its mode is restored afterwards.
        method: ``"threshold"`` (searched on a log scale in [1e-7, 0.99]), ``"nz_ratio"`` or
            ``"coverage"`` (in [1e-3, 1]).
        target_density: kept share of causal blocks, in (0, 1].
        windows: calibration windows (:class:`~seer_attn.eval.perplexity.Window`), of the
            length used for the evaluation (nz_ratio's density depends on it).
        selector: ``"gate"`` or a baseline selector.
        tol: accepted absolute density error; the search stops once inside it, after
            ``max_iter`` bisection steps, or when the parameter interval is below 1e-4 of
            the search range (a jump of the discrete density straddles the target).
        strict: raise :class:`CalibrationError` (a ValueError) when the target is out of
            reach or not met within ``tol`` (the densities are discrete: the diagonal, the
            dense last rows and integer top-k put a floor and steps under them); otherwise
            return the closest with ``within_tol=False``.

    Returns:
        :class:`Calibration`.
    """
    if method not in _SEARCH:
        raise ValueError(f"method={method!r} is invalid: expected one of {tuple(_SEARCH)}")
    target = float(target_density)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_density={target_density!r} is invalid: expected 0 < density <= 1")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} is invalid: expected > 0")
    Setting(selector, method, target_density=target)  # validates the selector
    lo_p, hi_p, logscale, rising = _SEARCH[method]

    def param_at(u):
        if logscale:
            return math.exp(math.log(lo_p) + u * (math.log(hi_p) - math.log(lo_p)))
        return lo_p + u * (hi_p - lo_p)

    history = []
    bar = tqdm(total=max_iter + 2, desc=f"calibrate {selector}:{method}@{target:g}", disable=not progress,
               leave=False)

    def density_at(u):
        p = param_at(u)
        apply_setting(model, Setting(selector, method, param=p))
        d = measure_density(model, windows, batch_size)
        history.append((p, d))
        bar.update(1)
        bar.set_postfix(param=f"{p:.4g}", density=f"{d:.4f}")
        return d

    with preserved_seer_mode(model):
        try:
            ends = {0.0: density_at(0.0), 1.0: density_at(1.0)}
            d_min, d_max = min(ends.values()), max(ends.values())
            if strict and not (d_min - tol <= target <= d_max + tol):
                raise CalibrationError(
                    f"target density {target:g} is out of reach for {selector}:{method} on these windows: "
                    f"{method} in [{lo_p:g}, {hi_p:g}] keeps between {d_min:.4f} and {d_max:.4f} of the causal "
                    "blocks (kept diagonal / dense last rows set the floor)")
            lo, hi = 0.0, 1.0  # density(lo) is on the low side of the target when rising
            if not rising:
                lo, hi = hi, lo
            for _ in range(max_iter):
                best_p, best_d = min(history, key=lambda h: abs(h[1] - target))
                if abs(best_d - target) <= tol:
                    break
                mid = (lo + hi) / 2
                d = density_at(mid)
                if d < target:
                    lo = mid
                else:
                    hi = mid
                if abs(hi - lo) < _MIN_STEP:  # a jump of the (discrete) density: no closer value exists
                    break
        finally:
            bar.close()
    best_p, best_d = min(history, key=lambda h: abs(h[1] - target))
    within = abs(best_d - target) <= tol
    if strict and not within:
        tried = ", ".join(f"{p:.4g}->{d:.4f}" for p, d in sorted(history))
        raise CalibrationError(f"could not calibrate {selector}:{method} to density {target:g} +- {tol:g}: "
                               f"closest {best_d:.4f} at {method}={best_p:.6g} (densities are discrete; "
                               f"tried {tried})")
    return Calibration(selector, method, target, best_p, best_d, tol, within, history)


@torch.no_grad()
def gate_thresholds_for(model, windows, densities, *, iters=48) -> list:
    """Gate thresholds that keep each of ``densities`` of the causal blocks on ``windows``,
    solved from the gate's scores in one exact-attention pass (no search over forwards).

    Each window runs once in ``seer_mode="distill"`` (exact attention, the gate scoring every
    layer's blocks); the threshold of each target is then bisected (log scale, in
    [1e-7, 0.99]) on those stored scores with the model's keep rules. The scores come from
    the dense trajectory, so a sparse prefill at the returned threshold lands near, not
    exactly on, the target: measure the achieved density (``evaluate_perplexity`` does). A
    target below the keep rules' floor gives the highest threshold; above the reachable
    maximum, the lowest.

    Returns:
        one threshold per target density, in the order given.
    """
    targets = [float(d) for d in densities]
    bad = [d for d in targets if not 0.0 < d <= 1.0]
    if bad:
        raise ValueError(f"densities {bad} are invalid: expected 0 < density <= 1")
    if not windows:
        raise ValueError("gate_thresholds_for needs at least one window")
    per_window = []
    gates = [m for name, m in model.named_modules() if name.endswith("attn_gate")]
    if not gates:
        raise ValueError(f"{type(model).__name__} has no attn_gate modules")
    scores = []
    hooks = [m.register_forward_hook(lambda mod, args, out: scores.append(out.detach())) for m in gates]
    dev = model_device(model)
    with preserved_seer_mode(model):
        try:
            model.set_seer_mode("distill")
            for w in windows:
                model(input_ids=w.input_ids[None].to(dev), use_cache=False, logits_to_keep=1)
                per_window.append(scores[:])
                scores.clear()
        finally:
            for h in hooks:
                h.remove()

        def density(t):  # mean over windows of the mean over layers and heads, as measure_density
            model.set_seer_mode("sparse", seer_selector="gate", seer_sparsity_method="threshold", seer_threshold=t)
            return sum(torch.stack([causal_density(select_blocks_for(s, model.config)).mean() for s in layers]).mean()
                       for layers in per_window).item() / len(per_window)

        lo, hi = math.log(1e-7), math.log(0.99)
        out = []
        for target in targets:
            a, b = lo, hi  # density falls as the threshold rises
            for _ in range(iters):
                mid = (a + b) / 2
                if density(math.exp(mid)) > target:
                    a = mid
                else:
                    b = mid
            out.append(math.exp((a + b) / 2))
    return out


def pick_calibration_windows(windows, n) -> list:
    """``n`` windows evenly spaced over ``windows`` (all of them when there are not more)."""
    if n >= len(windows):
        return list(windows)
    step = len(windows) / n
    return [windows[int(i * step)] for i in range(n)]


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


def gate_densities(rows, method=None) -> list:
    """Achieved densities (3 decimals, ascending, distinct) of the gate rows of ``rows``, of
    ``method`` only when given: the densities baselines are matched to."""
    return sorted({round(r["density"], 3) for r in rows
                   if r["selector"] == "gate" and (method is None or r["method"] == method) and r.get("density")})


def sort_rows(rows) -> list:
    """Dense first, then by target (or achieved) density descending; gate rows before the
    baselines, baselines in :func:`baseline_pairs` order."""
    order = {("gate", m): i for i, m in enumerate(SPARSITY_METHODS)}
    order.update({b: 10 + i for i, b in enumerate(baseline_pairs())})

    def key(r):
        if r["selector"] == "dense":
            return (0, 0.0, 0)
        d = r["target_density"] if r["target_density"] is not None else (r["density"] or 0.0)
        return (1, -round(d, 4), order.get((r["selector"], r["method"]), 99))
    return sorted(rows, key=key)


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def row_label(row) -> str:
    """A row's name in tables and plots: its own ``label`` when set (e.g. two gates side by
    side), else the selector's entry in :data:`SELECTOR_LABELS`."""
    return row.get("label") or SELECTOR_LABELS.get(row["selector"], row["selector"])


def format_table(rows, sources=None) -> str:
    """Markdown table: selection, method, parameter, target and achieved density, PPL (all)
    and PPL per source (``sources``: default, every source seen in the rows)."""
    if sources is None:
        sources = sorted({s for r in rows for s in r.get("per_source", {})})
    head = ["selection", "method", "parameter", "target density", "density", "PPL (all)"] + \
        [f"PPL {s}" for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [row_label(r), r["method"] or "—", _fmt(r["param"], ".4g"),
                 _fmt(r["target_density"], ".3f"), _fmt(r["density"], ".3f"), _fmt(r["ppl"], ".3f")]
        cells += [_fmt(r.get("per_source", {}).get(s), ".3f") for s in sources]
        if r.get("error"):
            cells[-1 - len(sources)] = "unreachable"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_ppl_vs_density(rows, path, title=None, metric="ppl"):
    """Line plot of ``metric`` against achieved density, one line per (selector, method); the
    dense PPL as a horizontal line. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = {}
    dense = None
    for r in rows:
        if r.get(metric) is None:
            continue
        if r["selector"] == "dense":
            dense = r[metric]
            continue
        if r.get("density") is None:
            continue
        lines.setdefault((row_label(r), r["method"]), []).append((r["density"], r[metric]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, method), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} ({method})")
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("kept share of causal blocks (density)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: ``seer-attn compare`` on a CPU without ``--max-length``: 8192 tokens would take hours there
CPU_MAX_LENGTH = 1024


def main(argv=None):
    """``seer-attn compare``: dense, the gate and every baseline at equal density; prints the
    table, writes ``baselines.json`` (a results envelope of kind ``"ppl_compare"``,
    :mod:`seer_attn.training.results`), ``baselines.md`` and ``baselines.png`` to ``--out``.
    Without ``--max-length`` a CPU run uses :data:`CPU_MAX_LENGTH` tokens (and says so)."""
    from seer_attn.modeling_seer.conversion import load_seer_model, load_tokenizer
    from seer_attn.training.results import write_envelope

    from seer_attn.training import cli_args as ca

    ap = argparse.ArgumentParser(description="Perplexity of the Seer gate and the baselines at equal density")
    ap.add_argument("--model", default=None, help="model folder / Hub id / .gguf (default: embedded SmolLM2)")
    ap.add_argument("--gates", default=None, help="gates file or folder to load")
    ap.add_argument("--corpus", default=None, help="jsonl corpus (default: the bundled eval corpus)")
    ap.add_argument("--max-length", type=ca.int_at_least(2), default=None,
                    help=f"tokens per window (default: {DEFAULT_MAX_LENGTH} on a GPU, {CPU_MAX_LENGTH} on a CPU)")
    ap.add_argument("--windows-per-doc", type=ca.positive_int, default=DEFAULT_WINDOWS_PER_DOC)
    ap.add_argument("--partial-windows", action="store_true")
    ap.add_argument("--settings", nargs="*", default=None, type=setting_arg,
                    help="e.g. dense gate:threshold=2e-3 streaming:nz_ratio@0.21")
    ap.add_argument("--densities", type=ca.unit_interval, nargs="+", default=list(DEFAULT_DENSITIES))
    ap.add_argument("--gate-methods", nargs="+", default=["threshold"], choices=list(SPARSITY_METHODS))
    ap.add_argument("--no-gate", action="store_true", help="baselines only (untrained gates are meaningless)")
    ap.add_argument("--tol", type=ca.open_unit_interval, default=0.01, help="accepted density error of calibration")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="results/baselines")
    args = ap.parse_args(argv)
    on_cpu = torch.device(args.device).type == "cpu"
    max_length = args.max_length or (CPU_MAX_LENGTH if on_cpu else DEFAULT_MAX_LENGTH)
    if args.max_length is None and on_cpu:
        print(f"[seer-attn compare] on the CPU: --max-length {CPU_MAX_LENGTH} ({DEFAULT_MAX_LENGTH}, the GPU "
              "default, takes hours here); pass --max-length to choose", flush=True)
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    documents = load_documents(args.corpus)  # a bad corpus fails before the model loads
    model = load_seer_model(args.model, dtype=getattr(torch, dtype), device=args.device, gates=args.gates)
    tok = load_tokenizer(args.model)
    settings = args.settings
    if settings is None:
        settings = default_settings(args.densities, () if args.no_gate else tuple(args.gate_methods))
    rows = compare(model, settings, tok, documents=documents, max_length=max_length,
                   windows_per_doc=args.windows_per_doc, partial_windows=args.partial_windows, tol=args.tol)
    table = format_table(rows)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    config = ca.config_of(args, max_length=max_length, dtype=dtype, settings=[str(s) for s in settings])
    write_envelope(os.path.join(args.out, "baselines.json"), "ppl_compare", rows, config=config,
                   model=args.model or ca.DEFAULT_MODEL_LABEL, device=model_device(model))
    with open(os.path.join(args.out, "baselines.md"), "w") as f:
        f.write(table + "\n")
    plot_ppl_vs_density(rows, os.path.join(args.out, "baselines.png"),
                        title=f"PPL vs density, {max_length} tokens")
    return rows


if __name__ == "__main__":
    main()
