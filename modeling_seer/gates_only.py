"""Gates-only checkpoints: the base model's weights first, then the gates.

A gates-only folder or Hub repo holds a Seer config whose ``seer_base_model`` names the base
(a Hub id, a local folder or a ``.gguf`` file; ``seer_base_revision`` and
``seer_base_gguf_file`` pin it down), the gate tensors (``seer_gates.safetensors``), the
remote code and a model card: a few MB instead of the whole model. ``from_pretrained`` of a
Seer causal LM (:meth:`.seer_layer.SeerCausalLMMixin.from_pretrained`, which
``AutoModelForCausalLM.from_pretrained(dir_or_hub_id, trust_remote_code=True)`` reaches)
sees the field and calls :func:`load_gates_only`:

1. the base's weights: an HF checkpoint of the family (stock or Seer) loads straight into
   the Seer class, whose modules keep the stock names; a GGUF file loads, dequantised,
   through transformers' stock class and its state dict is copied over, as conversion does.
   Every weight but the gates must be found and none may be left over;
2. the gates, read from the gates-only source with the options of the call (revision,
   cache, token);
3. the returned model holds all its weights: its config no longer names the base (saving it
   writes a full folder) and ``model.seer_base_source`` records what was loaded.

A base that cannot be loaded (offline and not cached, no such repo or file, weights that do
not fit) raises one ``OSError`` line naming the checkpoint, the base and the reason.

Copied flat into saved folders (remote code): imports only the standard library, torch,
transformers and huggingface_hub (a dependency of transformers, imported inside functions).
"""
import contextlib
import logging
import os

import torch

from .configuration_seer import BASE_FIELDS
from .hub_utils import hub_call, resolve_source

#: ``from_pretrained`` options that say where the gates-only checkpoint itself is read from
SOURCE_OPTIONS = ("revision", "subfolder", "cache_dir", "force_download", "local_files_only", "token")
#: of those, the ones the base is read with too (its revision is the config's own)
BASE_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token")
#: model-building options passed on when a GGUF base loads through the stock class
GGUF_MODEL_OPTIONS = ("device_map", "attn_implementation")


def is_gates_only(config) -> bool:
    """Whether ``config`` is a gates-only checkpoint's (it names ``seer_base_model``)."""
    return bool(getattr(config, "seer_base_model", None))


def base_source(config) -> dict:
    """``{"model", "revision", "gguf_file"}`` of a gates-only config's base (None where unset)."""
    return {name[len("seer_base_"):]: getattr(config, name, None) for name in BASE_FIELDS}


def describe_base(base: dict) -> str:
    """The base in words, e.g. ``'org/name' (revision abc123, file x.gguf)``."""
    extra = [f"revision {base['revision']}" if base.get("revision") else "",
             f"file {base['gguf_file']}" if base.get("gguf_file") else ""]
    extra = ", ".join(e for e in extra if e)
    return repr(base["model"]) + (f" ({extra})" if extra else "")


def peek_config(cls, source, kwargs):
    """The config of ``source`` read with the source options in ``kwargs``, or None when it
    cannot be read (``from_pretrained`` then reports the problem itself)."""
    try:
        return cls.config_class.from_pretrained(source, **{k: kwargs[k] for k in SOURCE_OPTIONS if k in kwargs})
    except (OSError, ValueError):
        return None


