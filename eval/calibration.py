"""Density calibration: the parameter of a selection that keeps a target share of the causal
blocks (docs/design.md §4: a selection is only compared at the density of another).

:func:`calibrate` bisects over forwards (any selector and method); :func:`gate_params_for`
solves the gate's threshold, coverage or gain from one exact pass's scores; :func:`calibrate_gate` corrects
that parameter with a few sparse passes (the calibrated density knob; :func:`calibrate_threshold`
for the threshold); :func:`density_profile` is the coverage rule's spread over the layers, for
the density knob; :func:`measure_density` is the achieved density of the model's current
selection.
"""
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from seer_attn.kernels.kernel_utils import num_blocks
from seer_attn.modeling_seer.seer_layer import SeerAttentionMixin, SeerForwardContext
from seer_attn.modeling_seer.selection import SELECTORS, ScoreInputs, layer_density, selection_density

from .perplexity import model_device
from .settings import Setting, apply_setting, preserved_seer_mode

# Search interval of each method's parameter: (low, high, log-scale, density grows with the parameter)
_SEARCH = {"threshold": (1e-7, 0.99, True, False), "nz_ratio": (1e-3, 1.0, False, True),
           "coverage": (1e-3, 1.0, False, True), "gain": (1e-7, 0.99, True, False),
           "density": (1e-3, 1.0, False, True)}
# Smallest bisection step, as a share of the search interval (log-interval for the threshold:
# a factor 1.0016): finer than any density step of top-k at 128k tokens (k / 2048).
_MIN_STEP = 1e-4


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
        return _content_free_density(model, windows)
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


