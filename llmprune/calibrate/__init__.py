"""Layer-by-layer calibration: run the model one block at a time and collect float64 statistics."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..families import Family, family_for
from .hooks import SITES, record, site_modules
from .stats import BlockSimilarity, RunningMoments, Stats, site_name
from .walker import BlockLoader, BlockWalker, on_device


@torch.no_grad()
def calibrate(model: nn.Module, tokens: torch.Tensor, sites: Iterable[str] = ("attn.o_in", "mlp.down_in"),
              family: Family | None = None, batch_size: int = 8, device: torch.device | str | None = None,
              offload: bool = False, progress: bool = True, loader: BlockLoader | None = None) -> Stats:
    """Statistics of the dense model at `sites` of every layer, in one block-by-block pass.

    Each block sees the dense output of the previous one (no error propagation).
    """
    family = family or family_for(model.config)
    sites = tuple(sites)
    walker = BlockWalker(model, family, tokens, batch_size=batch_size, device=device, offload=offload, loader=loader)
    stats = Stats(n_tokens=walker.n_tokens)
    for i in tqdm(range(len(walker.layers)), desc="calibrating", unit="layer", disable=not progress):
        with on_device(loader, i), record(site_modules(family.block(model, i), sites), stats):
            walker.advance_through(i)
    return stats


__all__ = ["BlockLoader", "BlockSimilarity", "BlockWalker", "RunningMoments", "SITES", "Stats", "calibrate", "on_device",
           "record", "site_modules", "site_name"]
