"""One greedy step of sublayer removal: find the candidate whose removal changes the output least.

`race` is exact: it returns the argmin (sum, canonical index) over the candidates it is given,
the same as scoring every candidate on every token. The most promising candidate (its mean
per-token value at the last step it was scored) is scored first on every calibration micro-batch
("chunk"); the others then go through a pool, several (candidate, chunk) pairs per stacked batch.
Per-token values are non-negative, so a partial sum — and, with the vocabulary bound, a sum of
certified per-token lower bounds — is a lower bound of the full sum: once it exceeds the best full
sum found so far the candidate cannot win and is dropped without seeing the remaining chunks.

`exact_step` races every candidate. `fast_step` (approximate) races only a short list: between
periodic full scans the best `rescore_top` of the previous step, probed on a fraction of the
chunks first, of which the best `finalists` go on to the (exact) race on all chunks.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Protocol

from .candidates import Candidate
from .config import FastOptions
from .residual_stream import ChunkScore, ResidualStream

log = logging.getLogger(__name__)


def warn_non_finite(cand: Candidate, value: float, where: str) -> None:
    log.warning("removing %s gives a non-finite distance (%s) %s: the model without it produces NaN/inf "
                "logits; it ranks last", cand.name, value, where)


class Searcher(Protocol):
    """What the greedy loop needs from a search: one step, a removal, and the final distance.

    `ExactSearch`, `FastSearch` (here) and `ReferenceSearch` (reference.py) implement it."""

    stats: SearchStats
    total_scored: int  # tokens that every distance is averaged over
    vocab: int

    def step(self, available: list[Candidate], step: int) -> tuple[Candidate, float]:
        """The candidate to remove next among `available` (step = removals so far), and its distance sum."""
        ...

    def remove(self, cand: Candidate) -> None: ...

    def final_distance(self, order: list, exact_vocab: bool = False) -> float: ...


@dataclass
class SearchStats:
    """Work done by the search, in candidate × chunk evaluations (one chunk = one micro-batch)."""

    candidate_chunks: int = 0  # (candidate, chunk) pairs scored
    full_equivalents: float = 0.0  # candidate_chunks / chunks: candidates scored on all tokens, equivalently
    abandoned: int = 0  # candidates dropped before their sum was complete (partial sums or bounds passed the best)
    bounded_chunks: int = 0  # of candidate_chunks: scored by the vocabulary bound only (cheap head)
    tightened: int = 0  # bounded chunks later scored exactly (from the kept last-block output)
    full_scans: int = 0  # fast mode: steps that scored every candidate
    body_tokens: int = 0  # Σ tokens × sublayers run (decoder work, including the dense pass)
    head_tokens: int = 0  # tokens through the final norm + full LM head (+ distance)
    bound_tokens: int = 0  # tokens through the vocabulary bound (a slice of the head)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["full_equivalents"] = round(d["full_equivalents"], 3)
        return d


class Search:
    """Greedy-search state over a ResidualStream: per-candidate estimates carried between steps."""

    def __init__(self, stream: ResidualStream):
        self.stream = stream
        self.est: dict[int, float] = {}  # candidate index -> mean per-token value when last scored
        self.stats = SearchStats()
        # Chunks are scored in this order. Any fixed order is exact; putting first the chunks on which
        # the last winner diverged most makes hopeless candidates cross the bound sooner.
        self.chunk_order = list(range(stream.n_chunks))
        self.warned: set[int] = set()  # candidates already reported as non-finite

    @property
    def total_scored(self) -> int:
        return self.stream.total_scored

    @property
    def vocab(self) -> int:
        return self.stream.vocab

    def remove(self, cand: Candidate) -> None:
        self.stream.remove(cand)

    def final_distance(self, order: list, exact_vocab: bool = False) -> float:  # noqa: ARG002
        """Distance of the final model to the dense one, over the full vocabulary and all tokens."""
        value = self.stream.full_vocab_distance()
        self.stats.body_tokens = self.stream.work["body_tokens"]
        self.stats.head_tokens = self.stream.work["head_tokens"]
        self.stats.bound_tokens = self.stream.work["bound_tokens"]
        return value

    def priority(self, c: Candidate) -> tuple:
        # Scored before: lowest estimate first. Never scored: deepest first (cheap suffix, often least important).
        return (0, self.est[c.index], c.index) if c.index in self.est else (1, -c.start, c.index)

    def probe(self, cands: list[Candidate], n_chunks: int, batch: int, tally: Tally) -> None:
        """Score every candidate fully on the first n_chunks chunks (no abandoning); update estimates."""
        pairs = [(c, k) for c in cands for k in range(tally.done(c), n_chunks)]
        for g in range(0, len(pairs), batch):
            self._score_pairs(pairs[g:g + batch], tally, math.inf, bound=False)
        self._estimate(cands, tally)

    def race(self, cands: list[Candidate], batch: int, tally: Tally | None = None) -> tuple[Candidate, float]:
        """Exact argmin of (full sum, index) over `cands`, with early abandoning. Returns (winner, its sum).

        1. The most promising candidate (lowest estimate) is scored exactly on every chunk: the first
           complete sum to beat.
        2. The others go through a pool of up to `batch` candidates, deepest first (pool members then
           share most of their suffix, which keeps the stacked batch full); every round each member
           gets its next chunk — with a vocabulary bound only that chunk's cheap lower bound. A member
           whose sum passes the best complete sum is dropped; one that has a value on every chunk has
           its bounded chunks scored exactly from the kept last-block outputs, largest bound first,
           until it is dropped or complete (then it may become the best).
        """
        tally = Tally() if tally is None else tally
        n = self.stream.n_chunks
        ranked = sorted(cands, key=self.priority)
        first = ranked[0]
        while tally.done(first) < n:
            ks = range(tally.done(first), min(n, tally.done(first) + batch))
            self._score_pairs([(first, k) for k in ks], tally, math.inf, bound=False)
        best, best_sum = first, tally.sum(first)
        queue = sorted(ranked[1:], key=lambda c: (-c.start, c.index))
        active: list[Candidate] = []
        while queue or active:
            while len(active) < batch and queue:
                active.append(queue.pop(0))
            pairs = [(c, tally.done(c)) for c in active if tally.done(c) < n and tally.sum(c) <= best_sum]
            if pairs:
                self._score_pairs(pairs, tally, best_sum, bound=self.stream.bound is not None)
            still = []
            for c in active:
                if tally.sum(c) <= best_sum and tally.done(c) == n:
                    for j in tally.bounded(c):
                        if tally.sum(c) > best_sum:
                            break
                        self._tighten(c, j, tally, best_sum)
                    if tally.sum(c) <= best_sum and (tally.sum(c), c.index) < (best_sum, best.index):
                        best, best_sum = c, tally.sum(c)
                if tally.sum(c) > best_sum:
                    self.stats.abandoned += 1
                elif tally.done(c) < n:
                    still.append(c)
                    continue
                tally.release(c)
            active = still
        self._estimate(cands, tally)
        winner = tally.per_chunk.get(best.index, {})
        self.chunk_order.sort(key=lambda j: -winner[j].total if j in winner else 0.0)  # stable sort
        for j, score in winner.items():
            self.stream.order_rows(j, score.per_token)
        tally.release_all()
        return best, best_sum

    def _score_pairs(self, pairs: list[tuple[Candidate, int]], tally: Tally, best_sum: float, bound: bool) -> None:
        """Score (candidate, k) pairs — the k-th chunk of the chunk order — as one stacked batch."""
        jobs = [(c, self.chunk_order[k]) for c, k in pairs]
        limits = [best_sum - tally.sum(c) for c, _ in pairs]
        for (c, k), (_, j), score in zip(pairs, jobs, self.stream.pair_sums(jobs, limits, bound=bound)):
            if not math.isfinite(score.total):  # NaN compares false with everything: rank it last, as +inf
                tally.add(c, j, self._non_finite(c, j, score), self.stream.n_chunks)
                continue
            tally.add(c, j, score, k + 1 if score.complete or score.bound_only else self.stream.n_chunks)
        self.stats.candidate_chunks += len(pairs)
        self.stats.full_equivalents += len(pairs) / self.stream.n_chunks
        self.stats.bounded_chunks += len(pairs) if bound else 0

    def _tighten(self, c: Candidate, j: int, tally: Tally, best_sum: float) -> None:
        """Replace chunk j's bound by the exact sum (scored from the kept output; stops past the limit)."""
        held = tally.per_chunk[c.index][j]
        exact = self.stream.score_hidden(held.hidden, j, limit=best_sum - (tally.sum(c) - held.total))
        if not math.isfinite(exact.total):
            exact = self._non_finite(c, j, exact)
        elif not exact.complete and exact.total < held.total:  # both bound the chunk from below: keep the larger
            exact = ChunkScore(held.total, held.seen, False)
        tally.replace(c, j, exact)
        self.stats.tightened += 1

    def _non_finite(self, c: Candidate, j: int, score: ChunkScore) -> ChunkScore:
        """A NaN / inf chunk sum becomes a complete +inf: the candidate loses to every finite one, ties by index."""
        if c.index not in self.warned:
            self.warned.add(c.index)
            warn_non_finite(c, score.total, f"on calibration chunk {j}")
        return ChunkScore(math.inf, score.seen, True)

    def _estimate(self, cands: list[Candidate], tally: Tally) -> None:
        for c in cands:
            if tally.seen.get(c.index):
                self.est[c.index] = tally.sum(c) / tally.seen[c.index]


