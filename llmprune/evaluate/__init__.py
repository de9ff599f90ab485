"""Evaluation: perplexity, lm-eval tasks, speed and memory, and the report that holds them.

    perplexity.py  corpus perplexity over non-overlapping windows
    tasks.py       lm-evaluation-harness wrapper (task lists in eval/, local task YAMLs, metric choice)
    flops.py       forward FLOPs from per-layer Geometry (the ideal speed-up)
    bench.py       prefill / decode timing with warm-up, interleaved repeats, median and IQR
    memory.py      peak memory incl. the KV cache (CUDA in process, CPU in fresh subprocesses)
    speed.py       dense vs pruned: the report's `speed` section
    runner.py      eval jobs: pruned model + baseline (cached) -> report sections
    report.py      report.json / report.md, merging;  figure.py  report.png
"""
from __future__ import annotations

from .bench import BenchSettings
from .perplexity import PerplexityResult, perplexity
from .runner import EvalRequest, PerplexityRequest
from .tasks import TaskRequest, parse_task_spec

__all__ = ["BenchSettings", "EvalRequest", "PerplexityRequest", "PerplexityResult", "TaskRequest", "parse_task_spec",
           "perplexity"]
