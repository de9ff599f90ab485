"""The evaluation report: `report.json` + `report.md` (+ `report.png`) in the checkpoint directory.

One report per checkpoint. `llmprune eval`, `llmprune bench` and `--eval-tasks` each add their
sections; re-running merges into the existing report (perplexity per dataset, tasks per name,
speed replaced as a whole) instead of discarding what was measured before. report.json is the only
place results are stored (`pruning.json` is written once, at save time). Schema (all sections optional)::

    format, version, created, model, baseline, environment,
    perplexity: {dataset: {split, seqlen, n_windows, pruned, baseline, ...}},
    tasks: {task: {metric, pruned, baseline, retained_pct, num_fewshot, limit, stderr, all_metrics, ...}},
    tasks_average: {pruned, baseline, retained_pct, n_tasks},
    speed: {device, dtype, prompt_len, decode_tokens, batch_sizes, prefill_speedup, decode_speedup,
            ideal_speedup, memory_saving, runs: [...], ...},
    baseline_cache: {key: baseline result},   # reused when the same baseline + settings come again
    figures: ["report.png"]

`retained_pct` = 100 · pruned / baseline, the papers' "retained performance".
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import PRUNING_FILE, now_iso

log = logging.getLogger(__name__)

REPORT_FORMAT = "llmprune.report"
REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"


class ReportError(ValueError):
    pass


def environment(device: torch.device | str, dtype: torch.dtype | str, **extra: Any) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        import lm_eval

        env["lm_eval"] = getattr(lm_eval, "__version__", None) or _dist_version("lm_eval")
    except ImportError:  # pragma: no cover - lm-eval is a dependency
        env["lm_eval"] = None
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cpu_count"] = os.cpu_count()
    env.update(extra)
    return env


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def new_report(model: str, baseline: str | None, env: dict[str, Any]) -> dict[str, Any]:
    return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "created": now_iso(), "model": model,
            "baseline": baseline, "environment": env}


def load_report(directory: str | Path) -> dict[str, Any] | None:
    p = Path(directory) / REPORT_JSON
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{p} is not valid JSON ({e}); move it away to start a new report") from e
    if doc.get("format") != REPORT_FORMAT:
        raise ReportError(f"{p} is not an llmprune report (format={doc.get('format')!r}); move it away")
    if doc.get("version") != REPORT_VERSION:
        raise ReportError(f"{p} has report version {doc.get('version')}; this llmprune writes {REPORT_VERSION}")
    return doc


# ---- merging -------------------------------------------------------------------------------------------------
def merge_reports(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new` on top of `old`: per-dataset / per-task entries replaced, others kept; speed replaced whole."""
    if old is None:
        return finalize(copy.deepcopy(new))
    out = copy.deepcopy(old)
    for key in ("created", "model", "environment"):
        if key in new:
            out[key] = copy.deepcopy(new[key])
    if new.get("baseline") is not None:
        out["baseline"] = new["baseline"]
    for section in ("perplexity", "tasks", "baseline_cache"):
        if new.get(section):
            out.setdefault(section, {}).update(copy.deepcopy(new[section]))
    if "speed" in new:
        out["speed"] = copy.deepcopy(new["speed"])
    return finalize(out)


def retained_pct(pruned: float | None, baseline: float | None, higher_is_better: bool = True) -> float | None:
    """100 · pruned / baseline for higher-is-better scores (None when it is undefined)."""
    if pruned is None or baseline is None or not higher_is_better or baseline <= 0:
        return None
    return 100.0 * pruned / baseline


def finalize(report: dict[str, Any]) -> dict[str, Any]:
    """Recompute the derived numbers: per-task retained_pct and tasks_average."""
    tasks = report.get("tasks") or {}
    for entry in tasks.values():
        entry["retained_pct"] = retained_pct(entry.get("pruned"), entry.get("baseline"),
                                             entry.get("higher_is_better", True))
    scored = [e for e in tasks.values() if e.get("higher_is_better", True) and e.get("pruned") is not None]
    if scored:
        avg: dict[str, Any] = {"pruned": sum(e["pruned"] for e in scored) / len(scored), "n_tasks": len(scored)}
        paired = [e for e in scored if e.get("baseline") is not None]
        if paired and len(paired) == len(scored):
            avg["baseline"] = sum(e["baseline"] for e in paired) / len(paired)
            avg["retained_pct"] = retained_pct(avg["pruned"], avg["baseline"])
            avg["mean_task_retained_pct"] = sum(e["retained_pct"] or 0.0 for e in paired) / len(paired)
        report["tasks_average"] = avg
    else:
        report.pop("tasks_average", None)
    return report


