"""Registration with transformers' Auto classes and PEFT's default LoRA targets, run by modeling_xlstm.py at its end.

It runs alike for `import xlstm_hf` and for a Hub copy of the modeling files loaded with `trust_remote_code=True` on
a machine without the package, where transformers leaves two things undone:
- It registers a remote model class with AutoModelForCausalLM only when it finds no local code for the config class,
  and it looks the config class up by `__name__`: ours shares `xLSTMConfig` with transformers' built-in xLSTM, so the
  class stays unregistered and `pipeline("text-generation", ...)` logs that the model is not supported (the pipeline
  accepts the names of its static table and of the registered classes).
- It never registers a remote config with AutoConfig, and `AutoTokenizer.from_pretrained(path)` reads config.json
  through AutoConfig before the tokenizer files: without the registration it asks again whether to trust the code
  (an interactive prompt) even after the model was loaded with trust_remote_code=True.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# PEFT fills `target_modules=None` from its per-model-type mappings (read when get_peft_model wraps the model), so an
# entry makes `LoraConfig(task_type="CAUSAL_LM")` (DoRA included) work without naming modules. The targets are the
# nn.Linear projections into and out of every mixer and feed-forward: the paper stack's block-diagonal q/k/v and sLSTM
# gate maps are not nn.Linear, and the gate projections have one output per head.
LORA_TARGET_MODULES = ["proj_up", "proj_up_gate", "proj_down", "q", "k", "v", "out_proj"]
PEFT_TARGET_MAPPINGS = (
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING",
)


def register(
    config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel], causal_lm_class: type[PreTrainedModel]
) -> None:
    """Map `config_class.model_type` to the classes in AutoConfig, AutoModel and AutoModelForCausalLM (keyed by class
    object: the built-in `xlstm` keeps resolving to transformers' own classes), mark them for `auto_map` on save, and
    register PEFT's default LoRA targets (see `register_peft_targets`)."""
    AutoConfig.register(config_class.model_type, config_class)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)
    # save_pretrained / push_to_hub then write `auto_map` and copy the modeling files beside the weights
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
    causal_lm_class.register_for_auto_class("AutoModelForCausalLM")
    # Trainer(label_smoothing_factor > 0) shifts the labels for the smoothed loss only when `model._get_name()` is a
    # value of this static table (registering with AutoModelForCausalLM does not add to it); without the entry it
    # smooths against unshifted labels. Keyed by our own model_type, which is in no config table, so no Auto lookup
    # resolves it. tests/test_continuous_batching_and_smoothing.py fails if the Trainer stops shifting for this class.
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(config_class.model_type, causal_lm_class.__name__)
    register_peft_targets(config_class.model_type)


def register_peft_targets(model_type: str) -> None:
    """Add `model_type` to PEFT's target mappings now if peft is imported, else right after its first import.

    Importing peft here would cost every process that imports the model, PEFT user or not, peft's import time and its
    import of bitsandbytes when installed (bitsandbytes 0.50 with `kernels` prints on CPU that a kernel failed to
    load)."""
    if "peft" in sys.modules:
        _add_peft_targets(model_type)
    else:
        sys.meta_path.insert(0, _AfterImport("peft", lambda: _add_peft_targets(model_type)))


def _add_peft_targets(model_type: str) -> None:
    try:  # inside try: transformers' remote-code import scan then does not require peft
        import peft.utils
    except ImportError:
        return
    for name in PEFT_TARGET_MAPPINGS:
        getattr(peft.utils, name, {}).setdefault(model_type, list(LORA_TARGET_MODULES))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback()` once module `name` has executed, without importing it: at the first import of `name` it asks
    the other finders for the spec and wraps the loader's `exec_module`, then leaves `sys.meta_path`."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback
        self.searching = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name or self.searching:
            return None
        self.searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return None  # the import goes on (or fails) as if this finder were not there
        exec_module = loader.exec_module

        def exec_then_call(module: ModuleType) -> None:
            exec_module(module)
            if self in sys.meta_path:  # removed here, not while the import machinery iterates over sys.meta_path
                sys.meta_path.remove(self)
            self.callback()

        loader.exec_module = exec_then_call
        return spec
