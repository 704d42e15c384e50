"""SeerQwen2Config: a Qwen2Config plus the ``seer_*`` fields of SeerAttention.

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
from transformers import Qwen2Config

from .configuration_seer import SeerConfigMixin


class SeerQwen2Config(SeerConfigMixin, Qwen2Config):
    """Configuration of :class:`SeerQwen2ForCausalLM`: every field of
    :class:`~transformers.Qwen2Config` plus the ``seer_*`` fields of :class:`SeerConfigMixin`."""

    model_type = "seer_qwen2"