class _NoLoadReport(logging.Filter):
    """Drops transformers' load report, which lists the gates as newly initialised: they are
    loaded next, and :func:`_load_base` checks the loading info itself."""

    def filter(self, record):
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _no_load_report(name="transformers.modeling_utils"):
    log, quiet = logging.getLogger(name), _NoLoadReport()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def _first_line(err) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_gates_only(cls, from_pretrained, source, config, *model_args, **kwargs):
    """Load the gates-only checkpoint ``source`` (a folder or Hub id) whose ``config`` names
    its base (see the module docstring).

    Args:
        cls: the Seer causal LM class.
        from_pretrained: transformers' own ``from_pretrained`` bound to ``cls`` (the base's
            HF checkpoint loads through it).
        source, model_args, kwargs: as ``from_pretrained`` got them; ``seer_*`` keyword
            arguments are applied to the loaded model with ``set_seer_mode``.

    Returns:
        the model (``(model, loading_info)`` with ``output_loading_info=True``).
    """
    kwargs.pop("config", None)
    want_info = kwargs.pop("output_loading_info", False)
    seer = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("seer_")}
    where = {k: kwargs.pop(k) for k in SOURCE_OPTIONS if k in kwargs}
    for k in ("proxies", "_commit_hash", "code_revision"):
        kwargs.pop(k, None)
    base = base_source(config)
    try:
        model, info = _load_base(cls, from_pretrained, base, config, model_args,
                                 {k: v for k, v in where.items() if k in BASE_OPTIONS}, kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise OSError(f"{source} is a gates-only SeerAttention checkpoint whose base model {describe_base(base)} "
                      f"could not be loaded: {_first_line(err)}") from None
    src, local = resolve_source(source)
    if local and where.get("subfolder"):
        src = os.path.join(src, where["subfolder"])
    model.load_gates(src, **({} if local else where))
    for name in BASE_FIELDS:
        setattr(model.config, name, None)
    model.config._name_or_path = model.name_or_path = str(source)
    model.seer_base_source = base
    if seer:
        model.set_seer_mode(seer.pop("seer_mode", model.config.seer_mode), **seer)
    return (model, info) if want_info else model


def _load_base(cls, from_pretrained, base, config, model_args, opts, kwargs):
    """The Seer model with the base's weights and untrained gates, and the loading info."""
    path, local = resolve_source(base["model"])
    gguf = base["gguf_file"]
    if local and gguf is None and os.path.isfile(path) and path.lower().endswith(".gguf"):
        path, gguf = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not local and base["revision"]:
        opts = {**opts, "revision": base["revision"]}

    def load(fn, *args, **kw):
        return fn(*args, **kw) if local else hub_call(path, fn, *args, **kw)

    if gguf is None:
        with _no_load_report():
            model, info = load(from_pretrained, path, *model_args, config=config, output_loading_info=True,
                               **{"ignore_mismatched_sizes": True, **opts, **kwargs})
        _check_fit(info["missing_keys"], info["unexpected_keys"], info.get("mismatched_keys"), base)
        return model, info
    from transformers import AutoModelForCausalLM
    dtype = kwargs.get("dtype")
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    stock = load(AutoModelForCausalLM.from_pretrained, path, gguf_file=gguf, dtype=dtype, **opts,
                 **{k: kwargs[k] for k in GGUF_MODEL_OPTIONS if k in kwargs})
    return _stock_onto_seer(cls, config, stock, base)


def _check_fit(missing, unexpected, mismatched, base):
    missing = sorted(k for k in missing if ".attn_gate." not in k)
    if missing or unexpected or mismatched:
        shapes = sorted(m[0] if isinstance(m, tuple) else m for m in mismatched or [])
        raise ValueError(f"its weights do not fit the gates' model: missing {missing[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}, of another shape {shapes[:3]}")


def _stock_onto_seer(cls, config, stock, base):
    """A ``cls`` model built from ``config`` holding the weights of the stock model ``stock``
    (the same module names; gates new), in the dtypes ``from_pretrained`` gives a full folder:
    weights and gates in the stock model's dtype, the RoPE tables (buffers that are not saved)
    in float32 as built. Casting those to bfloat16 changed every position's rotation but the
    first (the gates-only model's logits then left the full folder's on the GPU)."""
    param = next(stock.parameters())
    config._attn_implementation = stock.config._attn_implementation
    default = torch.get_default_dtype()
    torch.set_default_dtype(param.dtype)  # as from_pretrained builds a model (RoPE tables ask for float32)
    try:
        with torch.device(param.device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    res = model.load_state_dict(stock.state_dict(), strict=False)
    _check_fit(res.missing_keys, res.unexpected_keys, None, base)
    model.generation_config = stock.generation_config
    return model.eval(), {"missing_keys": [k for k in res.missing_keys], "unexpected_keys": [],
                          "mismatched_keys": [], "error_msgs": []}
