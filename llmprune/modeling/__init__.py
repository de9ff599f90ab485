"""The heterogeneous architectures shipped inside every non-uniform checkpoint (one per base family).

`register()` makes every `llmprune_*` model type known to transformers' Auto classes in this
process, so checkpoints load without `trust_remote_code` when llmprune is installed.
"""
from __future__ import annotations

from .configuration_llmprune import (
    CONFIG_CLASSES,
    LlmpruneGemma2Config,
    LlmpruneGemma3TextConfig,
    LlmpruneLlamaConfig,
    LlmpruneOlmo2Config,
    LlmprunePhi3Config,
)
from .modeling_llmprune import MODEL_CLASSES, LlmpruneLlamaForCausalLM, LlmpruneLlamaModel

REMOTE_CODE_FILES = ("configuration_llmprune.py", "modeling_llmprune.py")
MODEL_TYPES = tuple(c.model_type for c in CONFIG_CLASSES)  # llmprune_llama, llmprune_gemma2, ...
_registered = False


def is_pruned_model_type(model_type: str | None) -> bool:
    """Whether a config's model_type is one of llmprune's heterogeneous architectures (needs its code)."""
    return model_type in MODEL_TYPES


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for config_cls, (model_cls, causal_cls) in MODEL_CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, causal_cls, exist_ok=True)
    _registered = True


__all__ = ["CONFIG_CLASSES", "LlmpruneGemma2Config", "LlmpruneGemma3TextConfig", "LlmpruneLlamaConfig",
           "LlmpruneLlamaForCausalLM", "LlmpruneLlamaModel", "LlmpruneOlmo2Config", "LlmprunePhi3Config",
           "MODEL_CLASSES", "MODEL_TYPES", "REMOTE_CODE_FILES", "is_pruned_model_type", "register"]
