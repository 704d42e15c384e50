"""SeerQwen2ForCausalLM: Qwen2 with a per-layer AttnGate and block-sparse attention.

transformers' Qwen2 classes composed with the layer tier (:mod:`.seer_layer`). Qwen2's q/k/v
projections carry a bias: the gate sees q and k after it, before RoPE. Sliding-window layers
(``use_sliding_window``) pass their window to the layer tier, which never selects a block
outside it and masks the blocks it cuts. Copied flat into saved folders.
"""
from torch import nn
from transformers import Qwen2ForCausalLM, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import (Qwen2Attention, Qwen2DecoderLayer, Qwen2MLP,
                                                      Qwen2PreTrainedModel, Qwen2RMSNorm, Qwen2RotaryEmbedding,
                                                      apply_rotary_pos_emb, eager_attention_forward)

from .configuration_seer_qwen2 import SeerQwen2Config
from .seer_layer import (SeerAttentionMixin, SeerCausalLMMixin, SeerDecoderLayerMixin, SeerForwardContext,
                         SeerModelMixin, SeerPreTrainedMixin)


class SeerQwen2Attention(SeerAttentionMixin, Qwen2Attention):
    """Qwen2Attention plus an :class:`AttnGate`; the gate sees q/k (bias included) before RoPE."""

    seer_rope_fn = staticmethod(apply_rotary_pos_emb)

    def __init__(self, config: SeerQwen2Config, layer_idx: int):
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
                                           sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class SeerQwen2DecoderLayer(SeerDecoderLayerMixin, Qwen2DecoderLayer):
    def __init__(self, config: SeerQwen2Config, layer_idx: int):
        # Same submodules as Qwen2DecoderLayer, with SeerQwen2Attention (built once, not replaced).
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = SeerQwen2Attention(config=config, layer_idx=layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention_type = config.layer_types[layer_idx]


class SeerQwen2PreTrainedModel(SeerPreTrainedMixin, Qwen2PreTrainedModel):
    config_class = SeerQwen2Config
    config: SeerQwen2Config
    _no_split_modules = ["SeerQwen2DecoderLayer"]
    _can_record_outputs = {"hidden_states": SeerQwen2DecoderLayer, "attentions": SeerQwen2Attention}


class SeerQwen2Model(SeerModelMixin, SeerQwen2PreTrainedModel, Qwen2Model):
    def __init__(self, config: SeerQwen2Config):
        SeerQwen2PreTrainedModel.__init__(self, config)
        self.build_seer_model(config, SeerQwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()


class SeerQwen2ForCausalLM(SeerCausalLMMixin, SeerQwen2PreTrainedModel, Qwen2ForCausalLM):
    """Qwen2 causal LM with SeerAttention gates (modes, density, gate I/O: :class:`SeerCausalLMMixin`)."""

    def __init__(self, config: SeerQwen2Config):
        SeerQwen2PreTrainedModel.__init__(self, config)
        self.build_seer_lm(config, SeerQwen2Model)
        self.post_init()


SeerQwen2Config.register_for_auto_class()
SeerQwen2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
