"""The residual stream of a partly pruned model at every sublayer boundary, for what-if scoring.

A pre-norm decoder is a chain of residual sublayers: h ← h + attn(norm(h)), h ← h + mlp(norm(h)).
Removing a sublayer makes it the identity, so the model with sublayer c removed equals the current
model up to c, then continues from the residual *before* c. `ResidualStream` keeps the current
model's residual at every boundary (per calibration micro-batch), so scoring "also remove c" runs
only the sublayers after c, and several candidates run together as one batch ("wavefront": a
candidate joins the batch at the boundary after it, with the cached state from before it). No
weight is edited; the family runs half-blocks through `attn_residual` / `mlp_residual`.

Memory: (sublayers + 1) × tokens × hidden in the model dtype for the boundaries, plus the dense
model's reference (tokens × vocabulary float32 log-probabilities or logits; tokens × k with a
top-k vocabulary) and its final hidden states, a float32 copy of the LM head when the model is
bf16/fp16 (the head always runs in float32), plus the vocabulary bound's slices (per chunk, the
head rows of a few thousand token ids, and tokens × k float64 dense probabilities). The blocks
themselves may visit the device one at a time (`residency`, for offloaded or streamed models).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...calibrate.walker import BlockWalker
from ...families import Family
from . import divergence
from .candidates import Candidate
from .residency import Residency
from .vocab_bound import VocabBound, supports

log = logging.getLogger(__name__)


@dataclass
class ChunkScore:
    """A candidate's distance on one chunk, in one of three states:

    - exact (`complete`): `total` is the sum of the per-token values, `per_token` [b·T] holds them;
    - stopped: exact values of only some rows, summed until they passed a limit — a lower bound;
    - bound (`hidden` set): the sum of the vocabulary bound's per-token lower bounds; `hidden` is the
      candidate's last-block output [b, T, d] on the chunk, kept to score it exactly later if needed.
    """

    total: float
    seen: int
    complete: bool
    per_token: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def bound_only(self) -> bool:
        return self.hidden is not None


class ResidualStream:
    """Boundary residuals of the current model, per micro-batch, and candidate scoring against the dense model.

    tokens: [N, T] calibration ids, split into micro-batches ("chunks") of `batch_size` sequences.
    positions: the model's sublayers in order, as (layer, "attn" | "mlp").
    h[p][j]: [b_j, T, d] input of position p for chunk j (h[P] is the last block's output).
    """

    def __init__(self, model: nn.Module, family: Family, tokens: torch.Tensor, distance: str, batch_size: int = 1,
                 device: torch.device | str | None = None, topk_vocab: int = 0, bound_topk: int = 0,
                 progress: bool = True, residency: Residency | None = None,
                 rest: tuple[nn.Module, nn.Module] | None = None):
        """`residency` brings blocks to the device one at a time (offloaded or streamed models, residency.py);
        `rest` = (final norm, LM head) on the device when the model's own are not (there)."""
        self.model, self.family, self.distance = model, family, divergence.check_distance(distance)
        self.residency = residency or Residency.none()
        walker = BlockWalker(model, family, tokens, batch_size=batch_size, device=device,
                             offload=self.residency.active and self.residency.loader is None,
                             loader=self.residency.loader)
        self.device = walker.device
        self.chunk_tokens = [b.to(self.device) for b in walker.batches]  # [b_j, T] ids
        self.layer_kwargs = [[_plain_kwargs(i, args, kw) for args, kw in per_batch]
                             for i, per_batch in enumerate(walker.layer_args)]
        # Chunks of the same shape whose layers got identical arguments (no padding: the usual case) are
        # interchangeable in a stacked batch; chunk_class[j] is the first such chunk.
        self.chunk_class = [next(i for i in range(j + 1) if self._same_chunk(i, j)) for j in range(self.n_chunks)]
        self.positions = [(g_i, kind) for g_i, g in enumerate(family.geometry(model))
                          for kind, present in (("attn", g.has_attn), ("mlp", g.has_mlp)) if present]
        self._blocks = {i: family.block(model, i) for i, _ in self.positions}
        self.removed: set[int] = set()
        # token × sublayer runs, tokens through the full LM head, tokens through the bound's vocabulary slice
        self.work = {"body_tokens": 0, "head_tokens": 0, "bound_tokens": 0}
        P = len(self.positions)
        self.h: list[list[torch.Tensor]] = [[x.to(self.device) for x in walker.hidden]] + [[] for _ in range(P)]
        self._recompute_from(0, progress=progress, desc="residual stream")
        self.teacher_hidden = list(self.h[P])  # dense final residuals, kept for later full-vocabulary checks
        self.norm, self.head = rest if rest is not None else (family.final_norm(model), family.lm_head(model))
        self.softcap = family.logit_softcap(model.config)  # Gemma 2: logits = c·tanh(head(x)/c)
        self.vocab = self.head.out_features
        self.subset: torch.Tensor | None = None  # vocabulary ids scored (top-k mode), None: all
        # The head always runs in float32 (a [V, d] copy when the model is bf16/fp16): the vocabulary
        # bound's margins cover float32 rounding, not bf16's, so this keeps the exact search exact.
        self._head_w = self.head.weight.float()
        self._head_b = None if self.head.bias is None else self.head.bias.float()
        self._weight, self._bias = self._head_w, self._head_b
        self.targets = [divergence.next_token_targets(t) for t in self.chunk_tokens]
        self.n_scored = [divergence.scored_tokens(distance, t) for t in self.chunk_tokens]
        if topk_vocab and divergence.needs_reference(distance):
            self._restrict_vocab(topk_vocab)
        # Cheap lower bounds of the per-token values (exact search aid); filled by the same dense pass.
        self.bound = (VocabBound(distance, self._head_w, self._head_b, bound_topk, self.softcap)
                      if bound_topk and supports(distance) and self.subset is None else None)
        self.refs = [self._dense_pass(j) for j in range(self.n_chunks)]
        self.row_order: list[torch.Tensor | None] = [None] * self.n_chunks
        if self.bound is not None:
            log.info("vocabulary bound: top-%d dense tokens per position, %.1f%% of the head per chunk on average",
                     self.bound.k, 100.0 * self.bound.size / (self.n_chunks * self.vocab))

    # ---- shape of the data -----------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return len(self.chunk_tokens)

    @property
    def n_positions(self) -> int:
        return len(self.positions)

    @property
    def total_scored(self) -> int:
        return sum(self.n_scored)

    def _same_chunk(self, i: int, j: int) -> bool:
        return (i == j or self.chunk_tokens[i].shape == self.chunk_tokens[j].shape
                and all(_same(kw[i], kw[j]) for kw in self.layer_kwargs))

    # ---- running sublayers -----------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, p: int, x: torch.Tensor, j: int) -> torch.Tensor:
        """Sublayer at position p on x [m·b_j, T, d] (m stacked copies of chunk j)."""
        layer, kind = self.positions[p]
        block = self._blocks[layer]
        self.residency(layer)  # on the device (and stays, until evicted) when blocks visit one at a time
        self.work["body_tokens"] += x.shape[0] * x.shape[1]
        if kind == "mlp":
            return self.family.mlp_residual(block, x)
        kwargs = _repeat_batch(self.layer_kwargs[layer][j], self.chunk_tokens[j].shape[0], x.shape[0])
        return self.family.attn_residual(block, x, kwargs)

    def _recompute_from(self, start: int, progress: bool = False, desc: str = "") -> None:
        """Refresh h[q] for q > start from h[start], following the current removals."""
        P = self.n_positions
        for q in tqdm(range(start, P), desc=desc, unit="sublayer", disable=not progress, leave=False):
            if q in self.removed:
                self.h[q + 1] = list(self.h[q])
            else:
                self.h[q + 1] = [self._run(q, x, j) for j, x in enumerate(self.h[q])]

    def remove(self, cand: Candidate) -> None:
        """Make a candidate's removal permanent: boundaries after it are recomputed, the prefix is kept."""
        self.removed.update(range(cand.start, cand.end))
        self._recompute_from(cand.start)

    # ---- the LM head and the distance -------------------------------------------------------------
    @torch.no_grad()
    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (restricted to the scored vocabulary) on [n, d] residuals: [n, V'] float32."""
        self.work["head_tokens"] += rows.shape[0]
        z = F.linear(self.norm(rows).float(), self._weight, self._bias)
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def _row_block(self) -> int:
        return max(1, divergence.BLOCK_ELEMS // self._weight.shape[0])

    def _dense_blocks(self, j: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The dense model's logits on chunk j, a block of rows at a time, with the rows' next-token targets."""
        rows = self.teacher_hidden[j].reshape(-1, self.teacher_hidden[j].shape[-1])
        step = self._row_block()
        for r in range(0, rows.shape[0], step):
            yield self._logits(rows[r:r + step]), self.targets[j][r:r + step]

    @torch.no_grad()
    def _reference(self, j: int) -> torch.Tensor | None:
        if not divergence.needs_reference(self.distance):
            return None
        return torch.cat([divergence.reference(self.distance, z) for z, _ in self._dense_blocks(j)])

    @torch.no_grad()
    def _dense_pass(self, j: int) -> torch.Tensor | None:
        """Chunk j's reference; the vocabulary bound (if any) takes its slices from the same dense logits."""
        if self.bound is None:
            return self._reference(j)
        refs: list[torch.Tensor] = []

        def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for z, targets in self._dense_blocks(j):
                if divergence.needs_reference(self.distance):
                    refs.append(divergence.reference(self.distance, z))
                yield z, targets

        self.bound.add_chunk(blocks())
        return torch.cat(refs) if refs else None

    @torch.no_grad()
    def _restrict_vocab(self, k: int) -> None:
        """Score only the union of the dense model's top-k tokens over all calibration positions."""
        ids = [z.topk(min(k, self.vocab), dim=-1).indices.unique()
               for j in range(self.n_chunks) for z, _ in self._dense_blocks(j)]
        self.subset = torch.cat(ids).unique()
        self._weight = self._head_w.index_select(0, self.subset)
        self._bias = None if self._head_b is None else self._head_b.index_select(0, self.subset)
        log.info("top-%d vocabulary: scoring %d of %d tokens", k, self.subset.numel(), self.vocab)

    @torch.no_grad()
    def score_hidden(self, final: torch.Tensor, j: int, ref: torch.Tensor | None = None,
                     limit: float = math.inf) -> ChunkScore:
        """Distance over chunk j's scored tokens for last-block outputs [b_j, T, d].

        Rows go through the head block by block, in `row_order[j]` (most divergent tokens of the
        last winner first: any order gives the same sum, this one crosses `limit` soonest). Once
        the sum exceeds `limit` the remaining rows are skipped and the sum is only a lower bound.
        """
        ref = self.refs[j] if ref is None else ref
        rows = final.reshape(-1, final.shape[-1])
        targets = self.targets[j]
        order = self.row_order[j]
        step = self._row_block()
        total, seen = 0.0, 0
        values = []
        for r in range(0, rows.shape[0], step):
            idx = order[r:r + step] if order is not None else slice(r, r + step)
            tgt = targets[idx]
            v = divergence.block_values(self.distance, None if ref is None else ref[idx], self._logits(rows[idx]), tgt)
            values.append(v)
            total += float(v.double().sum())
            seen += divergence.count_scored(self.distance, tgt)
            if total > limit and r + step < rows.shape[0]:
                return ChunkScore(total, seen, False)
        per_token = torch.cat(values)
        if order is not None:  # back to the natural row order
            per_token = torch.empty_like(per_token).index_copy_(0, order, per_token)
        return ChunkScore(total, seen, True, per_token)

    def order_rows(self, j: int, per_token: torch.Tensor | None) -> None:
        """Score chunk j's rows in descending order of these per-token values from now on."""
        self.row_order[j] = None if per_token is None else torch.argsort(per_token, descending=True, stable=True)

    # ---- what-if scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def bound_score(self, final: torch.Tensor, j: int) -> ChunkScore:
        """Lower bound of the distance on chunk j for last-block outputs [b_j, T, d] (needs `self.bound`)."""
        assert self.bound is not None
        rows = final.reshape(-1, final.shape[-1])
        self.work["bound_tokens"] += rows.shape[0]
        values = self.bound.values(j, self.norm(rows).float())
        return ChunkScore(float(values.sum()), divergence.count_scored(self.distance, self.targets[j]), False,
                          hidden=final)

    @torch.no_grad()
    def pair_sums(self, pairs: Sequence[tuple[Candidate, int]], limits: Sequence[float] | None = None,
                  bound: bool = False) -> list[ChunkScore]:
        """For each (candidate, chunk j): the distance on chunk j of the current model with that candidate
        also removed; scoring stops early once its sum passes its limit. With `bound`, only the vocabulary
        bound's lower bound is computed (and the last-block output kept).

        Pairs run as one stacked batch per group of interchangeable chunks (same shape and layer
        arguments): a pair joins at its candidate's `end` boundary with the residual cached at its `start`,
        and every later (still present) sublayer runs once on the stack.
        """
        limits = [math.inf] * len(pairs) if limits is None else limits
        out: list[ChunkScore | None] = [None] * len(pairs)
        groups: dict[int, list[int]] = {}
        for i, (_, j) in enumerate(pairs):
            groups.setdefault(self.chunk_class[j], []).append(i)
        for rep_j, members in groups.items():
            for i, score in zip(members, self._stacked([pairs[i] for i in members], rep_j,
                                                       [limits[i] for i in members], bound)):
                out[i] = score
        return out  # type: ignore[return-value]

    def _stacked(self, pairs: list[tuple[Candidate, int]], rep_j: int, limits: list[float],
                 bound: bool) -> list[ChunkScore]:
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0].end)
        b = self.chunk_tokens[rep_j].shape[0]
        x: torch.Tensor | None = None
        owners: list[int] = []
        k = 0
        for q in range(pairs[order[0]][0].end, self.n_positions + 1):
            joining = []
            while k < len(order) and pairs[order[k]][0].end == q:
                c, j = pairs[order[k]]
                joining.append(self.h[c.start][j])
                owners.append(order[k])
                k += 1
            if joining:
                x = torch.cat(([x] if x is not None else []) + joining)
            if q < self.n_positions and q not in self.removed:
                x = self._run(q, x, rep_j)
        out: list[ChunkScore] = [ChunkScore(0.0, 0, True)] * len(pairs)
        for slot, i in enumerate(owners):
            final, j = x[slot * b:(slot + 1) * b], pairs[i][1]
            out[i] = self.bound_score(final, j) if bound else self.score_hidden(final, j, limit=limits[i])
        return out

    @torch.no_grad()
    def full_vocab_distance(self) -> float:
        """The current model's distance to the dense one over the whole vocabulary (ignores any top-k)."""
        saved = (self.subset, self._weight, self._bias)
        self.subset, self._weight, self._bias = None, self._head_w, self._head_b
        try:
            total = sum(self.score_hidden(self.h[-1][j], j, ref=self._reference(j)).total
                        for j in range(self.n_chunks))
        finally:
            self.subset, self._weight, self._bias = saved
        return divergence.finalize(self.distance, total, self.total_scored, self.vocab)


def _plain_kwargs(layer: int, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if args:
        raise RuntimeError(f"decoder layer {layer} was called with {len(args)} positional arguments besides the "
                           f"hidden states; llmprune's sublayer runner only supports keyword arguments")
    return kwargs


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured layer arguments (tensors compared by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return a == b
    return a is b  # anything else (a cache object, ...): only the very same object


def _repeat_batch(obj: Any, b: int, n: int) -> Any:
    """Layer kwargs captured for a micro-batch of b rows, made fit for n = m·b stacked rows.

    Tensors whose leading dimension is b (> 1) are tiled m times; batch-1 tensors (position
    embeddings, masks) broadcast as they are.
    """
    if n == b or b == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.repeat(n // b, *([1] * (obj.ndim - 1))) if obj.ndim >= 2 and obj.shape[0] == b else obj
    if isinstance(obj, tuple):
        return tuple(_repeat_batch(o, b, n) for o in obj)
    if isinstance(obj, list):
        return [_repeat_batch(o, b, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _repeat_batch(v, b, n) for k, v in obj.items()}
    return obj
