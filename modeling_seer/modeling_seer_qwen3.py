"""SeerQwen3ForCausalLM: Qwen3 with a per-layer AttnGate and block-sparse attention.

transformers' Qwen3 classes composed with the layer tier (:mod:`.seer_layer`). Qwen3 applies
an RMSNorm per head to q and k before RoPE: the gate sees q and k after that norm, before
RoPE. Sliding-window layers (``use_sliding_window``) pass their window to the layer tier.
Copied flat into saved folders.
"""
from torch import nn
from transformers import Qwen3ForCausalLM, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import (Qwen3Attention, Qwen3DecoderLayer, Qwen3MLP,
                                                      Qwen3PreTrainedModel, Qwen3RMSNorm, Qwen3RotaryEmbedding,
                                                      apply_rotary_pos_emb, eager_attention_forward)

from .configuration_seer_qwen3 import SeerQwen3Config
from .merged_projections import qkv as project_qkv
from .seer_layer import (SeerAttentionMixin, SeerCausalLMMixin, SeerDecoderLayerMixin, SeerForwardContext,
                         SeerModelMixin, SeerPreTrainedMixin)


class SeerQwen3Attention(SeerAttentionMixin, Qwen3Attention):
    """Qwen3Attention plus an :class:`AttnGate`; the gate sees q/k after the per-head norm, before RoPE."""

    seer_rope_fn = staticmethod(apply_rotary_pos_emb)

    def __init__(self, config: SeerQwen3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.init_seer_gate(config)

    def seer_project(self, hidden_states):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = project_qkv(self, hidden_states)
        q_pre = self.q_norm(q.view(hidden_shape)).transpose(1, 2)
        k_pre = self.k_norm(k.view(hidden_shape)).transpose(1, 2)
        return q_pre, k_pre, v.view(hidden_shape).transpose(1, 2)

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


class SeerQwen3DecoderLayer(SeerDecoderLayerMixin, Qwen3DecoderLayer):
    def __init__(self, config: SeerQwen3Config, layer_idx: int):
        # Same submodules as Qwen3DecoderLayer, with SeerQwen3Attention (built once, not replaced).
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = SeerQwen3Attention(config=config, layer_idx=layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SeerQwen3PreTrainedModel(SeerPreTrainedMixin, Qwen3PreTrainedModel):
    config_class = SeerQwen3Config
    config: SeerQwen3Config
    _no_split_modules = ["SeerQwen3DecoderLayer"]
    _can_record_outputs = {"hidden_states": SeerQwen3DecoderLayer, "attentions": SeerQwen3Attention}


class SeerQwen3Model(SeerModelMixin, SeerQwen3PreTrainedModel, Qwen3Model):
    def __init__(self, config: SeerQwen3Config):
        SeerQwen3PreTrainedModel.__init__(self, config)
        self.build_seer_model(config, SeerQwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()


class SeerQwen3ForCausalLM(SeerCausalLMMixin, SeerQwen3PreTrainedModel, Qwen3ForCausalLM):
    """Qwen3 causal LM with SeerAttention gates (modes, density, gate I/O: :class:`SeerCausalLMMixin`)."""

    def __init__(self, config: SeerQwen3Config):
        SeerQwen3PreTrainedModel.__init__(self, config)
        self.build_seer_lm(config, SeerQwen3Model)
        self.post_init()


SeerQwen3Config.register_for_auto_class()
SeerQwen3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
