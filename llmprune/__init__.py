"""llmprune: post-training structured pruning for Hugging Face causal LMs."""
from __future__ import annotations

__version__ = "0.1.0"

from .modeling import register as _register

_register()

__all__ = ["__version__"]