class Tally:
    """Per-candidate running sums within one step: sum, scored tokens seen, chunks done."""

    def __init__(self) -> None:
        self.sums: dict[int, float] = {}
        self.seen: dict[int, int] = {}
        self.chunks: dict[int, int] = {}  # chunks of the chunk order done (all of them once abandoned)
        self.per_chunk: dict[int, dict[int, ChunkScore]] = {}  # candidate -> chunk id -> its score there

    def sum(self, c: Candidate) -> float:
        return self.sums.get(c.index, 0.0)

    def done(self, c: Candidate) -> int:
        return self.chunks.get(c.index, 0)

    def add(self, c: Candidate, j: int, score: ChunkScore, done: int) -> None:
        self.per_chunk.setdefault(c.index, {})[j] = score
        self.sums[c.index] = self.sum(c) + score.total
        self.seen[c.index] = self.seen.get(c.index, 0) + score.seen
        self.chunks[c.index] = done

    def replace(self, c: Candidate, j: int, score: ChunkScore) -> None:
        old = self.per_chunk[c.index][j]
        self.per_chunk[c.index][j] = score
        self.sums[c.index] = self.sum(c) - old.total + score.total
        self.seen[c.index] = self.seen[c.index] - old.seen + score.seen

    def bounded(self, c: Candidate) -> list[int]:
        """Chunks of c that have only a bound, largest bound first (they can raise the sum most)."""
        held = self.per_chunk.get(c.index, {})
        return sorted((j for j, s in held.items() if s.bound_only), key=lambda j: (-held[j].total, j))

    def release(self, c: Candidate) -> None:
        """Forget the kept last-block outputs of a candidate that is out of the race (memory)."""
        for s in self.per_chunk.get(c.index, {}).values():
            s.hidden = None

    def release_all(self) -> None:
        for held in self.per_chunk.values():
            for s in held.values():
                s.hidden = None


