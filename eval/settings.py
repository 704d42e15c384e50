"""Block-selection settings: what one row of a comparison runs, and putting a model in it.

A setting is written ``SELECTOR:METHOD=PARAM`` (fixed parameter, e.g.
``gate:threshold=2e-3``, or ``gate:density=0.1``, which keeps 0.1 of the causal blocks in
every layer without calibration), ``SELECTOR:METHOD@DENSITY`` (parameter calibrated so that the kept
share of causal blocks is ``DENSITY``, e.g. ``streaming:nz_ratio@0.21``,
:mod:`seer_attn.eval.calibration`) or ``dense``. The selectors, their labels and baseline
methods come from the selector registry (:data:`seer_attn.modeling_seer.selection.SELECTORS`):
a new baseline is one entry there.
"""
import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from seer_attn.modeling_seer.selection import METHOD_FIELD, SELECTORS, SPARSITY_METHODS, baseline_pairs
from seer_attn.training.cli_args import ArgValueError

METHOD_PARAM = METHOD_FIELD  # the config field of each method's parameter (the selection module's)
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


def check_param(method, value, what="param"):
    """``value`` as a float when it is a valid parameter of ``method`` (a threshold or gain is
    below 1, an nz_ratio or coverage may be 1), else ValueError naming ``what`` and the value."""
    v = float(value)
    below_one = method in ("threshold", "gain")
    ok = 0.0 < v < 1.0 if below_one else 0.0 < v <= 1.0
    if not ok or math.isnan(v):
        bound = f"0 < {method} < 1" if below_one else f"0 < {method} <= 1"
        raise ValueError(f"{what}={value!r} is invalid for method {method!r}: expected {bound}")
    return v


@dataclass(frozen=True)
class Setting:
    """One block selection to evaluate: ``dense``, or a selector + method with either a fixed
    ``param`` (threshold / nz_ratio / coverage / gain / density) or a ``target_density`` to calibrate to."""

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
            object.__setattr__(self, "param", check_param(self.method, self.param))
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
    value = check_param(setting.method, value)
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


def setting_text(value) -> str:
    """Check of a run config's setting field: the canonical string of a :class:`Setting` or
    of its string form (``gate:threshold=0.002``); ValueError for a bad one."""
    return str(Setting.parse(value))
