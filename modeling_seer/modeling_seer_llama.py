"""SeerLlamaForCausalLM: Llama with a per-layer AttnGate and block-sparse attention.

transformers' Llama classes composed with the layer tier (:mod:`.seer_layer`, which
documents the modes); only the Llama-specific wiring is here. This file is copied flat into
saved folders; ``remote_bundle.py`` rewrites package imports and copies what it reaches.
"""
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP,
                                                      LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb, eager_attention_forward)

from .configuration_seer_llama import SeerLlamaConfig
# names importers used before the layer tier existed
from .seer_layer import GATES_FILE, SeerCausalLMOutputWithPast, SeerForwardContext  # noqa: F401
from .seer_layer import (SeerAttentionMixin, SeerCausalLMMixin, SeerDecoderLayerMixin, SeerModelMixin,
                         SeerPreTrainedMixin)


class SeerLlamaAttention(SeerAttentionMixin, LlamaAttention):
    """LlamaAttention plus an :class:`AttnGate`; the gate sees q/k before RoPE."""

    seer_rope_fn = staticmethod(apply_rotary_pos_emb)

    def __init__(self, config: SeerLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.init_seer_gate(config)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, seer_ctx: SeerForwardContext | None = None, **kwargs):
        cache = past_key_values if past_key_values is not None else cache
        input_shape = hidden_states.shape[:-1]
        q_pre, k_pre, v = self.seer_project(hidden_states)
        q, k = self.seer_rotary(q_pre, k_pre, position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, weights = self.seer_attention(q, k, v, q_pre, k_pre, attention_mask, seer_ctx, eager_attention_forward,
                                           **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class SeerLlamaDecoderLayer(SeerDecoderLayerMixin, LlamaDecoderLayer):
    def __init__(self, config: SeerLlamaConfig, layer_idx: int):
        # Same submodules as LlamaDecoderLayer, with SeerLlamaAttention (built once, not replaced).
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = SeerLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SeerLlamaPreTrainedModel(SeerPreTrainedMixin, LlamaPreTrainedModel):
    config_class = SeerLlamaConfig
    config: SeerLlamaConfig
    _no_split_modules = ["SeerLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": SeerLlamaDecoderLayer, "attentions": SeerLlamaAttention}


class SeerLlamaModel(SeerModelMixin, SeerLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: SeerLlamaConfig):
        SeerLlamaPreTrainedModel.__init__(self, config)
        self.build_seer_model(config, SeerLlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding)
        self.post_init()


class SeerLlamaForCausalLM(SeerCausalLMMixin, SeerLlamaPreTrainedModel, LlamaForCausalLM):
    """Llama causal LM with SeerAttention gates (modes, density, gate I/O: :class:`SeerCausalLMMixin`)."""

    def __init__(self, config: SeerLlamaConfig):
        SeerLlamaPreTrainedModel.__init__(self, config)
        self.build_seer_lm(config, SeerLlamaModel)
        self.post_init()


SeerLlamaConfig.register_for_auto_class()
SeerLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