class ExactSearch(Search):
    """Exact steps: the candidate the straightforward algorithm would pick, from a race of all of them."""

    def __init__(self, stream: ResidualStream, batch: int):
        super().__init__(stream)
        self.batch = batch

    def step(self, available: list[Candidate], step: int) -> tuple[Candidate, float]:  # noqa: ARG002
        return self.race(available, self.batch)


class FastSearch(ExactSearch):
    """Approximate steps: re-score a short list on a probe of the tokens, race the finalists on all of them."""

    def __init__(self, stream: ResidualStream, batch: int, opts: FastOptions):
        super().__init__(stream, batch)
        self.opts = opts

    def step(self, available: list[Candidate], step: int) -> tuple[Candidate, float]:
        opts = self.opts
        full = step % opts.full_scan_every == 0 or any(c.index not in self.est for c in available)
        pool = available if full else sorted(available, key=self.priority)[:opts.rescore_top]
        self.stats.full_scans += full
        n = self.stream.n_chunks
        probe = min(n, max(1, math.ceil(opts.probe_fraction * n)))
        tally = Tally()
        if probe < n and len(pool) > opts.finalists:
            self.probe(pool, probe, self.batch, tally)
            pool = sorted(pool, key=self.priority)[:opts.finalists]
        return self.race(pool, self.batch, tally)


__all__ = ["ExactSearch", "FastSearch", "Search", "SearchStats", "Searcher", "Tally"]
