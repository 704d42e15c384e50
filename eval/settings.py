"""Block-selection settings: what one row of a comparison runs, and putting a model in it.

A setting is written ``SELECTOR:METHOD=PARAM`` (fixed parameter, e.g.
``gate:threshold=2e-3``, or ``gate:density=0.1``, which keeps 0.1 of the causal blocks in
every layer without calibration), ``SELECTOR:METHOD@DENSITY`` (parameter calibrated so that the kept
share of causal blocks is ``DENSITY``, e.g. ``streaming:nz_ratio@0.21``,
:mod:`seer_attn.eval.calibration`) or ``dense``. The selectors, their labels and baseline
methods come from the selector registry (:data:`seer_attn.modeling_seer.selection.SELECTORS`):
a new baseline is one entry there.

A decode setting (sparse decode, used by ``seer-attn decode-quality`` and ``seer-attn eval
--decode``) is written ``share=X``, ``budget=N`` or ``mass=P`` with optional ``,local=N``,
``,prior=A``, ``,keys=f8`` / ``,keys=i8`` and ``,oracle`` / ``,streaming`` parts (:func:`decode_setting`), or
``dense``.
"""
import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from seer_attn.modeling_seer.selection import (DECODE_KEY_FORMATS, METHOD_FIELD, SELECTORS, SPARSITY_METHODS,
                                               baseline_pairs)
from seer_attn.training import cli_args as ca
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


# -- decode settings (sparse decode, docs/design.md §2 "Decode") ----------------------------------

#: the gate-key format (``seer_decode_key_format``) of a decode setting without ``keys=``: the model's dtype, as
#: every run up to session 47 measured it (a model's own default is int8 since then)
SETTING_KEY_FORMAT = "model"


def decode_setting(value):
    """``dense``, or ``share=X`` / ``budget=N`` / ``mass=P`` followed by optional ``,local=N``
    (full blocks before the current one always read), ``,prior=A`` (``seer_decode_meanpool_prior``),
    ``,keys=i8`` / ``,keys=f8`` / ``,keys=model`` (the gate's block keys, ``seer_decode_key_format``: a
    setting without ``keys=`` keeps them in the model's dtype, as every run up to session 47 measured them,
    though a model's own default is ``i8`` since then)
    and ``,oracle`` / ``,streaming`` (the comparison selectors of ``seer_decode_selector``), as the
    ``seer_*`` options that set that decode
    selection (``{}``: dense decode)."""
    if value == "dense":
        return {}
    head, *extras = str(value).split(",")
    name, _, val = head.partition("=")
    if name == "share":
        out = {"seer_decode_method": "share", "seer_decode_share": ca.unit_interval(val)}
    elif name == "budget":
        out = {"seer_decode_method": "budget", "seer_decode_budget": ca.int_at_least(128)(val)}
    elif name == "mass":
        out = {"seer_decode_method": "mass", "seer_decode_mass": ca.unit_interval(val)}
    else:
        raise ca.ArgValueError(f"invalid decode setting {value!r}: expected dense, share=X, budget=N or mass=P, "
                               "optionally followed by ,local=N, ,prior=A, ,keys=i8|f8|model and ,oracle or ,streaming")
    for extra in extras:
        key, _, val = extra.partition("=")
        if key == "local" and "seer_decode_keep_local" not in out:
            out["seer_decode_keep_local"] = ca.int_at_least(0)(val)
        elif key == "prior" and "seer_decode_meanpool_prior" not in out:
            out["seer_decode_meanpool_prior"] = ca.float_in(0, 1, low_open=False)(val)
        elif key == "keys" and val in DECODE_KEY_FORMATS and "seer_decode_key_format" not in out:
            out["seer_decode_key_format"] = val
        elif key in ("oracle", "streaming") and not val and "seer_decode_selector" not in out:
            out["seer_decode_selector"] = key
        else:
            raise ca.ArgValueError(f"invalid part {extra!r} of decode setting {value!r}: expected local=N, "
                                   "prior=A, keys=i8, keys=f8, keys=model, oracle or streaming (each at most once)")
    if out.get("seer_decode_meanpool_prior") and out.get("seer_decode_selector"):
        raise ca.ArgValueError(f"invalid decode setting {value!r}: prior=A mixes the decode gate's scores; the "
                               f"{out['seer_decode_selector']} selector has none")
    if out.get("seer_decode_key_format") and out.get("seer_decode_selector"):
        raise ca.ArgValueError(f"invalid decode setting {value!r}: keys=... stores the decode gate's keys; the "
                               f"{out['seer_decode_selector']} selector scores none")
    return out


def decode_setting_text(value):
    """Check: a decode setting (:func:`decode_setting`) in its canonical spelling (``share=0.1``)."""
    return decode_setting_name(decode_setting(value))


def apply_decode(model, setting, prefill="dense", prefill_opts=None):
    """Set ``model`` to a prefill mode and a decode setting (:func:`decode_setting`; the options
    a setting leaves out, ``local`` and the selector, go back to their defaults)."""
    setting = {"seer_decode_keep_local": 0, "seer_decode_selector": "gate", "seer_decode_meanpool_prior": 0.0,
               "seer_decode_key_format": SETTING_KEY_FORMAT, **setting} if setting else {}
    model.set_seer_mode(prefill, seer_decode_sparsity=bool(setting), **setting, **(prefill_opts or {}))


def decode_setting_of(model) -> dict:
    """The decode setting ``model`` is set to, as :func:`decode_setting` writes it (``{}``: dense decode)."""
    cfg = model.config
    if not getattr(cfg, "seer_decode_sparsity", False):
        return {}
    method = cfg.seer_decode_method
    field = f"seer_decode_{method}"  # each method's parameter (threshold's too, which settings do not spell)
    return {"seer_decode_method": method, field: getattr(cfg, field),
            "seer_decode_keep_local": cfg.seer_decode_keep_local, "seer_decode_selector": cfg.seer_decode_selector,
            "seer_decode_meanpool_prior": cfg.seer_decode_meanpool_prior,
            "seer_decode_key_format": cfg.seer_decode_key_format}


def decode_setting_name(setting):
    """The canonical spelling of a decode setting's options (:func:`decode_setting`'s inverse)."""
    if not setting:
        return "dense"
    if setting["seer_decode_method"] == "share":
        name = f"share={setting['seer_decode_share']:g}"
    elif setting["seer_decode_method"] == "mass":
        name = f"mass={setting['seer_decode_mass']:g}"
    elif setting["seer_decode_method"] == "budget":
        name = f"budget={setting['seer_decode_budget']}"
    else:
        name = setting["seer_decode_method"]
    if setting.get("seer_decode_keep_local"):
        name += f",local={setting['seer_decode_keep_local']}"
    if setting.get("seer_decode_meanpool_prior"):
        name += f",prior={setting['seer_decode_meanpool_prior']:g}"
    if setting.get("seer_decode_key_format", SETTING_KEY_FORMAT) != SETTING_KEY_FORMAT:
        name += f",keys={setting['seer_decode_key_format']}"
    return name + (f",{setting['seer_decode_selector']}" if setting.get("seer_decode_selector", "gate") != "gate"
                   else "")
