"""Architecture families: the only code that knows HF module names."""
from __future__ import annotations

from typing import Any

from .base import AttnView, BlockView, Family, FusedRows, Geometry, MlpView, UnsupportedModelError
from .gemma import GemmaFamily
from .llama import LlamaFamily
from .olmo2 import Olmo2Family
from .phi3 import Phi3Family

FAMILIES: dict[str, Family] = {f.name: f for f in (LlamaFamily(), GemmaFamily(), Phi3Family(), Olmo2Family())}

# Close relatives that are not handled, with what to do instead.
_HINTS = {
    "gemma3": "multimodal Gemma 3 (Gemma3ForConditionalGeneration) is not supported; the text-only "
              "gemma3_text checkpoints (e.g. google/gemma-3-1b-pt) are.",
}


def supported_model_types() -> list[str]:
    return sorted({t for f in FAMILIES.values() for t in f.model_types})


def family_for(config: Any) -> Family:
    """The family that handles a model config, or a clear error listing the supported architectures."""
    for fam in FAMILIES.values():
        if fam.matches(config):
            return fam
    mt = getattr(config, "model_type", None)
    arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
    hint = f" Note: {_HINTS[mt]}" if mt in _HINTS else ""
    raise UnsupportedModelError(
        f"llmprune does not support model_type {mt!r} (architectures: {arch}). "
        f"Supported model types: {', '.join(supported_model_types())}.{hint}"
    )


__all__ = ["AttnView", "BlockView", "FAMILIES", "Family", "FusedRows", "Geometry", "MlpView", "UnsupportedModelError",
           "family_for", "supported_model_types"]
