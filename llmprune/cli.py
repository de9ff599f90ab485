"""Command line: a thin argparse front, each subcommand calls one api function.

    llmprune --model M --recipe R [--sparsity S] -o DIR      the main job (load, calibrate, plan, apply, save)
    llmprune plan    --model M --recipe R -o plan.json        decide only; write the Plan
    llmprune apply   --model M --plan plan.json -o DIR        base model + plan -> checkpoint
    llmprune inspect PATH                                     per-layer structure of a checkpoint or plan
    llmprune eval    DIR [--data SRC] [--seqlen L]            perplexity (more evaluations: see README)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

SUBCOMMANDS = ("plan", "apply", "inspect", "eval")
EPILOG = """subcommands (run `llmprune SUBCOMMAND --help`):
  plan      decide what to remove and write plan.json (no weights are edited)
  apply     apply a plan.json to its base model and save the checkpoint
  inspect   print a checkpoint's or plan's per-layer structure and parameter counts
  eval      perplexity of a checkpoint (or any model) on a dataset or local text

examples:
  llmprune --model smollm2-135m --recipe magnitude --sparsity 0.2 -o out/
  llmprune --model smollm2-135m --recipe finercut --target-sublayers 0.25 --calibration python-docs -o out/fc
  llmprune eval out/ --data python-docs --seqlen 256
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub id (org/name), local HF model directory, or the embedded "
                   "offline model 'smollm2-135m'")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: float32 on CPU, "
                   "bfloat16 on GPU); statistics are always accumulated in float64")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="built-in recipe name (see `recipes/`) or path to a YAML recipe")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of decoder-layer linear parameters to "
                   "remove, in [0, 1) (overrides the recipe)")
    p.add_argument("--target-sublayers", type=float, default=None, metavar="F", help="FinerCut's own target: "
                   "remove floor(F x #candidate sublayers), F in (0, 1), instead of a --sparsity parameter budget")
    p.add_argument("--calibration", default=None, metavar="SRC", help="calibration text: wikitext2, c4, pile, "
                   "python-docs (offline), a Hub dataset id, or a local .txt/.jsonl/.json/.parquet file or folder")
    p.add_argument("--nsamples", type=int, default=None, help="number of calibration sequences")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence")
    p.add_argument("--seed", type=int, default=None, help="seed for calibration sampling (same seed, same plan)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward pass")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set pruner.metric=ifv (repeatable)")
    p.add_argument("--offload", action="store_true", help="keep decoder blocks on the CPU and move one at a "
                   "time to the device while calibrating (for models larger than device memory)")


def _add_output_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--output", required=True, help=f"output {what}")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def build_main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmprune", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Structured pruning of Hugging Face causal LMs: load, calibrate, "
                                "plan, apply and save a smaller checkpoint.", epilog=EPILOG)
    _add_model_args(p)
    _add_recipe_args(p)
    _add_output_args(p, "directory for the pruned checkpoint")
    _add_common(p)
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    from . import __version__

    p.add_argument("--version", action="version", version=f"llmprune {__version__}")


