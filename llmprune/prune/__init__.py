"""Pruners: an explicit registry name -> (config model, planning function)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from ..plan import Plan
from .common import PruneContext, plan_from_keeps
from .finercut import FinerCutConfig, plan_finercut
from .finercut_report import finercut_artifacts
from .magnitude import MagnitudeConfig, plan_magnitude


@dataclass(frozen=True)
class PrunerSpec:
    name: str
    config: type[BaseModel]
    plan: Callable[[PruneContext, BaseModel], Plan]
    needs_calibration: bool
    summary: str
    # Optional extra files for the checkpoint (figures, reports): called by save_pruned with the plan and
    # the not-yet-published checkpoint directory; returns the file names it wrote there.
    artifacts: Callable[[Plan, Path], list[str]] | None = None


PRUNERS: dict[str, PrunerSpec] = {
    "magnitude": PrunerSpec("magnitude", MagnitudeConfig, plan_magnitude, needs_calibration=False,
                            summary="KV groups and FFN channels by weight norm, uniform per layer (baseline)"),
    "finercut": PrunerSpec("finercut", FinerCutConfig, plan_finercut, needs_calibration=True,
                           summary="greedy removal of attention/FFN sublayers by output divergence (FinerCut)",
                           artifacts=finercut_artifacts),
}


def get_pruner(name: str) -> PrunerSpec:
    if name not in PRUNERS:
        raise KeyError(f"unknown pruning method {name!r}; available: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name]


__all__ = ["PRUNERS", "PruneContext", "PrunerSpec", "get_pruner", "plan_from_keeps"]
