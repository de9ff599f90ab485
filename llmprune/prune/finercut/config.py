"""FinerCut's recipe options (`pruner:` block of recipes/finercut.yaml), validated by pydantic."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CANDIDATE_MODES = ("sublayers", "attention", "mlp", "blocks")


class FastOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rescore_top: int = Field(8, ge=1)  # candidates re-scored between full scans (the best of the last step)
    full_scan_every: int = Field(4, ge=1)  # every this many steps, score every candidate again
    probe_fraction: float = Field(0.25, gt=0.0, le=1.0)  # share of tokens every re-scored candidate sees first
    finalists: int = Field(4, ge=1)  # best candidates after the probe, scored on all tokens (exactly among them)
    topk_vocab: int = Field(0, ge=0)  # >0: distance over the union of the dense top-k tokens (not perplexity)


class FinerCutConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    distance: Literal["js", "js_official", "kl", "angular", "perplexity"] = "js"
    candidates: Literal["sublayers", "attention", "mlp", "blocks"] = "sublayers"
    # Target in FinerCut's own unit: remove floor(F · #candidates) candidates. None: the recipe's
    # `sparsity` (fraction of decoder linear parameters), stopping at the first step that reaches it.
    target_sublayers: float | None = None
    # Official front-layer exclusion (`-x`): the first int(C·x/2)+1 layers are no candidates until
    # int(C·x)+1 removals have been made (C = number of candidates). None: no exclusion.
    exclude_front: float | None = None
    mode: Literal["exact", "fast", "reference"] = "exact"
    # (candidate, micro-batch) pairs stacked into one forward: the size of the search's candidate pool.
    # Bigger stacks run the GEMMs more efficiently (CPU: 8 stacked 64-token rows ran a SmolLM2 FFN 30 %
    # faster per token than one) at the cost of a little work on candidates that are about to be dropped.
    candidate_batch: int = Field(8, ge=1)
    # Dense top-k tokens per position kept by the vocabulary lower bound (vocab_bound.py) that lets
    # the search drop losing candidates without the full LM head; 0 turns it off. The result is the same.
    bound_topk: int = Field(256, ge=0)
    fast: FastOptions = Field(default_factory=FastOptions)

    @field_validator("target_sublayers")
    @classmethod
    def _open_unit_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"must be in (0, 1): the fraction of candidate sublayers to remove (got {v})")
        return v

    @field_validator("exclude_front")
    @classmethod
    def _unit_interval(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1): the official -x rate of front layers to exclude (got {v})")
        return v
