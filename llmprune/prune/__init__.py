"""Pruners: an explicit registry name -> (config model, planning function)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from ..plan import Plan
from .context import PruneContext
from .finercut import FinerCutConfig, finercut_artifacts, plan_finercut
from .width import (CfspConfig, FlapConfig, MagnitudeConfig, ObsConfig, WandaSpConfig, plan_cfsp, plan_flap,
                    plan_from_keeps, plan_magnitude, plan_obs, plan_wanda_sp)


@dataclass(frozen=True)
class PrunerSpec:
    name: str
    config: type[BaseModel]
    plan: Callable[[PruneContext, BaseModel], Plan]
    needs_calibration: bool  # always needs calibration text
    summary: str
    data_if: Callable[[BaseModel], bool] | None = None  # needs it only with some options
    # Optional extra files for the checkpoint (figures, reports): called by save_pruned with the plan and
    # the not-yet-published checkpoint directory; returns the file names it wrote there.
    artifacts: Callable[[Plan, Path], list[str]] | None = None

    def wants_data(self, options: BaseModel) -> bool:
        """Whether planning with these options needs calibration tokens."""
        return self.needs_calibration or (self.data_if is not None and self.data_if(options))


PRUNERS: dict[str, PrunerSpec] = {
    "magnitude": PrunerSpec("magnitude", MagnitudeConfig, plan_magnitude, needs_calibration=False,
                            summary="KV groups and FFN channels by weight norm, uniform per layer (baseline)",
                            data_if=lambda o: o.needs_data()),
    "flap": PrunerSpec("flap", FlapConfig, plan_flap, needs_calibration=True,
                       summary="fluctuation of o_proj/down_proj inputs, global cost-weighted threshold, bias compensation"),
    "wanda-sp": PrunerSpec("wanda-sp", WandaSpConfig, plan_wanda_sp, needs_calibration=True,
                           summary="|W|·‖X‖ per channel, layer by layer on pruned outputs, uniform per layer"),
    "cfsp": PrunerSpec("cfsp", CfspConfig, plan_cfsp, needs_calibration=True,
                       summary="per-layer budgets from block importance, relative-importance channel score"),
    "obs": PrunerSpec("obs", ObsConfig, plan_obs, needs_calibration=True,
                      summary="structured Optimal Brain Surgeon: greedy removal with weight updates, least-squares refit"),
    "finercut": PrunerSpec("finercut", FinerCutConfig, plan_finercut, needs_calibration=True,
                           summary="greedy removal of attention/FFN sublayers by output divergence (FinerCut)",
                           artifacts=finercut_artifacts),
}


def get_pruner(name: str) -> PrunerSpec:
    if name not in PRUNERS:
        raise KeyError(f"unknown pruning method {name!r}; available: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name]


__all__ = ["PRUNERS", "PruneContext", "PrunerSpec", "get_pruner", "plan_from_keeps"]
