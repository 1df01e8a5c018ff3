"""xLSTM for Hugging Face transformers. Importing this package registers the model with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_xlstm import xLSTMConfig
from .convert import convert_from_xlstm_package, convert_transformers_xlstm
from .modeling_xlstm import LORA_TARGET_MODULES, xLSTMCache, xLSTMForCausalLM, xLSTMModel, xLSTMPreTrainedModel

AutoConfig.register(xLSTMConfig.model_type, xLSTMConfig)
# The model mappings are keyed by the config class's __name__, which transformers' own xLSTMConfig shares: exist_ok
# re-keys them by class object, so the built-in `xlstm` and ours both resolve (see shared/FACTS.md).
AutoModel.register(xLSTMConfig, xLSTMModel, exist_ok=True)
AutoModelForCausalLM.register(xLSTMConfig, xLSTMForCausalLM, exist_ok=True)
# save_pretrained / push_to_hub write `auto_map` and copy the modeling files, so that the checkpoint loads with
# trust_remote_code=True on a machine without this package.
xLSTMConfig.register_for_auto_class()
xLSTMModel.register_for_auto_class("AutoModel")
xLSTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

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
