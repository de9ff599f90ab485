"""PruneContext: everything a pruner may use (model, family, budget, calibration tokens, device)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ContextManager

import torch
from torch import nn

from ..calibrate.walker import BlockLoader, on_device
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
    # Streaming (stream.py): `model` is a skeleton on the meta device and this loader reads a block's
    # weights from disk while it is needed. Pruners touch block weights only inside `on_device(i)`.
    loader: BlockLoader | None = None

    def on_device(self, index: int) -> ContextManager[Any]:
        """Block `index`'s weights are real while active (always, for an in-memory model)."""
        return on_device(self.loader, index)

    @cached_property
    def geometry(self) -> list[Geometry]:
        return self.family.geometry(self.model)

    def require_tokens(self) -> torch.Tensor:
        if self.tokens is None:
            raise ValueError("this pruner needs calibration data, but none was given")
        return self.tokens