# ---- saving --------------------------------------------------------------------------------------------------
def save_report(directory: str | Path, report: dict[str, Any], figure: bool = True) -> list[Path]:
    """Write report.json, report.md and (when there is something to plot) report.png."""
    from .figure import render_figure

    d = Path(directory)
    if not d.is_dir():
        raise ReportError(f"report directory {d} does not exist")
    written = []
    report = _finite(finalize(report))
    png = d / REPORT_PNG
    if figure and render_figure(report, png):
        report["figures"] = [REPORT_PNG]
        written.append(png)
    else:
        report.pop("figures", None)
    _atomic_write(d / REPORT_JSON, json.dumps(report, indent=1, default=_json_default, allow_nan=False) + "\n")
    _atomic_write(d / REPORT_MD, render_markdown(report, _pruning_params(d)))
    written[:0] = [d / REPORT_JSON, d / REPORT_MD]
    return written


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _finite(o: Any) -> Any:
    """The report with NaN / ±inf replaced by null, so report.json is strict JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _pruning_params(d: Path) -> dict[str, Any] | None:
    p = d / PRUNING_FILE
    if not p.exists():
        return None
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    params = dict(doc.get("params") or {})
    params["method"] = (doc.get("plan") or {}).get("method")
    return params


# ---- markdown ------------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = "{:.4f}") -> str:
    return "–" if x is None else fmt.format(x)


def _mib(x: Any) -> str:
    return "–" if x is None else f"{x / 2**20:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def render_markdown(report: dict[str, Any], params: dict[str, Any] | None = None) -> str:
    env = report.get("environment") or {}
    lines = [f"# Evaluation report: {report.get('model')}", "",
             f"- baseline (dense): {report.get('baseline') or 'none'}",
             f"- created {report.get('created')}; device {env.get('device')}, dtype {env.get('dtype')}, "
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, lm-eval {env.get('lm_eval')}"]
    if params and "total_before" in params:
        lines.append(f"- pruning: {params.get('method')}, decoder linear params {params['linear_before']:,} → "
                     f"{params['linear_after']:,} ({params['sparsity']:.2%} removed); total params "
                     f"{params['total_before']:,} → {params['total_after']:,} ({params['total_sparsity']:.2%})")
    lines.append("")
    ppl = report.get("perplexity") or {}
    if ppl:
        lines += ["## Perplexity", "", "Non-overlapping windows of `seqlen` tokens, exp(mean NLL); lower is better.", ""]
        lines += _table(["dataset", "split", "seqlen", "windows", "pruned", "baseline", "pruned / baseline"],
                        [[k, str(v.get("split")), str(v.get("seqlen")), str(v.get("n_windows")),
                          _f(v.get("pruned"), "{:.3f}"), _f(v.get("baseline"), "{:.3f}"),
                          _f(v["pruned"] / v["baseline"] if v.get("baseline") else None, "{:.3f}×")]
                         for k, v in ppl.items()])
        lines.append("")
    tasks = report.get("tasks") or {}
    if tasks:
        lines += ["## lm-eval tasks", "", "Retained = 100 · pruned / baseline.", ""]
        rows = [[k, v.get("metric", ""), str(v.get("num_fewshot")), str(v.get("limit")),
                 _f(v.get("pruned")) + (f" ± {v['stderr']:.3f}" if v.get("stderr") is not None else ""),
                 _f(v.get("baseline")), _f(v.get("retained_pct"), "{:.1f} %")] for k, v in tasks.items()]
        avg = report.get("tasks_average")
        if avg:
            rows.append([f"**average ({avg.get('n_tasks')})**", "", "", "", _f(avg.get("pruned")),
                         _f(avg.get("baseline")), _f(avg.get("retained_pct"), "{:.1f} %")])
        lines += _table(["task", "metric", "shots", "limit", "pruned", "baseline", "retained"], rows)
        lines.append("")
    speed = report.get("speed")
    if speed:
        lines += _speed_markdown(speed)
    if report.get("figures"):
        lines += [f"![scores and speed, dense vs pruned]({report['figures'][0]})", ""]
    return "\n".join(lines)


def _speed_markdown(speed: dict[str, Any]) -> list[str]:
    lines = ["## Speed and memory", "",
             f"{speed.get('device')} ({speed.get('dtype')}, {speed.get('threads')} threads), prompt "
             f"{speed.get('prompt_len')} tokens, {speed.get('decode_tokens')} decode steps, median of "
             f"{speed.get('repeats')} interleaved repeats after {speed.get('warmup')} warm-up (± IQR).", "",
             f"- prefill speed-up **{_f(speed.get('prefill_speedup'), '{:.3f}×')}** (ideal from FLOPs "
             f"{_f(speed.get('ideal_speedup'), '{:.3f}×')}; measured/ideal {_f(speed.get('prefill_vs_ideal'), '{:.0%}')})",
             f"- decode speed-up **{_f(speed.get('decode_speedup'), '{:.3f}×')}** (FLOP ratio "
             f"{_f(speed.get('ideal_decode_speedup'), '{:.3f}×')})",
             f"- peak memory saving {_f(speed.get('memory_saving'), '{:.1%}')} "
             f"(KV cache {_f(speed.get('kv_cache_saving'), '{:.1%}')}, weights {_f(speed.get('weight_saving'), '{:.1%}')})",
             ""]
    rows = []
    for r in speed.get("runs") or []:
        rows.append([str(r["batch_size"]), r["model"],
                     f"{r['prefill_ms_median']:.1f} ± {r['prefill_ms_iqr']:.1f}",
                     f"{r['decode_tok_s_median']:.1f} ± {r['decode_tok_s_iqr']:.1f}" if "decode_tok_s_median" in r
                     else "–", _mib(r.get("peak_mem_bytes")), _mib(r.get("weight_bytes")),
                     _mib(r.get("kv_cache_bytes"))])
    lines += _table(["batch", "model", "prefill ms", "decode tok/s", "peak MiB", "weights MiB", "KV cache MiB"], rows)
    lines += ["", f"Memory: {speed.get('memory_method', 'not measured')}.", ""]
    return lines


__all__ = ["REPORT_FORMAT", "REPORT_JSON", "REPORT_MD", "REPORT_PNG", "REPORT_VERSION", "ReportError", "environment",
           "finalize", "load_report", "merge_reports", "new_report", "render_markdown", "retained_pct",
           "save_report"]
