#!/usr/bin/env python
"""Benchmark FinerCut's search: straightforward vs exact vs fast, on SmolLM2-135M (CPU) by default.

Each variant runs in a fresh subprocess (so its peak RSS is its own): load the model, draw the
calibration set (python-docs train), search up to the largest ratio of sublayers, then measure
perplexity on python-docs *test* (disjoint from the calibration text) at every ratio — the
removal order is nested, so one run gives all ratios. Printed: wall and CPU time of the search,
speed-up over the straightforward search, peak RSS, the search's work (decoder sublayer·tokens
and LM-head tokens — machine-independent), agreement of the removal order with the
straightforward one, and perplexity.

    python scripts/bench_finercut.py                       # defaults: 10 x 64 tokens, 10 % and 25 %
    python scripts/bench_finercut.py --nsamples 10 --seqlen 256 --variants exact fast
    python scripts/bench_finercut.py --fast topk_vocab=256 --fast rescore_top=6

The straightforward variant (pruner.mode=reference) runs a full forward under surgery.simulate
for every candidate at every step (Σ(C−k) forwards) and dominates the run time.
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

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"straightforward": "reference", "exact": "exact", "fast": "fast"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--calibration", default="python-docs", help="calibration source (train split)")
    p.add_argument("--nsamples", type=int, default=10, help="calibration sequences (the paper uses 10)")
    p.add_argument("--seqlen", type=int, default=64, help="tokens per calibration sequence (the paper uses 256)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--distance", default="js")
    p.add_argument("--candidates", default="sublayers")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.10, 0.25], help="fractions of sublayers")
    p.add_argument("--fast", action="append", default=[], metavar="KEY=VALUE", help="fast-mode option, e.g. "
                   "topk_vocab=256 (repeatable)")
    p.add_argument("--eval-data", default="python-docs", help="perplexity text (test split)")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one variant, in its own process -----------------------------------------------------------------
def run_child(args: argparse.Namespace) -> dict:
    import torch

    import llmprune as lp
    from llmprune import api, surgery
    from llmprune.prune.finercut import plan_at
    from llmprune.recipe import load_recipe, parse_override

    torch.set_grad_enabled(False)
    mode = VARIANTS[args.child]
    loaded = lp.load(args.model, device=args.device, dtype=args.dtype)
    overrides = {"pruner.mode": mode, "pruner.distance": args.distance, "pruner.candidates": args.candidates,
                 "pruner.target_sublayers": max(args.ratios), "calibration.source": args.calibration,
                 "calibration.nsamples": args.nsamples, "calibration.seqlen": args.seqlen,
                 "calibration.batch_size": args.batch_size}
    for item in args.fast:
        key, value = parse_override(item)
        overrides[f"pruner.fast.{key}"] = value
    recipe = load_recipe("finercut", overrides)
    tokens, _ = api.calibration_tokens(loaded.tokenizer, recipe)
    rss_loaded = _rss_now_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    plan = api.make_plan(loaded.model, recipe, tokens, family=loaded.family, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"variant": args.child, "mode": mode, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak,
           "rss_after_load_mb": rss_loaded, "order": [[e["layer"], e["sublayer"]] for e in plan.extras["removal_order"]],
           "search": plan.extras["finercut"], "ppl": {}}
    for r in sorted(args.ratios):
        sub = plan_at(plan, r)
        pruned = surgery.apply(loaded.model, sub, loaded.family)
        res, _ = api.eval_perplexity(pruned, loaded.tokenizer, args.eval_data, seqlen=args.eval_seqlen, split="test",
                                     max_windows=args.eval_windows, progress=False)
        out["ppl"][str(r)] = {"perplexity": res.perplexity, "sparsity": sub.sparsity(),
                              "removed": len(sub.extras["removal_order"])}
    if args.child == args.variants[0]:
        res, _ = api.eval_perplexity(loaded.model, loaded.tokenizer, args.eval_data, seqlen=args.eval_seqlen,
                                     split="test", max_windows=args.eval_windows, progress=False)
        out["dense_ppl"] = res.perplexity
    return out


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- the table ----------------------------------------------------------------------------------------
def agreement(order: list, ref: list, ratio: float, n_candidates: int) -> str:
    """'same' when the first floor(r·C) removals are identical, else the overlap of the removed sets."""
    k = int(ratio * n_candidates)
    a, b = [tuple(x) for x in order[:k]], [tuple(x) for x in ref[:k]]
    if a == b:
        return "same"
    return f"{len(set(a) & set(b))}/{k} set"


def table(results: list[dict], args: argparse.Namespace) -> str:
    ref = next((r for r in results if r["variant"] == "straightforward"), results[0])
    n_cand = ref["search"]["n_candidates"]
    ratios = sorted(args.ratios)
    head = ["variant", "wall s", "cpu s", "speed-up", "peak RSS MB", "body Mtok", "head ktok"]
    head += [f"order@{r:.0%}" for r in ratios] + [f"ppl@{r:.0%}" for r in ratios]
    rows = [head]
    for r in results:
        s = r["search"]
        row = [r["variant"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{ref['wall_s'] / r['wall_s']:.2f}x",
               f"{r['peak_rss_mb']:.0f}", f"{s['body_tokens'] / 1e6:.2f}", f"{s['head_tokens'] / 1e3:.1f}"]
        row += [agreement(r["order"], ref["order"], q, n_cand) for q in ratios]
        row += [f"{r['ppl'][str(q)]['perplexity']:.3f}" for q in ratios]
        rows.append(row)
    w = [max(len(x[i]) for x in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    dense = next((r["dense_ppl"] for r in results if "dense_ppl" in r), None)
    cal = f"{args.nsamples} x {args.seqlen} tokens of {args.calibration} (train)"
    notes = [f"model {args.model} ({args.device}, {args.dtype}); calibration {cal}; distance {args.distance}; "
             f"{n_cand} candidates ({args.candidates}); search to {max(ratios):.0%} of them",
             f"perplexity: {args.eval_data} test, {args.eval_windows} windows x {args.eval_seqlen} tokens"
             + (f"; dense model {dense:.3f}" if dense else "")]
    for q in ratios:
        first = results[0]["ppl"][str(q)]
        notes.append(f"at {q:.0%}: {first['removed']} sublayers removed = {first['sparsity']:.2%} of decoder linear "
                     f"params ({results[0]['variant']})")
    exact = next((r for r in results if r["variant"] == "exact"), None)
    fast = next((r for r in results if r["variant"] == "fast"), None)
    if exact and fast:
        diffs = [f"{100 * (fast['ppl'][str(q)]['perplexity'] / exact['ppl'][str(q)]['perplexity'] - 1):+.2f} % at "
                 f"{q:.0%}" for q in ratios]
        notes.append("fast vs exact perplexity: " + ", ".join(diffs) + f"; final {args.distance}: fast "
                     f"{fast['search']['final_divergence']:.5g}, exact {exact['search']['final_divergence']:.5g}")
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant] + (argv if argv is not None else sys.argv[1:])
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {variant}: search {results[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
