"""report.png: task scores and speed, dense vs pruned, as grouped bar charts (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

DENSE_COLOR, PRUNED_COLOR = "#8c8c8c", "#1f77b4"


def _speed_bars(speed: dict[str, Any]) -> tuple[list[str], list[float]]:
    """Pruned relative to dense (= 1.0): prefill and decode throughput, ideal FLOP ratio, memory and KV cache."""
    labels, values = [], []
    for label, key in (("prefill\nspeed", "prefill_speedup"), ("decode\nspeed", "decode_speedup"),
                       ("ideal\n(FLOPs)", "ideal_speedup")):
        if speed.get(key) is not None:
            labels.append(label)
            values.append(float(speed[key]))
    for label, key in (("peak\nmemory", "memory_saving"), ("KV\ncache", "kv_cache_saving")):
        if speed.get(key) is not None:
            labels.append(label)
            values.append(1.0 - float(speed[key]))
    return labels, values


def render_figure(report: dict[str, Any], path: str | Path) -> bool:
    """Draw what the report holds; returns False (and writes nothing) when there is nothing to plot."""
    tasks = {k: v for k, v in (report.get("tasks") or {}).items() if v.get("pruned") is not None}
    speed_labels, speed_values = _speed_bars(report.get("speed") or {})
    panels = int(bool(tasks)) + int(bool(speed_labels))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + max(0, len(tasks) - 6) * 0.5, 4), squeeze=False)
    ax_iter = iter(axes[0])
    width = 0.4
    if tasks:
        ax = next(ax_iter)
        xs = range(len(tasks))
        names = list(tasks)
        base = [tasks[n].get("baseline") for n in names]
        if any(b is not None for b in base):
            ax.bar([x - width / 2 for x in xs], [b or 0.0 for b in base], width, label="dense", color=DENSE_COLOR)
        ax.bar([x + width / 2 for x in xs], [tasks[n]["pruned"] for n in names], width, label="pruned",
               color=PRUNED_COLOR)
        ax.set_xticks(list(xs), [f"{n}\n({tasks[n].get('metric')})" for n in names], rotation=30, ha="right",
                      fontsize=8)
        ax.set_ylabel("score")
        ax.set_title("lm-eval tasks")
        ax.legend(fontsize=8)
    if speed_labels:
        ax = next(ax_iter)
        xs = range(len(speed_labels))
        ax.bar([x - width / 2 for x in xs], [1.0] * len(speed_labels), width, label="dense", color=DENSE_COLOR)
        ax.bar([x + width / 2 for x in xs], speed_values, width, label="pruned", color=PRUNED_COLOR)
        for x, v in zip(xs, speed_values):
            ax.annotate(f"{v:.2f}", (x + width / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), speed_labels, fontsize=8)
        ax.set_ylabel("relative to dense (= 1)")
        speed = report["speed"]
        ax.set_title(f"speed & memory ({speed.get('device')}, prompt {speed.get('prompt_len')})")
        ax.legend(fontsize=8)
    fig.suptitle(str(report.get("model")), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


__all__ = ["render_figure"]
