"""The width pruners' shared recipe options (`pruner:` keys every width recipe accepts: which units,
allocation and its settings, reconstruction, search), and zero-score units for geometry-only allocations."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..context import PruneContext
from .allocate import LayerUnits, Rules
from .reconstruct import WalkOptions


class CoarseToFineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Slope of the sigmoid on each layer's mean block importance minus the mean over layers.
    # 13.1072 = 131 072 / 1e4 reproduces CFSP's hard-coded 1e4 at its calibration size (128 × 1024 tokens).
    sharpness: float = Field(13.1072, ge=0)
    metric: Literal["angular", "cosine"] = "angular"  # block importance: arccos(cos)/π, or 1 − cos (ShortGPT BI)


class OwlOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(0.08, ge=0, le=0.5)  # keep ratios spread over [mean − λ, mean + λ]
    m: float = Field(5.0, gt=0)  # an outlier is |W_ij|·‖X_j‖ above m × the layer's mean


class SearchOptions(BaseModel):
    """`allocation: search`: evolutionary search of per-layer levels (EvoPress / Týr-the-Pruner style)."""

    model_config = ConfigDict(extra="forbid")
    # the centre the ladders are built around: an allocation of its own (coarse_to_fine etc. need a dense pass)
    start: Literal["uniform", "global", "coarse_to_fine", "owl"] = "uniform"
    levels: int = Field(4, ge=1, le=16)  # ladder: centre ± this many steps per module
    ffn_step: float = Field(0.05, gt=0, lt=1)  # one FFN level = this fraction of the layer's FFN width
    generations: int = Field(20, ge=0)
    offspring: int = Field(16, ge=1)  # children of the parent per generation
    population: int = Field(4, ge=1)  # survivors of the cheap first stage, re-scored on all fitness tokens
    samples: int = Field(4, ge=1)  # calibration sequences the KL fitness uses (the first ones)
    first_stage_samples: int = Field(1, ge=1)  # ... and the cheap first stage
    max_flips: int = Field(4, ge=1)  # level swaps per mutation: min(U{1..max}, U{1..max})
    time_limit_s: float | None = Field(None, gt=0)  # stop searching after this wall time


class WidthOptions(BaseModel):
    """Options every width pruner accepts (recipe section `pruner:`)."""

    model_config = ConfigDict(extra="forbid")
    attention: bool = True  # remove KV groups (a KV head and its query heads)
    mlp: bool = True  # remove FFN channels
    query_heads: bool = False  # also remove query heads inside KV groups (the same number in every group)
    allocation: Literal["uniform", "global", "coarse_to_fine", "owl", "search"] = "uniform"
    round_to: int = Field(1, ge=1)  # kept FFN widths multiples of this (8 / 64 / 128 / 256 suit GPU kernels)
    compensate: bool = False  # replace removed o_proj / down_proj inputs by a bias of their calibration means
    coarse_to_fine: CoarseToFineOptions = Field(default_factory=CoarseToFineOptions)
    owl: OwlOptions = Field(default_factory=OwlOptions)
    # least squares: refit kept o_proj / down_proj columns and bias to the dense outputs (docs/reconstruction.md)
    reconstruct: Literal["none", "ls"] = "none"
    # what the refit aims at: the dense module on the pruned inputs, the dense model's module output, or that
    # plus the residual stream's drift (docs/reconstruction.md, targets.py)
    reconstruct_target: Literal["module", "dense", "residual"] = "module"
    damp: float = Field(0.01, ge=0)  # ridge λ = damp · mean(diag H) of the reconstruction
    hessian_dtype: Literal["float64", "float32"] = "float64"  # float32 halves H's memory (8B down_proj: 0.8 GB)
    search: SearchOptions = Field(default_factory=SearchOptions)

    @model_validator(mode="after")
    def _something_to_prune(self) -> WidthOptions:
        if not (self.attention or self.mlp):
            raise ValueError("attention and mlp are both false: nothing would be pruned; enable at least one")
        if self.reconstruct == "none" and self.reconstruct_target != "module":
            raise ValueError(f"reconstruct_target: {self.reconstruct_target} sets what the least-squares refit aims at, "
                             "but reconstruct is none; add reconstruct: ls (or drop reconstruct_target)")
        if self.allocation == "search" and self.query_heads:
            raise ValueError("allocation: search varies whole KV groups; set query_heads: false")
        return self

    def rules(self) -> Rules:
        # a refit (like compensation) gives partly pruned o_proj / down_proj a bias: counted in the budget
        return Rules(query_heads=self.query_heads, compensate=self.compensate or self.reconstruct != "none",
                     round_to=self.round_to)

    def walk_options(self) -> WalkOptions:
        return WalkOptions(refit=self.reconstruct == "ls", damp=self.damp, compensate=self.compensate,
                           target=self.reconstruct_target,
                           hessian_dtype=getattr(torch, self.hessian_dtype))

    def needs_data(self) -> bool:
        """Whether calibration text is needed beyond what the score itself uses."""
        return self.compensate or self.allocation in ("coarse_to_fine", "owl", "search") or self.reconstruct != "none"


class DataWidthOptions(WidthOptions):
    """Options of width pruners whose scores come from calibration statistics."""

    sequential: bool = False  # score layer by layer on the outputs of the already-pruned layers
    # calibration sequences (the first ones) the allocation's dense pass reads where that pass only sets the
    # per-layer sizes (sequential pruners, search.start); null = all. Budgets settle with far fewer tokens
    # than second moments need (docs/reconstruction.md: 32 of 128 sequences move ≤ 6 FFN channels a layer)
    allocation_nsamples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _allocation_subset(self) -> DataWidthOptions:
        if self.allocation_nsamples is not None and not self.sequential and self.allocation != "search":
            raise ValueError("allocation_nsamples applies only when the dense pass sets sizes alone (sequential: "
                             "true, or allocation: search); here that pass also chooses the units — drop it")
        return self


# ---- statistics and signals ------------------------------------------------------------------------


def blank_units(ctx: PruneContext, opts: WidthOptions) -> list[LayerUnits]:
    """Units with zero scores: enough for allocations that depend on the geometry alone (uniform)."""
    return [LayerUnits(g, attn=torch.zeros(g.n_q_heads * g.head_dim) if opts.attention and g.has_attn else None,
                       mlp=torch.zeros(g.intermediate) if opts.mlp and g.has_mlp else None) for g in ctx.geometry]
