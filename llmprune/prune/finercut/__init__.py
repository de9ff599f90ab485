"""FinerCut: greedy removal of whole attention / FFN sublayers by output divergence.

config.py (recipe options) -> candidates.py (units, stop rule) -> residual_stream.py (prefix cache,
scoring) -> search.py (exact and fast `Searcher`s) / reference.py (the straightforward one) ->
pruner.py (the greedy loop, Plan) -> report.py (removal listing, depth figure). divergence.py and
vocab_bound.py hold the per-token distances and their certified lower bound.
"""
from .config import FastOptions, FinerCutConfig
from .pruner import plan_at, plan_finercut
from .report import finercut_artifacts, removal_report

__all__ = ["FastOptions", "FinerCutConfig", "finercut_artifacts", "plan_at", "plan_finercut", "removal_report"]
