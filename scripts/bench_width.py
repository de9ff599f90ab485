#!/usr/bin/env python
"""Benchmark the width pruners on a real model: params kept, perplexity, pruning time, peak memory.

    python scripts/bench_width.py                         # SmolLM2-135M (GQA 9q/3kv), sparsity 0.2 and 0.5
    python scripts/bench_width.py --sparsities 0.3 --no-matrix --nsamples 64 --eval-windows 32

Table 1: dense model and one row per method (its built-in recipe: magnitude, FLAP, Wanda-sp, CFSP,
plus the `faithful` variants of FLAP and CFSP). Each row runs in a fresh Python process, so its peak
resident memory (ru_maxrss, read right after pruning: load + calibration + planning + surgery) is
its own; on CUDA the peak allocated device memory is reported too.
Table 2: perplexity of every pruner × allocation (uniform, global, coarse_to_fine, owl).
Table 3 (`--recon`): every pruner × {reconstruct none, ls} × {uniform, coarse_to_fine, search}, and
the `obs` recipe × the same allocations: perplexity, pruning time, peak RSS (docs/reconstruction.md).

Calibration text is the `python-docs` train split, evaluation its test split (disjoint topics);
perplexity is corpus perplexity over non-overlapping windows (see llmprune.evaluate.perplexity).
Wall-clock numbers depend on the machine; compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from llmprune.recipe import parse_override  # noqa: E402  (--set values parsed as YAML, as the CLI does)
METHODS = {  # row name -> (recipe, overrides)
    "magnitude": ("magnitude", {}),
    "flap": ("flap", {}),
    "flap-faithful": ("flap", {"pruner.faithful": True}),
    "wanda-sp": ("wanda-sp", {}),
    "cfsp": ("cfsp", {}),
    "cfsp-faithful": ("cfsp", {"pruner.faithful": True, "pruner.attention": False}),
    # ablations (not run by default): compensation off, CFSP's score on FFN only
    "flap-nocomp": ("flap", {"pruner.compensate": False}),
    "cfsp-ffn": ("cfsp", {"pruner.attention": False}),
}
DEFAULT_METHODS = ["magnitude", "flap", "flap-faithful", "wanda-sp", "cfsp", "cfsp-faithful"]
ALLOCATIONS = ("uniform", "global", "coarse_to_fine", "owl")
MATRIX_PRUNERS = ("magnitude", "flap", "wanda-sp", "cfsp")
RECON_PRUNERS = ("magnitude", "flap", "wanda-sp", "cfsp", "obs")
RECON_ALLOCATIONS = ("uniform", "coarse_to_fine", "search")


def allocation_overrides(pruner: str, allocation: str) -> dict[str, Any]:
    """Recipe overrides that make `pruner` use `allocation` (FLAP names its two basic ones structures)."""
    if pruner == "flap" and allocation in ("uniform", "global"):
        return {"pruner.structure": "UL-MM" if allocation == "uniform" else "AL-AM", "pruner.allocation": allocation}
    return {"pruner.allocation": allocation}


def recipe_default_allocation(pruner: str) -> str:
    return {"magnitude": "uniform", "flap": "global", "wanda-sp": "uniform", "cfsp": "coarse_to_fine",
            "obs": "uniform"}[pruner]


def recon_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Table 3's rows: (pruner, reconstruct, allocation, sparsity) with their recipe overrides."""
    search = {"pruner.search.generations": args.search_generations, "pruner.search.offspring": args.search_offspring,
              "pruner.search.samples": args.search_samples, "pruner.search.population": args.search_population}
    jobs = []
    for s in args.sparsities:
        for p in args.recon_pruners:
            for rc in (("ls",) if p == "obs" else args.recon_modes):
                for a in args.recon_allocations:
                    ov = {**allocation_overrides(p, a), **(search if a == "search" else {})}
                    if p != "obs":
                        ov["pruner.reconstruct"] = rc
                    ov.update(dict(parse_override(kv) for kv in args.set))  # YAML values, as the CLI
                    if args.rows and f"{p}/{rc}/{a}" not in args.rows:
                        continue
                    jobs.append({"name": f"{p}/{rc}/{a}", "recipe": p, "overrides": ov, "sparsity": s,
                                 "pruner": p, "reconstruct": rc, "allocation": a})
    return jobs


