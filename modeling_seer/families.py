"""The model-family registry: one :class:`Family` row per supported architecture.

Conversion, the remote-code bundle, FSDP wrapping and the trainer read these rows; adding a
family is a configuration + modeling file pair and one :func:`register_family` row.
Classes are named, not imported, so that this module stays standard-library only (the
remote-code writer reads it, and it is copied into saved folders); the ``*_class``
properties import them on first use.
"""
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One model family.

    Args:
        name: short name (``"llama"``).
        stock_model_type / seer_model_type: ``config.model_type`` of the stock and Seer models.
        stock_config / stock_model: class names in ``transformers`` (e.g. ``"LlamaForCausalLM"``).
        seer_config / seer_model: class names in ``config_module`` / ``modeling_module``.
        decoder_layer: Seer decoder layer class name, the FSDP wrap unit.
        config_module / modeling_module: module names under this package, the entry points of
            the remote-code bundle.
    """

    name: str
    stock_model_type: str
    seer_model_type: str
    stock_config: str
    stock_model: str
    seer_config: str
    seer_model: str
    decoder_layer: str
    config_module: str
    modeling_module: str

    @property
    def bundle_modules(self) -> tuple:
        return (self.config_module, self.modeling_module)

    @property
    def stock_config_class(self):
        return getattr(importlib.import_module("transformers"), self.stock_config)

    @property
    def stock_model_class(self):
        return getattr(importlib.import_module("transformers"), self.stock_model)

    @property
    def seer_config_class(self):
        return getattr(importlib.import_module(f".{self.config_module}", __package__), self.seer_config)

    @property
    def seer_model_class(self):
        return getattr(importlib.import_module(f".{self.modeling_module}", __package__), self.seer_model)


#: name -> :class:`Family`.
FAMILIES: dict = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to :data:`FAMILIES`; ValueError if a name or model type is taken."""
    taken = {t for f in FAMILIES.values() for t in (f.name, f.stock_model_type, f.seer_model_type)}
    clash = [t for t in (family.name, family.stock_model_type, family.seer_model_type) if t in taken]
    if clash:
        raise ValueError(f"family {family.name!r}: {clash} already registered")
    FAMILIES[family.name] = family
    return family


def family_for(model_type: str) -> Family:
    """The family whose stock or Seer ``model_type`` is ``model_type``; ValueError otherwise."""
    for fam in FAMILIES.values():
        if model_type in (fam.stock_model_type, fam.seer_model_type):
            return fam
    known = sorted(t for f in FAMILIES.values() for t in (f.stock_model_type, f.seer_model_type))
    raise ValueError(f"model_type {model_type!r} has no Seer family: expected one of {known}")


register_family(Family("llama", "llama", "seer_llama", "LlamaConfig", "LlamaForCausalLM", "SeerLlamaConfig",
                       "SeerLlamaForCausalLM", "SeerLlamaDecoderLayer", "configuration_seer_llama",
                       "modeling_seer_llama"))
register_family(Family("qwen2", "qwen2", "seer_qwen2", "Qwen2Config", "Qwen2ForCausalLM", "SeerQwen2Config",
                       "SeerQwen2ForCausalLM", "SeerQwen2DecoderLayer", "configuration_seer_qwen2",
                       "modeling_seer_qwen2"))
register_family(Family("qwen3", "qwen3", "seer_qwen3", "Qwen3Config", "Qwen3ForCausalLM", "SeerQwen3Config",
                       "SeerQwen3ForCausalLM", "SeerQwen3DecoderLayer", "configuration_seer_qwen3",
                       "modeling_seer_qwen3"))
register_family(Family("mistral", "mistral", "seer_mistral", "MistralConfig", "MistralForCausalLM",
                       "SeerMistralConfig", "SeerMistralForCausalLM", "SeerMistralDecoderLayer",
                       "configuration_seer_mistral", "modeling_seer_mistral"))
