"""`llmprune bench`: dense vs pruned speed and memory on the current device -> the report's `speed` section.

Ratios are dense/pruned from the same interleaved run: per batch size, `prefill_speedup` = dense median
prefill latency / pruned median; `decode_speedup` = pruned median decode throughput / dense median;
`memory_saving` = 1 − pruned peak / dense peak. `*_speedup_ci`: 95 % bootstrap interval of the mean of
the paired per-repeat ratios. The top-level speed-ups are geometric means over the
batch sizes; the top-level memory numbers are those of the largest batch size (where the KV cache
weighs most). `ideal_speedup` is the dense/pruned ratio of prefill FLOPs at the measured prompt length
(see flops.py), so `prefill_vs_ideal` says how much of the FLOP reduction shows up as real time.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..families import family_for
from .bench import BenchSettings, ratio_ci, run_speed
from .flops import ideal_speedups
from .memory import CUDA_METHOD, cpu_peaks, cuda_peak
from ..errors import UsageError

log = logging.getLogger(__name__)


def model_shape(model: nn.Module) -> tuple[list, int, int]:
    """(per-layer Geometry, hidden size, vocabulary rows of the LM head) of a loaded model."""
    fam = family_for(model.config)
    head = fam.lm_head(model).weight  # [V, d]
    return fam.geometry(model), int(head.shape[1]), int(head.shape[0])


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _saving(dense: float | None, pruned: float | None) -> float | None:
    return 1.0 - pruned / dense if dense and pruned is not None else None


def speed_section(rows: list[dict[str, Any]], settings: BenchSettings, ideal: dict[str, float],
                  device: torch.device, dtype: torch.dtype, memory_method: str | None) -> dict[str, Any]:
    """Per-batch ratios and the top-level summary from the measured rows."""
    by = {(r["model"], r["batch_size"]): r for r in rows}
    per_bs = []
    for bs in settings.batch_sizes:
        d, p = by[("dense", bs)], by[("pruned", bs)]
        per_bs.append({
            "batch_size": bs,
            "prefill_speedup": _ratio(d["prefill_ms_median"], p["prefill_ms_median"]),
            "decode_speedup": _ratio(p.get("decode_tok_s_median"), d.get("decode_tok_s_median")),
            # 95 % bootstrap intervals of the paired per-repeat ratios (the models alternate ABBA)
            "prefill_speedup_ci": ratio_ci(d["prefill_ms_samples"], p["prefill_ms_samples"]),
            "decode_speedup_ci": (ratio_ci(p["decode_tok_s_samples"], d["decode_tok_s_samples"])
                                  if "decode_tok_s_samples" in p and "decode_tok_s_samples" in d else None),
            "memory_saving": _saving(d.get("peak_mem_bytes"), p.get("peak_mem_bytes")),
            "kv_cache_saving": _saving(d.get("kv_cache_bytes"), p.get("kv_cache_bytes")),
            "weight_saving": _saving(d.get("weight_bytes"), p.get("weight_bytes"))})
    largest = per_bs[-1] if per_bs else {}
    prefill = _geomean([r["prefill_speedup"] for r in per_bs])
    section: dict[str, Any] = {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "prompt_len": settings.prompt_len, "decode_tokens": settings.decode_tokens,
        "batch_sizes": list(settings.batch_sizes), "repeats": settings.repeats, "warmup": settings.warmup,
        "prefill_speedup": prefill, "decode_speedup": _geomean([r["decode_speedup"] for r in per_bs]),
        "ideal_speedup": ideal["ideal_speedup"], "ideal_decode_speedup": ideal.get("ideal_decode_speedup"),
        "prefill_vs_ideal": _ratio(prefill, ideal["ideal_speedup"]),
        "prefill_gain_vs_ideal": ((prefill - 1) / (ideal["ideal_speedup"] - 1)
                                  if prefill is not None and ideal["ideal_speedup"] > 1 else None),
        "memory_saving": largest.get("memory_saving"), "kv_cache_saving": largest.get("kv_cache_saving"),
        "weight_saving": largest.get("weight_saving"),
        "flops_per_token": {"dense": ideal["dense_flops_per_token"], "pruned": ideal["pruned_flops_per_token"]},
        "memory_method": memory_method, "ratios": per_bs, "runs": rows}
    return section


def bench_models(dense: nn.Module, pruned: nn.Module, settings: BenchSettings, *, dense_spec: str | None = None,
                 pruned_spec: str | None = None, memory: bool = True, progress: bool = True) -> dict[str, Any]:
    """Time both models (interleaved), measure memory, and return the report's `speed` section.

    On CPU, memory is measured in fresh subprocesses that load `dense_spec` / `pruned_spec` (model ids or
    directories); without them (or with memory=False) only exact weight and KV-cache bytes are reported.
    """
    settings.validate()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    g_dense, hidden, vocab = model_shape(dense)
    g_pruned, hidden_p, vocab_p = model_shape(pruned)
    if (hidden, vocab) != (hidden_p, vocab_p):
        raise UsageError(f"dense and pruned models differ in hidden size / vocabulary ({hidden}/{vocab} vs "
                         f"{hidden_p}/{vocab_p}): not a dense/pruned pair")
    ideal = ideal_speedups(g_dense, g_pruned, hidden, vocab, settings.prompt_len, settings.decode_tokens)
    device = next(pruned.parameters()).device
    dtype = next(pruned.parameters()).dtype
    models = {"dense": dense, "pruned": pruned}
    specs = {"dense": dense_spec, "pruned": pruned_spec}
    mem: dict[str, dict[int, dict[str, Any]]] | None = None
    method = "not measured (exact weight and KV-cache bytes only)"
    if memory and device.type == "cuda":
        mem, method = {name: cuda_peak(m, vocab, settings) for name, m in models.items()}, CUDA_METHOD
    elif memory and all(specs.values()):
        mem = cpu_peaks({k: str(v) for k, v in specs.items()}, settings, str(dtype).replace("torch.", ""))
        method = next(iter(mem["pruned"].values()))["method"]
        mem = {name: {bs: {k: v for k, v in r.items() if k != "method"} for bs, r in rows.items()}
               for name, rows in mem.items()}
    elif memory:
        log.warning("peak memory on CPU is measured in fresh processes that load the models by name; "
                    "no model ids/directories were given, so only exact weight and KV-cache bytes are reported")
    rows = run_speed(models, vocab, settings, progress=progress, memory=mem)
    if mem is None:  # exact bytes still mean something without a peak measurement
        _add_exact_bytes(rows, models, vocab, settings)
    return speed_section(rows, settings, ideal, device, dtype, method)


def _add_exact_bytes(rows: list[dict], models: dict[str, nn.Module], vocab: int, settings: BenchSettings) -> None:
    from .bench import cache_bytes, random_prompts, time_once, weight_bytes

    for r in rows:
        model = models[r["model"]]
        ids = random_prompts(vocab, r["batch_size"], settings.prompt_len, settings.seed + r["batch_size"])
        _, _, cache = time_once(model, ids, settings.decode_tokens)
        r.update(weight_bytes=weight_bytes(model), kv_cache_bytes=cache_bytes(cache))


def speed_table(speed: dict[str, Any]) -> str:
    """Plain-text table of a speed section (what `llmprune bench` prints)."""

    def mib(x: Any) -> str:
        return "-" if x is None else f"{x / 2**20:.1f}"

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None else fmt.format(x)

    lines = [f"{speed['device']} {speed['dtype']}, {speed['threads']} threads, prompt {speed['prompt_len']}, "
             f"{speed['decode_tokens']} decode steps, median of {speed['repeats']} (IQR)",
             f"{'batch':>5} {'model':<7} {'prefill ms':>16} {'decode tok/s':>16} {'peak MiB':>9} {'KV MiB':>8}"]
    for r in speed["runs"]:
        dec = f"{r['decode_tok_s_median']:.1f} ({r['decode_tok_s_iqr']:.1f})" if "decode_tok_s_median" in r else "-"
        lines.append(f"{r['batch_size']:>5} {r['model']:<7} {r['prefill_ms_median']:>9.1f} ({r['prefill_ms_iqr']:>4.1f})"
                     f" {dec:>16} {mib(r.get('peak_mem_bytes')):>9} {mib(r.get('kv_cache_bytes')):>8}")
    lines.append(f"prefill speed-up {f(speed['prefill_speedup'], '{:.3f}')}x (ideal from FLOPs "
                 f"{speed['ideal_speedup']:.3f}x, measured/ideal {f(speed.get('prefill_vs_ideal'), '{:.0%}')}); "
                 f"decode speed-up {f(speed['decode_speedup'], '{:.3f}')}x; memory saving "
                 f"{f(speed.get('memory_saving'), '{:.1%}')} (KV cache {f(speed.get('kv_cache_saving'), '{:.1%}')})")
    return "\n".join(lines)


__all__ = ["bench_models", "model_shape", "speed_section", "speed_table"]
