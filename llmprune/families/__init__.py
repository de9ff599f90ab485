"""Architecture families: the only code that knows HF module names."""
from __future__ import annotations

from typing import Any

from .base import AttnView, BlockView, Family, Geometry, MlpView, UnsupportedModelError
from .llama import LlamaFamily

FAMILIES: dict[str, Family] = {"llama": LlamaFamily()}


def supported_model_types() -> list[str]:
    return sorted({t for f in FAMILIES.values() for t in f.model_types})


def family_for(config: Any) -> Family:
    """The family that handles a model config, or a clear error listing the supported architectures."""
    for fam in FAMILIES.values():
        if fam.matches(config):
            return fam
    mt = getattr(config, "model_type", None)
    arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
    raise UnsupportedModelError(
        f"llmprune does not support model_type {mt!r} (architectures: {arch}). "
        f"Supported model types: {', '.join(supported_model_types())}."
    )


__all__ = ["AttnView", "BlockView", "FAMILIES", "Family", "Geometry", "MlpView", "UnsupportedModelError",
           "family_for", "supported_model_types"]
