"""Which decoder blocks are on the compute device during a FinerCut search, for models that do not fit.

The search runs every block many times (each scoring pass runs the suffix after its candidates), so a
model that does not fit on the device is brought there one block at a time:

- in memory with `--offload`: the blocks stay in host memory and each visit copies one to the device;
- streamed (`--stream on`): the model is a meta skeleton and each visit reads the block from its
  safetensors shards (stream.StreamLoader).

The last `keep` blocks used stay resident (least recently used goes first), so a layer's attention and
FFN positions, visited one after the other, cost one transfer. `bytes_moved` counts what came in, for
the cost report in pruning.json. An in-memory model on its device needs none of this (`Residency.none`).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from ...calibrate.walker import BlockLoader
from ...evaluate.bench import weight_bytes


class Residency:
    """After `residency(i)` block i's weights are on the compute device until evicted (module docstring)."""

    def __init__(self, layers: nn.ModuleList | None, device: torch.device, loader: BlockLoader | None = None,
                 keep: int = 1):
        self.layers, self.device, self.loader, self.keep = layers, torch.device(device), loader, max(1, keep)
        self.resident: OrderedDict[int, contextlib.ExitStack | None] = OrderedDict()
        self.bytes_moved = 0
        self.transfers = 0
        self.block_bytes = [weight_bytes(m) for m in layers] if layers is not None else []

    @classmethod
    def none(cls) -> Residency:
        return cls(None, torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.layers is not None

    def __call__(self, index: int) -> None:
        if not self.active:
            return
        if index in self.resident:
            self.resident.move_to_end(index)
            return
        while len(self.resident) >= self.keep:
            self._evict(next(iter(self.resident)))
        if self.loader is not None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.loader.block(index))  # read from the shards, released on eviction
            self.resident[index] = stack
        else:
            self.layers[index].to(self.device)
            self.resident[index] = None
        self.bytes_moved += self.block_bytes[index]
        self.transfers += 1

    def _evict(self, index: int) -> None:
        stack = self.resident.pop(index)
        if stack is not None:
            stack.close()
        else:
            self.layers[index].to("cpu")

    def release(self) -> None:
        """Every block back home (host memory, or the meta skeleton when streamed)."""
        while self.resident:
            self._evict(next(iter(self.resident)))


@contextlib.contextmanager
def resident_rest(model: nn.Module, modules: list[nn.Module], device: torch.device,
                  loader: BlockLoader | None, offload: bool) -> Iterator[list[nn.Module]]:
    """Device copies of the modules outside the blocks that the search keeps using (final norm, LM head):
    with `offload` they visit the device for the whole search; when streamed, real copies are read once."""
    if loader is not None:
        import copy

        with loader.rest():
            copies = [copy.deepcopy(m).to(device) for m in modules]
        yield copies
    elif offload:
        homes = [next(m.parameters()).device for m in modules]
        for m in modules:
            m.to(device)
        try:
            yield modules
        finally:
            for m, home in zip(modules, homes):
                m.to(home)
    else:
        yield modules


__all__ = ["Residency", "resident_rest"]