def build_sub_parser(name: str) -> argparse.ArgumentParser:
    if name == "plan":
        p = argparse.ArgumentParser(prog="llmprune plan", description="Decide what to remove; write plan.json.")
        _add_model_args(p)
        _add_recipe_args(p)
        p.add_argument("-o", "--output", required=True, help="where to write the plan (JSON)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    elif name == "apply":
        p = argparse.ArgumentParser(prog="llmprune apply", description="Apply a plan to its base model; save.")
        _add_model_args(p)
        p.add_argument("--plan", required=True, help="plan.json written by `llmprune plan` (or a checkpoint dir)")
        _add_output_args(p, "directory for the pruned checkpoint")
    elif name == "inspect":
        p = argparse.ArgumentParser(prog="llmprune inspect", description="Per-layer structure and parameter counts.")
        p.add_argument("path", help="checkpoint directory or plan.json")
        p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    elif name == "eval":
        p = argparse.ArgumentParser(prog="llmprune eval", description="Perplexity of a checkpoint or model.")
        p.add_argument("path", help="pruned checkpoint directory (or any model id / directory)")
        p.add_argument("--data", default=None, help="evaluation text: wikitext2 (default), c4, pile, python-docs "
                       "(offline), a Hub dataset id, or a local file/folder")
        p.add_argument("--split", default="test", help="dataset split (default: test)")
        p.add_argument("--seqlen", type=int, default=512, help="window length for perplexity (default 512)")
        p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
        p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
        p.add_argument("--baseline", default=None, help="also evaluate this model (e.g. the dense base) for comparison")
        p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
        p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: float32 on CPU)")
    else:  # pragma: no cover - guarded by SUBCOMMANDS
        raise ValueError(name)
    _add_common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        name, args = argv[0], build_sub_parser(argv[0]).parse_args(argv[1:])
    else:
        name, args = "run", build_main_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .families import UnsupportedModelError
    from .plan import PlanError
    from .prune.allocate import BudgetError
    from .recipe import RecipeError
    from .api import ModelLoadError

    handled = (RecipeError, DataError, UnsupportedModelError, PlanError, CheckpointError, BudgetError,
               ModelLoadError, ValueError, FileNotFoundError)
    try:
        return {"run": cmd_run, "plan": cmd_plan, "apply": cmd_apply, "inspect": cmd_inspect,
                "eval": cmd_eval}[name](args, argv)
    except handled as e:
        if os.environ.get("LLMPRUNE_DEBUG"):
            raise
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _recipe_from_args(args: argparse.Namespace):  # noqa: ANN202
    from .recipe import load_recipe, parse_override

    overrides: dict[str, Any] = dict(parse_override(o) for o in args.overrides)
    if args.sparsity is not None and args.target_sublayers is not None:
        raise ValueError("give one target: --sparsity (fraction of parameters) or --target-sublayers (fraction of "
                         "sublayers), not both")
    for flag, key in (("sparsity", "sparsity"), ("target_sublayers", "pruner.target_sublayers"),
                      ("calibration", "calibration.source"), ("nsamples", "calibration.nsamples"),
                      ("seqlen", "calibration.seqlen"), ("seed", "calibration.seed"),
                      ("batch_size", "calibration.batch_size")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    recipe = load_recipe(args.recipe, overrides)
    explicit_source = args.calibration is not None or any(k == "calibration.source" for k in overrides) or \
        _recipe_sets_source(recipe.origin)
    return recipe, explicit_source


def _recipe_sets_source(origin: str) -> bool:
    import yaml

    try:
        data = yaml.safe_load(Path(origin).read_text()) or {}
    except OSError:
        return False
    return "source" in (data.get("calibration") or {})


def cmd_run(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api

    recipe, explicit = _recipe_from_args(args)
    res = api.run(args.model, recipe, args.output, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
                  explicit_source=explicit, offload=args.offload, revision=args.revision, progress=not args.quiet,
                  command="llmprune " + shlex.join(argv))
    if not args.quiet:
        print(res.plan.summary())
    from .prune.finercut_report import removal_report

    if removal_report(res.plan):
        print(removal_report(res.plan))
    print(summary_table(res.params, res.timings["total_s"], res.out))
    return 0


def summary_table(params: dict[str, Any], seconds: float, out: Path | str | None) -> str:
    rows = [
        ("", "before", "after", "removed"),
        ("decoder linear params", f"{params['linear_before']:,}", f"{params['linear_after']:,}",
         f"{params['sparsity']:.2%}"),
        ("total params", f"{params['total_before']:,}", f"{params['total_after']:,}",
         f"{params['total_sparsity']:.2%}"),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.append(f"wall time {seconds:.1f} s" + (f"; saved to {out}" if out else ""))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    recipe, explicit = _recipe_from_args(args)
    t = time.perf_counter()
    loaded = api.load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    tokens = None
    from .prune import get_pruner

    if get_pruner(recipe.method).needs_calibration:
        tokens, _ = api.calibration_tokens(loaded.tokenizer, recipe, explicit_source=explicit)
    plan = api.make_plan(loaded.model, recipe, tokens, family=loaded.family, base_model=loaded.base_model,
                         offload=args.offload, progress=not args.quiet)
    plan.base_revision = args.revision
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    print(plan.summary())
    print(f"plan written to {out} ({time.perf_counter() - t:.1f} s)")
    return 0


def cmd_apply(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api, surgery
    from .checkpoint import check_output_dir, save_pruned
    from .plan import Plan

    t = time.perf_counter()
    check_output_dir(args.output, args.overwrite)
    plan = Plan.load(args.plan)
    loaded = api.load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    before = api.count_params(loaded.model)
    pruned = surgery.apply(loaded.model, plan, loaded.family)
    params = api.params_summary(plan, before, api.count_params(pruned))
    info = {"params": params, "provenance": {"applied_from": str(args.plan), "model_arg": args.model,
                                             "command": "llmprune " + shlex.join(argv)}}
    save_pruned(pruned, loaded.tokenizer, args.output, plan, info=info, overwrite=args.overwrite)
    print(summary_table(params, time.perf_counter() - t, args.output))
    return 0


def cmd_inspect(args: argparse.Namespace, argv: list[str]) -> int:
    from .plan import Plan

    path = Path(args.path)
    plan = Plan.load(path)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    print(f"method: {plan.method}   base model: {plan.base_model}")
    print(plan.summary())
    from .prune.finercut_report import removal_report

    removals = removal_report(plan)
    if removals:
        print(removals)
    if path.is_dir():
        doc = json.loads((path / "pruning.json").read_text())
        cfg = json.loads((path / "config.json").read_text())
        kind = "non-uniform (llmprune_llama, needs trust_remote_code without llmprune)" \
            if cfg.get("model_type") == "llmprune_llama" else f"uniform (stock {cfg.get('model_type')})"
        print(f"checkpoint: {kind}")
        if "params" in doc:
            p = doc["params"]
            print(f"total params {p['total_before']:,} -> {p['total_after']:,} ({p['total_sparsity']:.2%} removed)")
        if doc.get("artifacts"):
            print(f"artifacts: {', '.join(str(path / a) for a in doc['artifacts'])}")
        for key, val in (doc.get("results") or {}).items():
            print(f"result {key}: {json.dumps(val)[:200]}")
    return 0


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api
    from .checkpoint import load_pruned, update_results

    dev = api.resolve_device(args.device)
    dt = api.resolve_dtype(args.dtype, dev)
    source = args.data or "wikitext2"
    path = Path(args.path)
    is_ckpt = (path / "pruning.json").exists()
    if is_ckpt:
        model, tok = load_pruned(path, device=dev, dtype=dt)
    else:
        loaded = api.load(args.path, device=dev, dtype=dt)
        model, tok = loaded.model, loaded.tokenizer
    res, src = api.eval_perplexity(model, tok, source, seqlen=args.seqlen, split=args.split,
                                   explicit_source=args.data is not None, max_windows=args.max_windows,
                                   batch_size=args.batch_size, progress=not args.quiet)
    rows = [(str(args.path), res)]
    results: dict[str, Any] = {"perplexity": {"dataset": src, **res.to_dict()}}
    if args.baseline:
        del model
        base = api.load(args.baseline, device=dev, dtype=dt)
        bres, _ = api.eval_perplexity(base.model, base.tokenizer, source, seqlen=args.seqlen, split=args.split,
                                      explicit_source=args.data is not None, max_windows=args.max_windows,
                                      batch_size=args.batch_size, progress=not args.quiet)
        rows.append((args.baseline + " (baseline)", bres))
        results["perplexity_baseline"] = {"model": args.baseline, **bres.to_dict()}
    print(f"perplexity on {src.get('name', source)} [{src.get('split', args.split)}], "
          f"{res.n_windows} windows x {res.seqlen} tokens")
    width = max(len(r[0]) for r in rows)
    for name, r in rows:
        print(f"  {name.ljust(width)}  ppl {r.perplexity:10.3f}   nll {r.nll:.4f}")
    if is_ckpt:
        update_results(path, results)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
