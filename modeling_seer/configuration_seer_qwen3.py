"""SeerQwen3Config: a Qwen3Config plus the ``seer_*`` fields of SeerAttention.

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
from transformers import Qwen3Config

from .configuration_seer import SeerConfigMixin


class SeerQwen3Config(SeerConfigMixin, Qwen3Config):
    """Configuration of :class:`SeerQwen3ForCausalLM`: every field of
    :class:`~transformers.Qwen3Config` plus the ``seer_*`` fields of :class:`SeerConfigMixin`."""

    model_type = "seer_qwen3"
