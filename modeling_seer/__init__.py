"""SeerLlama: configuration, AttnGate, model, conversion and Auto-class registration."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_seer_llama import SeerLlamaConfig
from .gate import AttnGate, block_pool, causal_density, gate_distill_loss, select_blocks, select_blocks_for
from .modeling_seer_llama import SeerForwardContext, SeerLlamaForCausalLM, SeerLlamaModel

AutoConfig.register("seer_llama", SeerLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(SeerLlamaConfig, SeerLlamaForCausalLM, exist_ok=True)

__all__ = ["SeerLlamaConfig", "SeerLlamaForCausalLM", "SeerLlamaModel", "AttnGate", "SeerForwardContext",
           "block_pool", "causal_density", "gate_distill_loss", "select_blocks",
           "select_blocks_for"]
