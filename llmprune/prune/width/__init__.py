"""Width pruning: KV-head groups, query heads and FFN channels.

A scorer (magnitude.py, wanda_sp.py, cfsp.py, flap.py) gives every unit a score from the weights and
calibration statistics; engine.py collects the statistics, runs the allocation (allocate.py: how many
units every layer keeps, with exact parameter accounting in budget.py) and the selection, and
keeps.py turns the kept units into a Plan (with FLAP's bias compensation). reconstruct.py refits
the kept o_proj / down_proj weights by least squares and walks the layers pruned-as-you-go; obs.py
is structured Optimal Brain Surgeon; search.py the evolutionary per-layer allocation search.
"""
from .allocate import BudgetError
from .cfsp import CfspConfig, plan_cfsp
from .flap import FlapConfig, plan_flap
from .keeps import plan_from_keeps
from .magnitude import MagnitudeConfig, plan_magnitude
from .obs import ObsConfig, plan_obs
from .reconstruct import ReconstructionError
from .wanda_sp import WandaSpConfig, plan_wanda_sp

__all__ = ["BudgetError", "CfspConfig", "FlapConfig", "MagnitudeConfig", "ObsConfig", "ReconstructionError",
           "WandaSpConfig", "plan_cfsp", "plan_flap", "plan_from_keeps", "plan_magnitude", "plan_obs", "plan_wanda_sp"]
