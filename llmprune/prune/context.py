"""PruneContext: everything a pruner may use (model, family, budget, calibration tokens, device)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from ..families import Family
from ..families.base import Geometry


@dataclass
class PruneContext:
    """Everything a pruner may use. `tokens` is None when the pruner needs no calibration data."""

    model: nn.Module
    family: Family
    sparsity: float
    tokens: torch.Tensor | None = None  # [nsamples, seqlen] int64
    batch_size: int = 8
    device: torch.device | str | None = None
    offload: bool = False
    seed: int = 0
    progress: bool = True
    extras: dict = field(default_factory=dict)

    @cached_property
    def geometry(self) -> list[Geometry]:
        return self.family.geometry(self.model)

    def require_tokens(self) -> torch.Tensor:
        if self.tokens is None:
            raise ValueError("this pruner needs calibration data, but none was given")
        return self.tokens
