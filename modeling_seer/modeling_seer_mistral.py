"""SeerMistralForCausalLM: Mistral with a per-layer AttnGate and block-sparse attention.

transformers' Mistral classes composed with the layer tier (:mod:`.seer_layer`). Every layer
attends through the sliding window ``config.sliding_window`` (None: full causal), which the
layer tier honours in every mode: the block mask never selects a block wholly outside the
window and the kernels mask the blocks it cuts. The gate sees q/k before RoPE. Copied flat
into saved folders.
"""
from torch import nn
from transformers import MistralForCausalLM, MistralModel
from transformers.models.mistral.modeling_mistral import (MistralAttention, MistralDecoderLayer, MistralMLP,
                                                          MistralPreTrainedModel, MistralRMSNorm,
                                                          MistralRotaryEmbedding, apply_rotary_pos_emb,
                                                          eager_attention_forward)

from .configuration_seer_mistral import SeerMistralConfig
from .seer_layer import (SeerAttentionMixin, SeerCausalLMMixin, SeerDecoderLayerMixin, SeerForwardContext,
                         SeerModelMixin, SeerPreTrainedMixin)


class SeerMistralAttention(SeerAttentionMixin, MistralAttention):
    """MistralAttention plus an :class:`AttnGate`; the gate sees q/k before RoPE."""

    seer_rope_fn = staticmethod(apply_rotary_pos_emb)

    def __init__(self, config: SeerMistralConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # every layer slides when the config has a window (as Qwen's sliding layers name theirs,
        # so the layer tier decodes it densely: its cache holds only the window)
        self.sliding_window = getattr(config, "sliding_window", None)
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
                                           sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class SeerMistralDecoderLayer(SeerDecoderLayerMixin, MistralDecoderLayer):
    def __init__(self, config: SeerMistralConfig, layer_idx: int):
        # Same submodules as MistralDecoderLayer, with SeerMistralAttention (built once, not replaced).
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = SeerMistralAttention(config=config, layer_idx=layer_idx)
        self.mlp = MistralMLP(config)
        self.input_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SeerMistralPreTrainedModel(SeerPreTrainedMixin, MistralPreTrainedModel):
    config_class = SeerMistralConfig
    config: SeerMistralConfig
    _no_split_modules = ["SeerMistralDecoderLayer"]
    _can_record_outputs = {"hidden_states": SeerMistralDecoderLayer, "attentions": SeerMistralAttention}


class SeerMistralModel(SeerModelMixin, SeerMistralPreTrainedModel, MistralModel):
    def __init__(self, config: SeerMistralConfig):
        SeerMistralPreTrainedModel.__init__(self, config)
        self.build_seer_model(config, SeerMistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding)
        self.post_init()


class SeerMistralForCausalLM(SeerCausalLMMixin, SeerMistralPreTrainedModel, MistralForCausalLM):
    """Mistral causal LM with SeerAttention gates (modes, density, gate I/O: :class:`SeerCausalLMMixin`)."""

    def __init__(self, config: SeerMistralConfig):
        SeerMistralPreTrainedModel.__init__(self, config)
        self.build_seer_lm(config, SeerMistralModel)
        self.post_init()


SeerMistralConfig.register_for_auto_class()
SeerMistralForCausalLM.register_for_auto_class("AutoModelForCausalLM")
