"""xLSTM for Hugging Face transformers. Importing this package registers the model with the Auto classes (the
modeling file does it as it loads, `registration.register`, so that a Hub copy run with trust_remote_code does too)."""

from .configuration_xlstm import xLSTMConfig
from .convert import convert_from_xlstm_package, convert_transformers_xlstm
from .modeling_xlstm import xLSTMCache, xLSTMForCausalLM, xLSTMModel, xLSTMPreTrainedModel
from .registration import LORA_TARGET_MODULES

__all__ = [
    "LORA_TARGET_MODULES",
    "convert_from_xlstm_package",
    "convert_transformers_xlstm",
    "xLSTMCache",
    "xLSTMConfig",
    "xLSTMForCausalLM",
    "xLSTMModel",
    "xLSTMPreTrainedModel",
]
