"""The heterogeneous architecture shipped inside every non-uniform checkpoint.

`register()` makes `llmprune_llama` known to transformers' Auto classes in this process, so
checkpoints load without `trust_remote_code` when llmprune is installed.
"""
from __future__ import annotations

from .configuration_llmprune import LlmpruneLlamaConfig
from .modeling_llmprune import LlmpruneLlamaForCausalLM, LlmpruneLlamaModel

REMOTE_CODE_FILES = ("configuration_llmprune.py", "modeling_llmprune.py")
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(LlmpruneLlamaConfig.model_type, LlmpruneLlamaConfig, exist_ok=True)
    AutoModel.register(LlmpruneLlamaConfig, LlmpruneLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(LlmpruneLlamaConfig, LlmpruneLlamaForCausalLM, exist_ok=True)
    _registered = True


__all__ = ["LlmpruneLlamaConfig", "LlmpruneLlamaForCausalLM", "LlmpruneLlamaModel", "REMOTE_CODE_FILES",
           "register"]
