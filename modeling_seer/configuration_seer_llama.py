"""SeerLlamaConfig: a LlamaConfig plus the ``seer_*`` fields of SeerAttention.

Copied flat into saved model folders (remote code): imports only torch/transformers.
"""
from transformers import LlamaConfig

from .configuration_seer import SeerConfigMixin
# names importers used before the layer tier existed
from .configuration_seer import (BOOL_FIELDS, DISTILL_TARGETS, FLOAT_FIELDS, INT_FIELDS,  # noqa: F401
                                 POOLING_TYPES, SEER_MODES, STRUCTURAL_FIELDS)
from .selection import SELECTORS, SPARSITY_METHODS  # noqa: F401


class SeerLlamaConfig(SeerConfigMixin, LlamaConfig):
    """Configuration of :class:`SeerLlamaForCausalLM`: every field of
    :class:`~transformers.LlamaConfig` plus the ``seer_*`` fields of :class:`SeerConfigMixin`."""

    model_type = "seer_llama"
