"""Run a model one decoder block at a time on a calibration batch.

Capture: every decoder layer is temporarily replaced by a recorder that stores *everything* the
model passes it (all args and kwargs: attention masks, position ids, position_embeddings, ...)
and passes the hidden states straight through, so one cheap forward captures block 0's input and
every layer's own kwargs (layers of different types — full vs sliding attention — get their own
masks). Then `run(i)` executes block i on the current hidden states, micro-batch by micro-batch.
Peak memory is one block plus the activations; with `offload=True` the blocks live on the CPU
and visit the compute device one at a time; with a `loader` (stream.py) the model is a skeleton on
the meta device and the loader reads each block's weights from disk only while it runs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager, Protocol

import torch
from torch import nn

from ..families import Family


class BlockLoader(Protocol):
    """Makes weights real on the compute device only while they are needed (stream.StreamLoader)."""

    def block(self, index: int) -> ContextManager[None]:
        """Block `index`'s weights are on the compute device while active (re-entrant)."""
        ...

    def rest(self, head: bool = True) -> ContextManager[None]:
        """The weights outside the decoder blocks (embeddings; with `head` also final norm and LM head)."""
        ...


def on_device(loader: BlockLoader | None, index: int) -> ContextManager[None]:
    """`loader.block(index)`, or nothing to do when the model is in memory."""
    return loader.block(index) if loader is not None else contextlib.nullcontext()


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder stack is needed."""


class _StopBlock(Exception):
    """Raised after the module `run(stop_after=...)` names: the rest of the block is not needed."""


def _raise_stop(_module: nn.Module, *_: Any) -> None:
    raise _StopBlock


class _Recorder(nn.Module):
    def __init__(self, index: int, last: bool, sink: Callable[[int, torch.Tensor, tuple, dict], None]):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink(self.index, hidden_states, args, kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


class BlockWalker:
    """Holds the current block inputs (one tensor per micro-batch) and runs blocks on them.

    tokens: [N, T] int64 calibration batch, split into micro-batches of `batch_size` rows.
    hidden: list of [b, T, d] tensors, the input of the next block to run.
    """

    def __init__(self, model: nn.Module, family: Family, tokens: torch.Tensor, batch_size: int = 8,
                 device: torch.device | str | None = None, offload: bool = False, loader: BlockLoader | None = None):
        if tokens.ndim != 2:
            raise ValueError(f"calibration tokens must be [nsamples, seqlen], got shape {tuple(tokens.shape)}")
        self.model, self.family, self.loader = model, family, loader
        self.offload = offload and loader is None  # a loader already brings one block at a time
        self.layers = family.layers(model)
        if device is None and loader is not None:
            raise ValueError("streaming needs an explicit compute device")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.store = torch.device("cpu") if offload else self.device
        self.batches = list(tokens.split(max(1, batch_size)))
        self.hidden: list[torch.Tensor] = []
        self.layer_args: list[list[tuple[tuple, dict]]] = [[] for _ in self.layers]  # [layer][batch]
        self._capture()

    @property
    def n_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    @torch.no_grad()
    def _capture(self) -> None:
        originals = list(self.layers)
        n = len(originals)

        def sink(i: int, h: torch.Tensor, args: tuple, kwargs: dict) -> None:
            if i == 0:
                self.hidden.append(h.to(self.store))
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
            self.layer_args[i].append((args, kwargs))

        for i in range(n):
            self.layers[i] = _Recorder(i, i == n - 1, sink)
        # With offload the blocks stay home; only the small rest (embeddings, rotary, head) visits the
        # compute device for the capture. The recorders own no parameters, so .to() skips the blocks.
        home = next(self.model.parameters()).device
        if self.offload:
            self.model.to(self.device)
        try:
            with self.loader.rest(head=False) if self.loader is not None else contextlib.nullcontext():
                for batch in self.batches:
                    try:
                        self.model(input_ids=batch.to(self.device), use_cache=False)
                    except _StopForward:
                        pass
        finally:
            if self.offload:
                self.model.to(home)
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    # ---- running blocks ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, i: int, hidden: list[torch.Tensor] | None = None, layer: nn.Module | None = None,
            keep: bool = True, in_place: bool = False, stop_after: nn.Module | None = None,
            stop_before: nn.Module | None = None) -> list[torch.Tensor]:
        """Run block `i` (or a stand-in `layer`) on `hidden` (default: the current inputs); return its outputs.

        keep=False: outputs are dropped (a statistics-only pass). in_place=True: each micro-batch's output
        replaces its input at once, so a pass holds one copy of the activations, not two (`advance_through`).
        stop_after: a submodule of the block (e.g. its attention) after whose forward each micro-batch stops —
        a statistics pass whose hooks all sit in or before it skips the rest of the block (needs keep=False).
        stop_before: likewise, stopping once that submodule's input is known (its pre-hooks registered before
        this call still run: e.g. a second moment of down_proj's inputs without computing down_proj).
        """
        if (stop_after is not None or stop_before is not None) and (keep or in_place):
            raise ValueError("stop_after / stop_before leave no block output: use them with keep=False")
        layer = self.layers[i] if layer is None else layer
        hidden = self.hidden if hidden is None else hidden
        home = None
        if self.offload:
            home = next(layer.parameters()).device
            layer.to(self.device)
        outs = []
        stops = ([stop_after.register_forward_hook(_raise_stop)] if stop_after is not None else []) + \
            ([stop_before.register_forward_pre_hook(_raise_stop)] if stop_before is not None else [])
        try:
            with on_device(self.loader, i) if layer is self.layers[i] else contextlib.nullcontext():
                for j, (h, (args, kwargs)) in enumerate(zip(hidden, self.layer_args[i])):
                    try:
                        out = layer(h.to(self.device), *args, **kwargs)
                    except _StopBlock:
                        continue
                    out = out[0] if isinstance(out, tuple) else out
                    if in_place:
                        del h
                        hidden[j] = out.to(self.store)
                    elif keep:
                        outs.append(out.to(self.store))
        finally:
            for stop in stops:
                stop.remove()
            if home is not None:
                layer.to(home)
        return outs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The given block outputs become the inputs of the next block."""
        self.hidden = outputs

    def advance_through(self, i: int) -> None:
        """Run block `i` on the current inputs and make its outputs the next inputs, micro-batch by micro-batch
        (the same numbers as `advance(run(i))`, with one copy of the activations instead of two)."""
        self.hidden = list(self.hidden)  # a caller may still hold the old list
        self.run(i, self.hidden, in_place=True)

    @torch.no_grad()
    def logits(self, hidden: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Final norm + LM head (+ logit soft-capping) on the given last-block outputs: list of [b, T, vocab]."""
        hidden = self.hidden if hidden is None else hidden
        norm, head = self.family.final_norm(self.model), self.family.lm_head(self.model)
        cap = self.family.logit_softcap(self.model.config)  # Gemma 2: logits = c·tanh(head(x)/c)
        with self.loader.rest() if self.loader is not None else contextlib.nullcontext():
            out = [head(norm(h.to(self.device))) for h in hidden]
        return out if cap is None else [cap * torch.tanh(z / cap) for z in out]
