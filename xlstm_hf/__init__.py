"""xLSTM for Hugging Face transformers. Importing this package registers the model with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_xlstm import xLSTMConfig
from .convert import convert_from_xlstm_package, convert_transformers_xlstm
from .modeling_xlstm import xLSTMCache, xLSTMForCausalLM, xLSTMModel, xLSTMPreTrainedModel

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
    "convert_from_xlstm_package",
    "convert_transformers_xlstm",
    "xLSTMCache",
    "xLSTMConfig",
    "xLSTMForCausalLM",
    "xLSTMModel",
    "xLSTMPreTrainedModel",
]

# PEFT: default LoRA target modules of model_type "xlstm_hf" (block start).
# PEFT fills `target_modules=None` from its per-model-type mapping (peft.utils.TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_
# MAPPING, read by the tuners at get_peft_model time); an entry for our model_type makes `LoraConfig(task_type=
# "CAUSAL_LM")` (and DoRA, which is LoRA with use_dora=True) work without naming modules. The targets are the nn.Linear
# projections into and out of every mixer and feed-forward: the block-diagonal q/k/v and sLSTM gate maps of the paper
# stack are not nn.Linear, so LoRA cannot wrap them, and the gate projections have only one output per head.
try:
    import peft.utils as _peft_utils

    LORA_TARGET_MODULES = ["proj_up", "proj_up_gate", "proj_down", "q", "k", "v", "out_proj"]
    for _name in (
        "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
        "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
        "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
        "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
    ):
        _mapping = getattr(_peft_utils, _name, None)
        if _mapping is not None:
            _mapping.setdefault(xLSTMConfig.model_type, list(LORA_TARGET_MODULES))
    del _name, _mapping, _peft_utils
except ImportError:
    pass
# PEFT (block end).
