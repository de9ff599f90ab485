"""What a sublayer-removal plan removed: a text listing (for `llmprune inspect`) and a depth figure.

The figure follows the FinerCut paper's interpretability plot: one row for attention and one for
FFN sublayers, one column per layer, removed sublayers coloured by the greedy step that removed them.
"""
from __future__ import annotations

from pathlib import Path

from ...plan import Plan

FIGURE_FILE = "finercut_removed_sublayers.png"


def removed_sublayers(plan: Plan) -> dict[str, list[int]]:
    """Layers whose attention / FFN sublayer the plan removes (present in the base model, dropped by the plan)."""
    out: dict[str, list[int]] = {"attn": [], "mlp": []}
    for i, (g, lp) in enumerate(zip(plan.geometry, plan.layers)):
        if g.has_attn and lp.attn.drop:
            out["attn"].append(i)
        if g.has_mlp and lp.mlp.drop:
            out["mlp"].append(i)
    return out


def removal_report(plan: Plan) -> str:
    """Which sublayers are removed and, when the plan records it, in which order: '' if none."""
    gone = removed_sublayers(plan)
    if not gone["attn"] and not gone["mlp"]:
        return ""
    present = sum(g.has_attn + g.has_mlp for g in plan.geometry)
    n_gone = len(gone["attn"]) + len(gone["mlp"])
    lines = [f"sublayers removed: {n_gone} of {present} ({n_gone / present:.1%}); "
             f"decoder linear params removed: {plan.sparsity():.2%}",
             f"  attention ({len(gone['attn'])}): layers {_ranges(gone['attn'])}",
             f"  FFN ({len(gone['mlp'])}): layers {_ranges(gone['mlp'])}"]
    order = plan.extras.get("removal_order")
    if order:
        info = plan.extras.get("finercut") or {}
        lines.append(f"removal order ({info.get('distance', 'distance')} to the dense model after each step):")
        lines.append(f"{'step':>5}  {'layer':>5}  {'sublayer':<9} {'divergence':>12}")
        for k, e in enumerate(order, 1):
            lines.append(f"{e.get('step', k):>5}  {e['layer']:>5}  {e['sublayer']:<9} {e['divergence']:>12.6g}")
    return "\n".join(lines)


def _ranges(idx: list[int]) -> str:
    if not idx:
        return "-"
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def removal_figure(plan: Plan, path: str | Path) -> None:
    """PNG: attention and FFN rows × layers; removed cells coloured (and labelled) by removal step."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    n = len(plan.geometry)
    steps = np.full((2, n), np.nan)  # removal step per cell
    for k, e in enumerate(plan.extras.get("removal_order") or [], 1):
        steps[0 if e["sublayer"] == "attn" else 1, e["layer"]] = e.get("step", k)
    gone = removed_sublayers(plan)
    for row, kind in enumerate(("attn", "mlp")):  # removed without a recorded order: mark as removed
        for i in gone[kind]:
            if np.isnan(steps[row, i]):
                steps[row, i] = 0
    absent = np.array([[not g.has_attn for g in plan.geometry], [not g.has_mlp for g in plan.geometry]])

    fig = Figure(figsize=(max(6.0, 0.28 * n + 2.0), 2.6), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.where(absent, 1.0, 0.0), cmap=ListedColormap(["#eeeeee", "#555555"]), vmin=0, vmax=1,
              aspect="auto")
    last = int(np.nanmax(steps)) if not np.all(np.isnan(steps)) else 1
    im = ax.imshow(np.ma.masked_invalid(steps), cmap="plasma_r", vmin=0, vmax=max(last, 1), aspect="auto")
    if n <= 64:
        for (r, c), v in np.ndenumerate(steps):
            if not np.isnan(v) and v > 0:
                ax.text(c, r, str(int(v)), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks([0, 1], ["attention", "FFN"])
    ax.set_xticks(range(0, n, max(1, n // 16)))
    ax.set_xlabel("layer (depth)")
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks([0.5], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    info = plan.extras.get("finercut") or {}
    ax.set_title(f"removed sublayers: {len(gone['attn'])} attention, {len(gone['mlp'])} FFN of {n} layers"
                 f" — {plan.sparsity():.1%} of decoder linear params"
                 + (f" ({info['distance']}, {info['mode']})" if info else ""), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01).set_label("removal step", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def finercut_artifacts(plan: Plan, directory: Path) -> list[str]:
    """Checkpoint artifacts of a FinerCut plan: the removal-by-depth figure (nothing when no sublayer is removed)."""
    if not any(removed_sublayers(plan).values()):
        return []
    removal_figure(plan, Path(directory) / FIGURE_FILE)
    return [FIGURE_FILE]


__all__ = ["FIGURE_FILE", "finercut_artifacts", "removal_figure", "removal_report", "removed_sublayers"]
