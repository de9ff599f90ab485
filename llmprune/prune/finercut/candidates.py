"""FinerCut's removable units (sublayers or whole blocks) and when the greedy removal stops."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...families.base import Geometry
from ..width.allocate import BudgetError, check_sparsity
from .config import CANDIDATE_MODES, FinerCutConfig


@dataclass(frozen=True)
class Candidate:
    """A removable unit: one sublayer, or a whole block (its consecutive sublayers)."""

    index: int  # canonical order (depth first, attention before FFN); breaks ties
    layer: int
    sublayers: tuple[str, ...]  # ("attn",), ("mlp",) or ("attn", "mlp")
    start: int  # first stream position it covers
    end: int  # one past its last position
    params: int  # decoder linear parameters it removes

    @property
    def name(self) -> str:
        return f"L{self.layer}." + "+".join(self.sublayers)


def build_candidates(geometry: list[Geometry], mode: str) -> list[Candidate]:
    """Removable units of a model in depth order; positions index the model's present sublayers."""
    if mode not in CANDIDATE_MODES:
        raise ValueError(f"unknown candidates mode {mode!r}; choose one of {', '.join(CANDIDATE_MODES)}")
    out: list[Candidate] = []
    pos = 0
    for i, g in enumerate(geometry):
        present = [(k, n) for k, n, ok in (("attn", g.attn_params(), g.has_attn), ("mlp", g.mlp_params(), g.has_mlp))
                   if ok]
        if mode == "blocks" and present:
            out.append(Candidate(len(out), i, tuple(k for k, _ in present), pos, pos + len(present),
                                 sum(n for _, n in present)))
        else:
            for off, (kind, n) in enumerate(present):
                if mode == "sublayers" or (mode == "attention") == (kind == "attn"):
                    out.append(Candidate(len(out), i, (kind,), pos + off, pos + off + 1, n))
        pos += len(present)
    if not out:
        raise BudgetError(f"the model has no {mode} left to remove")
    return out


class Target:
    """When to stop: after a number of removals, or at the first step whose removed parameters reach a budget."""

    def __init__(self, cfg: FinerCutConfig, sparsity: float, candidates: list[Candidate], total_params: int):
        n = len(candidates)
        self.count: int | None = None
        self.params: float | None = None
        if cfg.target_sublayers is not None:
            self.count = math.floor(cfg.target_sublayers * n)
            self.describe = {"kind": "sublayers", "fraction": cfg.target_sublayers, "removals": self.count,
                             "candidates": n}
            if self.count == 0:
                raise BudgetError(f"target_sublayers {cfg.target_sublayers} of {n} candidates removes nothing; "
                                  f"use at least {1 / n:.4f}")
        else:
            check_sparsity(sparsity)
            self.params = sparsity * total_params
            reachable = sum(c.params for c in candidates)
            self.describe = {"kind": "sparsity", "sparsity": sparsity, "params": round(self.params)}
            if self.params > reachable:
                raise BudgetError(f"sparsity {sparsity:.0%} needs {self.params:,.0f} parameters removed, but all "
                                  f"{cfg.candidates} candidates together hold only {reachable:,} "
                                  f"({reachable / total_params:.1%}); lower --sparsity or widen pruner.candidates")

    def reached(self, removals: int, removed_params: int) -> bool:
        if self.count is not None:
            return removals >= self.count
        return removed_params >= self.params


def front_exclusion(candidates: list[Candidate], rate: float | None) -> tuple[list[Candidate], int | None]:
    """Candidates held back by the official front-layer exclusion, and after how many removals they return."""
    if rate is None:
        return [], None
    n = len(candidates)
    n_layers = int(n * rate / 2) + 1
    return [c for c in candidates if c.layer < n_layers], int(n * rate) + 1


def removed_set(cands: list[Candidate]) -> set[tuple[int, str]]:
    """The (layer, "attn" | "mlp") sublayers the candidates cover."""
    return {(c.layer, kind) for c in cands for kind in c.sublayers}