def fmt_recon(rows: list[dict[str, Any]], sparsity: float, allocations: list[str]) -> str:
    """Rows pruner / reconstruct, columns allocation; cells `ppl (prune s, peak RSS MB)`."""
    lines = [f"sparsity {sparsity:.0%}: perplexity (pruning s, peak RSS MB)",
             "| pruner | reconstruct | " + " | ".join(allocations) + " |", "|---|---|" + "---|" * len(allocations)]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r.get("sparsity_target") != sparsity:
            continue
        c = cells.setdefault((r["pruner"], r["reconstruct"]), {})
        c[r["allocation"]] = ("error" if "error" in r else
                              f"{r['ppl']:.2f} ({r['prune_s']:.0f} s, {r['peak_rss_mb']:.0f})")
    for (p, rc), c in cells.items():
        lines.append(f"| {p} | {rc} | " + " | ".join(c.get(a, "") for a in allocations) + " |")
    return "\n".join(lines)


# ---- one measurement (runs in the worker process) ---------------------------------------------------
def measure(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import llmprune as lp
    from llmprune import api, data, surgery
    from llmprune.prune import get_pruner

    torch.manual_seed(0)
    loaded = lp.load(job["model"], device=job["device"], dtype=job["dtype"])
    eval_ids, _ = data.eval_tokens(loaded.tokenizer, job["eval_data"], split="test")
    total_before = api.count_params(loaded.model)
    out: dict[str, Any] = {"name": job["name"], "sparsity_target": job.get("sparsity")}
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    model = loaded.model
    t0 = time.perf_counter()
    if job.get("recipe"):
        overrides = {"sparsity": job["sparsity"], "calibration.source": job["calib_data"],
                     "calibration.nsamples": job["nsamples"], "calibration.seqlen": job["seqlen"],
                     "calibration.batch_size": job["batch_size"], **job.get("overrides", {})}
        recipe = lp.load_recipe(job["recipe"], overrides)
        tokens = None
        if get_pruner(recipe.method).wants_data(recipe.options):
            tokens, _ = api.calibration_tokens(loaded.tokenizer, recipe)
        t0 = time.perf_counter()
        plan = api.make_plan(model, recipe, tokens, family=loaded.family, progress=False)
        model = surgery.apply(model, plan, loaded.family)
        del loaded.model
        out["linear_sparsity"] = plan.sparsity()
        out["linear_params"] = plan.params_after()
        out["linear_before"] = plan.params_before()
        if "search" in plan.extras:
            out["search"] = {k: plan.extras["search"][k] for k in ("kl_centre", "kl_best", "generations")}
    else:
        geo = loaded.family.geometry(model)
        out["linear_sparsity"] = 0.0
        out["linear_params"] = out["linear_before"] = sum(g.linear_params() for g in geo)
    out["prune_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available() and job["device"] != "cpu":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["total_params"] = api.count_params(model)
    out["total_before"] = total_before
    from llmprune.evaluate.perplexity import perplexity

    res = perplexity(model, eval_ids, seqlen=job["eval_seqlen"], max_windows=job["eval_windows"], progress=False)
    out["ppl"] = res.perplexity
    return out


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run `measure` in a fresh interpreter (its own peak memory) and return its result."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return {"name": job["name"], "sparsity_target": job.get("sparsity"), "error": proc.stderr.strip()[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- tables ---------------------------------------------------------------------------------------
def fmt_table(rows: list[dict[str, Any]]) -> str:
    head = ["method", "target", "linear sparsity", "linear params", "total params", "ppl", "prune s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['sparsity_target']} | error: {r['error'].splitlines()[-1][:80]} |")
            continue
        target = "—" if r["sparsity_target"] is None else f"{r['sparsity_target']:.0%}"
        cuda = f" (cuda {r['peak_cuda_mb']:.0f})" if "peak_cuda_mb" in r else ""
        lines.append(f"| {r['name']} | {target} | {r['linear_sparsity']:.2%} | {r['linear_params']:,} | "
                     f"{r['total_params']:,} | {r['ppl']:.2f} | {r['prune_s']:.1f} | {r['peak_rss_mb']:.0f}{cuda} |")
    return "\n".join(lines)


def fmt_matrix(matrix: dict[tuple[str, str, float], float | str], sparsity: float, pruners: list[str],
               allocations: list[str]) -> str:
    lines = [f"perplexity at sparsity {sparsity:.0%} (rows: pruner, columns: allocation; * = recipe default)",
             "| pruner | " + " | ".join(allocations) + " |", "|---|" + "---|" * len(allocations)]
    for p in pruners:
        cells = []
        for a in allocations:
            v = matrix.get((p, a, sparsity), "")
            mark = "*" if a == recipe_default_allocation(p) else ""
            cells.append(f"{v:.2f}{mark}" if isinstance(v, float) else str(v))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    ap.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seqlen", type=int, default=128, help="calibration tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=16, help="perplexity windows (test split)")
    ap.add_argument("--eval-seqlen", type=int, default=128)
    ap.add_argument("--calib-data", default="python-docs")
    ap.add_argument("--eval-data", default="python-docs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-matrix", action="store_true", help="skip the pruner x allocation table")
    ap.add_argument("--matrix-pruners", nargs="+", default=list(MATRIX_PRUNERS), choices=list(MATRIX_PRUNERS))
    ap.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS), choices=list(ALLOCATIONS))
    ap.add_argument("--recon", action="store_true", help="only table 3: reconstruction / OBS / search rows")
    ap.add_argument("--recon-pruners", nargs="+", default=list(RECON_PRUNERS), choices=list(RECON_PRUNERS))
    ap.add_argument("--recon-modes", nargs="+", default=["none", "ls"], choices=["none", "ls"])
    ap.add_argument("--recon-allocations", nargs="+", default=list(RECON_ALLOCATIONS), choices=list(RECON_ALLOCATIONS))
    ap.add_argument("--rows", nargs="+", default=None, help="only these table-3 rows, e.g. flap/ls/coarse_to_fine")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra recipe override for every table-3 row, e.g. pruner.reconstruct_target=residual")
    ap.add_argument("--skip-dense", action="store_true", help="do not measure the dense model")
    ap.add_argument("--search-generations", type=int, default=10)
    ap.add_argument("--search-offspring", type=int, default=8)
    ap.add_argument("--search-population", type=int, default=3)
    ap.add_argument("--search-samples", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0

    base = {"model": args.model, "device": args.device, "dtype": args.dtype, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "batch_size": args.batch_size, "eval_windows": args.eval_windows,
            "eval_seqlen": args.eval_seqlen, "calib_data": args.calib_data, "eval_data": args.eval_data}
    print(f"model {args.model}; calibration {args.calib_data} train {args.nsamples}x{args.seqlen}; "
          f"evaluation {args.eval_data} test {args.eval_windows}x{args.eval_seqlen}; device {args.device} {args.dtype}",
          flush=True)
    rows = [] if args.skip_dense else [run_worker({**base, "name": "dense"})]
    print(fmt_table(rows[-1:]), flush=True)
    if args.recon:
        done = []
        for job in recon_jobs(args):
            r = {**run_worker({**base, **job}), **{k: job[k] for k in ("pruner", "reconstruct", "allocation")}}
            done.append(r)
            print(fmt_table([r]).splitlines()[-1], flush=True)
            if args.json:  # written after every row: partial results survive an interrupted run
                args.json.write_text(json.dumps({"settings": base, "dense": rows[0] if rows else None, "recon": done}, indent=1))
        for s in args.sparsities:
            print("\n" + fmt_recon(done, s, args.recon_allocations) + "\n", flush=True)
        return 0
    matrix: dict[tuple[str, str, float], float | str] = {}
    for s in args.sparsities:
        for name in args.methods:
            recipe, overrides = METHODS[name]
            r = run_worker({**base, "name": name, "recipe": recipe, "overrides": overrides, "sparsity": s})
            rows.append(r)
            print(fmt_table([r]).splitlines()[-1], flush=True)
            if name in args.matrix_pruners and "ppl" in r:
                matrix[(name, recipe_default_allocation(name), s)] = r["ppl"]
    print("\n" + fmt_table(rows) + "\n", flush=True)
    if not args.no_matrix:
        for s in args.sparsities:
            for p in args.matrix_pruners:
                for a in args.allocations:
                    if (p, a, s) in matrix:
                        continue
                    r = run_worker({**base, "name": f"{p}/{a}", "recipe": p, "overrides": allocation_overrides(p, a),
                                    "sparsity": s})
                    matrix[(p, a, s)] = r.get("ppl", "error")
                    print(f"{p:10s} {a:15s} {s:.0%}: {matrix[(p, a, s)]}", flush=True)
            print("\n" + fmt_matrix(matrix, s, args.matrix_pruners, args.allocations) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"settings": base, "rows": rows,
                                         "matrix": [{"pruner": p, "allocation": a, "sparsity": s, "ppl": v}
                                                    for (p, a, s), v in matrix.items()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