def _content_free_density(model, windows):
    """A content-free selection (e.g. streaming) reads only the block count (and each layer's
    sliding window): its density follows from the window lengths, so no forward pass is
    needed (same selection code as the model's, on placeholder tensors of the window's length;
    mean over layers and heads, as a forward reports it)."""
    cfg = model.config
    layers = [(m.layer_idx, getattr(m, "sliding_window", None)) for m in model.modules()
              if isinstance(m, SeerAttentionMixin)] or [(None, None)]
    vals = []
    for w in windows:
        x = torch.zeros(1, 1, w.input_ids.numel(), 1)
        seen = {}  # (dense layer, sliding window, density knob's share) -> density: layers alike share it
        NB = num_blocks(w.input_ids.numel(), cfg.seer_block_size)
        for i, win in layers:
            key = (i is not None and i < cfg.seer_dense_layers, win, layer_density(cfg, i, NB))
            if key not in seen:
                scores = SELECTORS[cfg.seer_selector].scores(ScoreInputs(x, x, x, x, x, cfg.seer_block_size, 1.0,
                                                                         window=win))
                seen[key] = selection_density(scores, cfg, win, i).mean().item()
            vals.append(seen[key])
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
    falling with the threshold and the gain, rising with nz_ratio and coverage).

    Args:
        model: a ``SeerLlamaForCausalLM``; its mode is restored afterwards.
        method: ``"threshold"`` or ``"gain"`` (searched on a log scale in [1e-7, 0.99]), ``"nz_ratio"``,
            ``"coverage"`` or ``"density"`` (in [1e-3, 1]; ``"density"`` keeps its parameter
            already, so calibrating it only matters below the keep rules' floor).
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


# The axis each gate method is solved on (gate_params_for's bisection, calibrate_gate's secant
# steps): parameter -> x, x -> parameter, the x range, and the sign of d(density)/dx (the
# threshold's and the gain's density fall on a log scale; the coverage's rises, steeply near 1, so it walks
# -log(1 - coverage)).
_GATE_AXIS = {
    "threshold": (math.log, math.exp, math.log(_SEARCH["threshold"][0]), math.log(_SEARCH["threshold"][1]), -1.0),
    "coverage": (lambda c: -math.log1p(-min(c, 1 - 1e-6)), lambda x: -math.expm1(-x),
                 -math.log1p(-_SEARCH["coverage"][0]), -math.log(1e-6), 1.0),
}
_GATE_AXIS["gain"] = _GATE_AXIS["threshold"]


@torch.no_grad()
def gate_thresholds_for(model, windows, densities, *, iters=48) -> list:
    """Gate thresholds that keep each of ``densities`` of the causal blocks on ``windows``,
    solved from the gate's scores in one exact-attention pass: :func:`gate_params_for` with
    ``method="threshold"``."""
    return gate_params_for(model, windows, densities, method="threshold", iters=iters)


@torch.no_grad()
def exact_gate_scores(model, windows) -> list:
    """The gate's scores of every layer in one exact-attention pass over each of ``windows``
    (``seer_mode="distill"``; the model's mode is restored): per window, a list of ``(layer index,
    scores, sliding window)`` per layer, what :func:`gate_params_for` solves on (pass it as
    ``scores`` to solve several methods from one pass)."""
    if not windows:
        raise ValueError("exact_gate_scores needs at least one window")
    if not any(name.endswith("attn_gate") for name, _ in model.named_modules()):
        raise ValueError(f"{type(model).__name__} has no attn_gate modules")
    dev, per_window = model_device(model), []
    with preserved_seer_mode(model):
        model.set_seer_mode("distill")
        for w in windows:
            layers = []
            ctx = SeerForwardContext(on_gate_scores=lambda i, s, win: layers.append((i, s, win)))
            model(input_ids=w.input_ids[None].to(dev), use_cache=False, logits_to_keep=1, seer_ctx=ctx)
            per_window.append(layers)
    return per_window


@torch.no_grad()
def gate_params_for(model, windows, densities, *, method="threshold", iters=48, scores=None) -> list:
    """Parameters of the gate's ``method`` (``"threshold"``, ``"coverage"`` or ``"gain"``) that keep each of
    ``densities`` of the causal blocks on ``windows``, solved from the gate's scores in one
    exact-attention pass (no search over forwards).

    Each window runs once in ``seer_mode="distill"`` (exact attention, the gate scoring every
    layer's blocks); the parameter of each target is then bisected (the threshold on a log
    scale in [1e-7, 0.99], the gain likewise, the coverage on -log(1 - coverage) over [1e-3, 1 - 1e-6]) on those
    stored scores with the model's keep rules. The scores come from the dense trajectory, so a
    sparse prefill at the returned parameter lands near, not exactly on, the target: measure
    the achieved density (``evaluate_perplexity`` does). A target below the keep rules' floor gives the sparsest
    parameter; above the reachable maximum, the densest. ``scores``: :func:`exact_gate_scores` of
    ``windows`` already taken (``windows`` is then not read again).

    Returns:
        one parameter per target density, in the order given.
    """
    if method not in _GATE_AXIS:
        raise ValueError(f"method={method!r} is invalid: expected one of {tuple(_GATE_AXIS)}")
    targets = [float(d) for d in densities]
    bad = [d for d in targets if not 0.0 < d <= 1.0]
    if bad:
        raise ValueError(f"densities {bad} are invalid: expected 0 < density <= 1")
    per_window = exact_gate_scores(model, windows) if scores is None else scores
    _, to_param, lo, hi, sign = _GATE_AXIS[method]
    with preserved_seer_mode(model):
        def density(x):  # mean over windows of the mean over layers and heads, as measure_density
            model.set_seer_mode("sparse", seer_selector="gate", seer_sparsity_method=method,
                                **{f"seer_{method}": to_param(x)})
            return sum(torch.stack([selection_density(s, model.config, win, i).mean() for i, s, win in layers]).mean()
                       for layers in per_window).item() / len(per_window)

        out = []
        for target in targets:
            a, b = lo, hi
            for _ in range(iters):
                mid = (a + b) / 2
                if (density(mid) > target) == (sign < 0):  # the target lies at larger x
                    a = mid
                else:
                    b = mid
            out.append(to_param((a + b) / 2))
    return out


def calibrate_threshold(model, windows, target_density, *, rel_tol=0.02, max_forwards=8) -> Calibration:
    """The gate threshold that keeps ``target_density`` of the causal blocks in sparse forwards
    over ``windows``: :func:`calibrate_gate` with ``method="threshold"``."""
    return calibrate_gate(model, windows, target_density, method="threshold", rel_tol=rel_tol,
                          max_forwards=max_forwards)


def calibrate_gate(model, windows, target_density, *, method="threshold", rel_tol=0.02,
                   max_forwards=8) -> Calibration:
    """The parameter of the gate's ``method`` (``"threshold"``, ``"coverage"`` or ``"gain"``) that keeps
    ``target_density`` of the causal blocks in sparse forwards over ``windows`` (a sample of
    the user's text): the calibrated density knob (docs/experiments/gate_quality.md §6, §8).

    Starts from :func:`gate_params_for` (one exact pass: dense-trajectory scores, which on
    SmolLM2 put a sparse prefill up to ~7% off the target on the very windows solved on) and
    corrects it with secant steps on the log-density of sparse passes over ``windows``
    (halving the bracket of parameters seen on either side of the target when a step would
    leave it) until within ``rel_tol`` of the target or after ``max_forwards`` passes; a few
    passes where :func:`calibrate`'s bisection of the whole range needs about ten. The
    model's keep rules count, its mode is restored afterwards.

    Returns:
        :class:`Calibration` of the closest pass (``within_tol`` says whether it met ``rel_tol``).
    """
    if method not in _GATE_AXIS:
        raise ValueError(f"method={method!r} is invalid: expected one of {tuple(_GATE_AXIS)}")
    target = float(target_density)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_density={target_density!r} is invalid: expected 0 < density <= 1")
    if not rel_tol > 0:
        raise ValueError(f"rel_tol={rel_tol!r} is invalid: expected > 0")
    if max_forwards < 1:
        raise ValueError(f"max_forwards={max_forwards!r} is invalid: expected an integer >= 1")
    to_x, to_param, left, right, sign = _GATE_AXIS[method]
    params = gate_params_for(model, windows, [target, target * 0.8], method=method)
    # first slope of log density over x: the exact pass's, from two asked densities
    x0, x1 = to_x(params[0]), to_x(params[1])
    slope = math.log(0.8) / (x1 - x0) if x1 != x0 else sign
    slope = slope if slope * sign > 0 else sign
    history, x = [], x0
    with preserved_seer_mode(model):
        for _ in range(max_forwards):
            # the parameter rounded as it is shipped (6 significant digits) before it is measured: the solve ends
            # at a step of the density, where a last-digit change can move a block, so the density reported is the
            # shipped parameter's
            param = float(f"{to_param(x):.6g}")
            model.set_seer_mode("sparse", seer_selector="gate", seer_sparsity_method=method,
                                **{f"seer_{method}": param})
            d = measure_density(model, windows)
            history.append((x, param, d))
            if abs(d / target - 1) <= rel_tol:
                break
            if (d > target) == (sign < 0):  # the target lies at larger x
                left = max(left, x)
            else:
                right = min(right, x)
            if len(history) >= 2:
                (xa, _, da), (xb, _, db) = history[-2], history[-1]
                if xa != xb and da != db and min(da, db) > 0:
                    step = (math.log(db) - math.log(da)) / (xb - xa)
                    if step * sign > 0:  # a plateau or noise keeps the last good slope
                        slope = step
            x_new = x + (math.log(target) - math.log(max(d, 1e-9))) / slope
            if not left < x_new < right:  # the secant left the bracket: halve it instead
                x_new = (left + right) / 2
            if x_new == x:
                break
            x = x_new
    _, best_p, best_d = min(history, key=lambda h: abs(h[2] - target))
    return Calibration("gate", method, target, best_p, best_d, rel_tol * target,
                       abs(best_d / target - 1) <= rel_tol, [(p, d) for _, p, d in history])


@torch.no_grad()
def density_profile(model, windows, coverage=0.8) -> list:
    """Per-layer multipliers for ``seer_density_profile``: the share of causal blocks each
    layer keeps under the gate's coverage rule at ``coverage`` over sparse forwards of
    ``windows`` (a sample of the user's text, at the length it will be used), divided by their
    mean. The knob with this profile spreads its budget over the layers as the coverage rule
    does (more where the gate is unsure) while still keeping the asked share per sequence. The
    model's keep rules count; its mode is restored afterwards."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage={coverage!r} is invalid: expected 0 < coverage <= 1")
    if not windows:
        raise ValueError("density_profile needs at least one window")
    dev, per_layer = model_device(model), []
    with preserved_seer_mode(model):
        model.set_seer_mode("sparse", seer_selector="gate", seer_sparsity_method="coverage", seer_coverage=coverage)
        for w in windows:
            model(input_ids=w.input_ids[None].to(dev), use_cache=False, logits_to_keep=1)
            per_layer.append(model.seer_density().float().mean(dim=(1, 2)))
    mean = torch.stack(per_layer).mean(dim=0)
    return (mean / mean.mean()).tolist()


def pick_calibration_windows(windows, n) -> list:
    """``n`` windows evenly spaced over ``windows`` (all of them when there are not more)."""
    if n >= len(windows):
        return list(windows)
    step = len(windows) / n
    return [windows[int(i * step)] for i in range(n)]
