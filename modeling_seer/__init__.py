"""Seer models: the layer tier, the families (registry: :mod:`.families`), conversion and
Auto-class registration."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_seer_llama import SeerLlamaConfig
from .families import FAMILIES
from .gate import AttnGate, gate_distill_loss
from .modeling_seer_llama import SeerLlamaForCausalLM, SeerLlamaModel
from .seer_layer import SeerForwardContext
from .selection import SELECTORS, Selector, block_pool, causal_density, register_selector, select_blocks, \
    select_blocks_for, selection_density

for _fam in FAMILIES.values():
    AutoConfig.register(_fam.seer_model_type, _fam.seer_config_class, exist_ok=True)
    AutoModelForCausalLM.register(_fam.seer_config_class, _fam.seer_model_class, exist_ok=True)

__all__ = ["SeerLlamaConfig", "SeerLlamaForCausalLM", "SeerLlamaModel", "AttnGate", "SeerForwardContext",
           "block_pool", "causal_density", "gate_distill_loss", "select_blocks", "select_blocks_for",
           "selection_density", "FAMILIES", "SELECTORS", "Selector", "register_selector"]
