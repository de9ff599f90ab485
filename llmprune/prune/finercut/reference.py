"""The straightforward greedy step: for every candidate, a full forward under `surgery.simulate`.

Costs Σ(C−k) full forwards of the calibration set (each with the LM head over the whole
vocabulary). It is kept as the yardstick for the fast implementation (tests and
`scripts/bench_finercut.py`): no gradients, eval mode, the dense reference cached once, the same
per-token distances on the same micro-batches, and it stops at the target.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ... import surgery
from ...plan import sublayer_plan
from ..context import PruneContext
from . import divergence
from .candidates import Candidate, removed_set
from .search import SearchStats, warn_non_finite


@contextlib.contextmanager
def float32_head(head: torch.nn.Module) -> Iterator[None]:
    """Make the LM head return float32 logits computed in float32 (as the residual stream scores them)."""
    if head.weight.dtype == torch.float32:
        yield
        return
    w = head.weight.float()
    b = None if head.bias is None else head.bias.float()
    handle = head.register_forward_hook(lambda _m, args, _out: F.linear(args[0].float(), w, b))
    try:
        yield
    finally:
        handle.remove()


class ReferenceSearch:
    """A `Searcher` computed the slow, obvious way: one full forward per candidate per step."""

    def __init__(self, ctx: PruneContext, distance: str):
        self.ctx, self.distance = ctx, divergence.check_distance(distance)
        device = torch.device(ctx.device) if ctx.device is not None else next(ctx.model.parameters()).device
        self.batches = [b.to(device) for b in ctx.require_tokens().split(max(1, ctx.batch_size))]
        self.targets = [divergence.next_token_targets(b) for b in self.batches]
        self.total_scored = sum(divergence.scored_tokens(distance, b) for b in self.batches)
        self.vocab = ctx.family.lm_head(ctx.model).out_features
        self.removed: list[Candidate] = []
        self.stats = SearchStats()
        self.n_tokens = sum(b.numel() for b in self.batches)
        self.n_sublayers = sum(g.has_attn + g.has_mlp for g in ctx.geometry)
        self.head = ctx.family.lm_head(ctx.model)
        self.refs = [self._reference(b) for b in self.batches]  # dense model, once
        self._count(self.n_sublayers)

    def _rows(self) -> int:
        return max(1, divergence.BLOCK_ELEMS // self.vocab)

    @torch.no_grad()
    def _reference(self, batch: torch.Tensor) -> torch.Tensor | None:
        if not divergence.needs_reference(self.distance):
            return None
        with float32_head(self.head):
            logits = self.ctx.model(input_ids=batch, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])
        step = self._rows()
        return torch.cat([divergence.reference(self.distance, logits[r:r + step])
                          for r in range(0, logits.shape[0], step)])

    @torch.no_grad()
    def _sum(self, removed: list[Candidate]) -> float:
        """Distance sum over all calibration tokens of the model with `removed` gone (full forwards)."""
        plan = sublayer_plan(self.ctx.geometry, removed_set(removed))
        total = 0.0
        step = self._rows()
        with surgery.simulate(self.ctx.model, plan, self.ctx.family), float32_head(self.head):
            for batch, ref, targets in zip(self.batches, self.refs, self.targets):
                logits = self.ctx.model(input_ids=batch, use_cache=False).logits
                logits = logits.reshape(-1, logits.shape[-1])
                for r in range(0, logits.shape[0], step):
                    part = None if ref is None else ref[r:r + step]
                    total += divergence.token_sum(self.distance, part, logits[r:r + step], targets[r:r + step])
        return total

    def _count(self, sublayers_run: int) -> None:
        """Work of one full forward (a simulated-away sublayer is not computed)."""
        self.stats.body_tokens += sublayers_run * self.n_tokens
        self.stats.head_tokens += self.n_tokens

    def step(self, available: list[Candidate], step: int) -> tuple[Candidate, float]:
        best, best_sum = None, math.inf
        for c in sorted(available, key=lambda c: c.index):  # strict < keeps the lowest index on ties
            s = self._sum(self.removed + [c])
            self._count(self.n_sublayers - sum(len(r.sublayers) for r in self.removed + [c]))
            self.stats.candidate_chunks += len(self.batches)
            self.stats.full_equivalents += 1
            if not math.isfinite(s):  # NaN would never compare below the best: rank it last, as +inf
                warn_non_finite(c, s, f"at step {step}")
                s = math.inf
            if best is None or s < best_sum:
                best, best_sum = c, s
        assert best is not None
        return best, best_sum

    def remove(self, cand: Candidate) -> None:
        self.removed.append(cand)

    def final_distance(self, order: list, exact_vocab: bool = False) -> float:  # noqa: ARG002
        self._count(self.n_sublayers - sum(len(r.sublayers) for r in self.removed))
        return divergence.finalize(self.distance, self._sum(self.removed), self.total_scored, self.vocab)


__all__ = ["ReferenceSearch"]
