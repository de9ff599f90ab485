"""Evaluation: perplexity (and, later, lm-eval tasks, speed and memory)."""
from __future__ import annotations

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
