"""SeerMistralConfig: a MistralConfig plus the ``seer_*`` fields of SeerAttention.

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
from transformers import MistralConfig

from .configuration_seer import SeerConfigMixin


class SeerMistralConfig(SeerConfigMixin, MistralConfig):
    """Configuration of :class:`SeerMistralForCausalLM`: every field of
    :class:`~transformers.MistralConfig` plus the ``seer_*`` fields of :class:`SeerConfigMixin`."""

    model_type = "seer_mistral"
