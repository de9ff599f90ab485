"""Command line: a thin argparse front, each subcommand calls one api function.

    llmprune --model M --recipe R [--sparsity S] -o DIR      the main job (load, calibrate, plan, apply, save)
    llmprune plan    --model M --recipe R -o plan.json        decide only; write the Plan
    llmprune apply   --model M --plan plan.json -o DIR        base model + plan -> checkpoint
    llmprune inspect PATH                                     per-layer structure of a checkpoint or plan
    llmprune eval    DIR [--data SRC] [--tasks T,...]         perplexity and lm-eval tasks vs a baseline -> report
    llmprune bench   DIR [--baseline MODEL]                   dense vs pruned speed and memory -> report
    llmprune push    DIR REPO_ID [--private] [--revision B]   upload a checkpoint + model card to the Hub
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

SUBCOMMANDS = ("plan", "apply", "inspect", "eval", "bench", "push")
EPILOG = """subcommands (run `llmprune SUBCOMMAND --help`):
  plan      decide what to remove and write plan.json (no weights are edited)
  apply     apply a plan.json to its base model and save the checkpoint
  inspect   print a checkpoint's or plan's per-layer structure and parameter counts
  eval      perplexity and lm-eval tasks of a checkpoint (or any model), optionally vs a baseline
  bench     dense vs pruned prefill latency, decode throughput and peak memory on this device
  push      upload a checkpoint and its generated model card to the Hugging Face Hub (one commit)

examples:
  llmprune --model smollm2-135m --recipe magnitude --sparsity 0.2 -o out/
  llmprune --model smollm2-135m --recipe finercut --target-sublayers 0.25 -o out/fc
  llmprune eval out/ --data python-docs --seqlen 256 --tasks quick --baseline base
  llmprune bench out/ --baseline smollm2-135m --prompt-len 256 --batch-sizes 1,4
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
    _add_main_eval_args(p)
    _add_push_args(p)
    _add_common(p)
    return p


def _add_main_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation after saving (the in-memory pruned model; report written into -o DIR)")
    g.add_argument("--eval-tasks", default=None, metavar="T,...", help="lm-eval tasks or task lists (eval/*.yaml), "
                   "e.g. zero_shot or arc_easy,hellaswag")
    g.add_argument("--eval-data", default=None, metavar="SRC", help="also report perplexity on this text (same "
                   "sources as eval --data)")
    g.add_argument("--eval-limit", type=float, default=None, metavar="N", help="at most N examples per task")
    g.add_argument("--eval-seqlen", type=int, default=512, metavar="L", help="perplexity window (default 512)")
    g.add_argument("--eval-batch-size", type=int, default=1, metavar="B", help="batch size for evaluation")
    g.add_argument("--eval-baseline", action="store_true", help="also evaluate the dense --model for retained %%")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="directory of custom lm-eval task YAMLs (repeatable)")


def _add_push_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("publishing (see `llmprune push --help`)")
    g.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="after a successful save, upload the "
                   "checkpoint and its model card to this Hub repo (token checked before pruning starts)")
    g.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    g.add_argument("--hub-revision", default=None, metavar="BRANCH", help="push to this branch (created if new)")
    g.add_argument("--hub-token", default=None, help="Hub token (default: HF_TOKEN, then `hf auth login`); "
                   "never recorded in pruning.json")
    g.add_argument("--hub-endpoint", default=None, metavar="URL", help="Hub URL (default: $HF_ENDPOINT or "
                   "https://huggingface.co)")


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
        p = argparse.ArgumentParser(prog="llmprune eval", description="Perplexity and lm-eval tasks of a checkpoint "
                                    "or model, optionally against a dense baseline; writes report.json/md/png into "
                                    "a checkpoint directory.")
        p.add_argument("path", help="pruned checkpoint directory (or any model id / directory)")
        p.add_argument("--data", default=None, help="perplexity text: wikitext2 (default when no --tasks), c4, pile, "
                       "python-docs (offline), a Hub dataset id, or a local file/folder")
        p.add_argument("--split", default="test", help="dataset split (default: test)")
        p.add_argument("--seqlen", type=int, default=512, help="window length for perplexity (default 512)")
        p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
        p.add_argument("--tasks", default=None, metavar="T,...", help="lm-eval task names and/or task lists from "
                       "eval/ (zero_shot, finercut, quick) or list YAML paths, comma-separated")
        p.add_argument("--limit", type=float, default=None, help="at most N examples per task (a value < 1 is a "
                       "fraction); overrides the task lists")
        p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (overrides the task lists)")
        p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                       help="directory of custom lm-eval task YAMLs (repeatable)")
        p.add_argument("--batch-size", type=int, default=1, help="windows / lm-eval requests per forward pass")
        p.add_argument("--baseline", default=None, help="also evaluate this dense model (id, directory, or `base` = "
                       "the model the checkpoint was pruned from) and report retained %%")
        p.add_argument("--no-cache", action="store_true", help="recompute the baseline even when the report "
                       "holds its results for the same settings")
        p.add_argument("--report", default=None, metavar="DIR", help="where to write the report (default: the "
                       "checkpoint directory; models that are not llmprune checkpoints get none unless given)")
        p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
        p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: float32 on CPU)")
    elif name == "bench":
        p = argparse.ArgumentParser(prog="llmprune bench", description="Dense vs pruned speed and memory on this "
                                    "device: prefill latency, decode tokens/s, peak memory incl. the KV cache; "
                                    "merged into the checkpoint's report.")
        p.add_argument("path", help="pruned checkpoint directory")
        p.add_argument("--baseline", default="base", help="dense model to compare with (default `base`: the model "
                       "the checkpoint was pruned from, as recorded in pruning.json)")
        p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (default 512)")
        p.add_argument("--decode-tokens", type=int, default=64, help="greedy decode steps after the prompt (default 64)")
        p.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes (default 1,4)")
        p.add_argument("--repeats", type=int, default=5, help="timed repeats per model and batch size (default 5)")
        p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (on CPU it runs "
                       "each model in a fresh subprocess)")
        p.add_argument("--report", default=None, metavar="DIR", help="where to write the report (default: the "
                       "checkpoint directory)")
        p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
        p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: float32 on CPU, "
                       "bfloat16 on GPU)")
    elif name == "push":
        p = argparse.ArgumentParser(prog="llmprune push", description="Upload a pruned checkpoint to the Hugging "
                                    "Face Hub in one commit, with a generated model card (README.md, also written "
                                    "into DIR). Token: --token, else HF_TOKEN, else the `hf auth login` cache.")
        p.add_argument("path", help="checkpoint directory (written by `llmprune ... -o DIR`)")
        p.add_argument("repo_id", help="Hub repo, NAMESPACE/NAME (a bare NAME goes to your own namespace)")
        p.add_argument("--private", action="store_true", help="create the repo as private (an existing public "
                       "repo is refused, not silently published to)")
        p.add_argument("--revision", default=None, metavar="BRANCH", help="branch to commit to (created from main "
                       "if new; default main)")
        p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN, then the "
                       "`hf auth login` cache)")
        p.add_argument("--endpoint", default=None, metavar="URL", help="Hub URL (default: $HF_ENDPOINT or "
                       "https://huggingface.co)")
        p.add_argument("--commit-message", default=None, help="commit title (default: method, sparsity, base)")
        p.add_argument("--dry-run", action="store_true", help="write README.md and list what would be uploaded; "
                       "no network")
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
    from .hub import PushError

    handled = (RecipeError, DataError, UnsupportedModelError, PlanError, CheckpointError, BudgetError,
               ModelLoadError, PushError, ValueError, FileNotFoundError)
    try:
        return {"run": cmd_run, "plan": cmd_plan, "apply": cmd_apply, "inspect": cmd_inspect,
                "eval": cmd_eval, "bench": cmd_bench, "push": cmd_push}[name](args, argv)
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
    if args.push_to_hub:  # fail on a missing/invalid token now, not after an hour of pruning
        from .hub import preflight

        preflight(args.push_to_hub, token=args.hub_token, endpoint=args.hub_endpoint)
    eval_req = _main_eval_request(args)  # bad task names fail here, before any pruning work
    res = api.run(args.model, recipe, args.output, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
                  explicit_source=explicit, offload=args.offload, revision=args.revision, progress=not args.quiet,
                  command="llmprune " + shlex.join(_redact_secrets(argv)), keep_model=eval_req is not None)
    if not args.quiet:
        print(res.plan.summary())
    from .prune.finercut_report import removal_report

    if removal_report(res.plan):
        print(removal_report(res.plan))
    print(summary_table(res.params, res.timings["total_s"], res.out))
    if eval_req is not None:
        from .evaluate.runner import print_summary

        outcome = api.run_eval(res.model, eval_req, tokenizer=res.tokenizer, name=str(res.out), report_dir=res.out,
                               progress=not args.quiet)
        print(print_summary(outcome.run))
        print(f"report written to {res.out / 'report.md'}")
    if args.push_to_hub:  # after evaluation, so the card carries the results
        from .hub import PushError, push_to_hub

        try:
            pushed = push_to_hub(res.out, args.push_to_hub, private=args.hub_private, revision=args.hub_revision,
                                 token=args.hub_token, endpoint=args.hub_endpoint)
        except PushError as e:
            raise PushError(f"{e}\nThe checkpoint is saved in {res.out}; to retry only the upload: "
                            f"llmprune push {shlex.quote(str(res.out))} {args.push_to_hub}") from e
        print(_pushed_line(pushed))
    return 0


def _redact_secrets(argv: list[str]) -> list[str]:
    """The command recorded in pruning.json (and shown in the public model card) must not hold a token."""
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a in ("--hub-token", "--token"):
            out.append(a)
            hide = True
        elif a.startswith(("--hub-token=", "--token=")):
            out.append(a.split("=", 1)[0] + "=***")
        else:
            out.append(a)
    return out


def _pushed_line(r: Any) -> str:
    return f"pushed {len(r.files)} files to {r.repo_url} (branch {r.revision}, commit {r.commit_url})"


def cmd_push(args: argparse.Namespace, argv: list[str]) -> int:
    from .hub import push_to_hub

    r = push_to_hub(args.path, args.repo_id, private=args.private, revision=args.revision, token=args.token,
                    endpoint=args.endpoint, commit_message=args.commit_message, dry_run=args.dry_run)
    if r.dry_run:
        card = "README.md written" if r.card_written else "README.md kept (not generated by llmprune)"
        print(f"dry run: {card}; would upload {len(r.files)} files to {r.repo_id}@{r.revision} in one commit:")
        for f in r.files:
            print(f"  {f}")
    else:
        print(_pushed_line(r))
    return 0


def _main_eval_request(args: argparse.Namespace):  # noqa: ANN202
    """The evaluation the main job runs after saving, or None (no --eval-* flag)."""
    from .evaluate.runner import EvalRequest, PerplexityRequest
    from .evaluate.tasks import check_tasks, parse_task_spec

    if args.eval_tasks is None and args.eval_data is None:
        if args.eval_baseline or args.eval_limit is not None or args.include_path:
            raise ValueError("--eval-baseline / --eval-limit / --include-path need --eval-tasks or --eval-data")
        return None
    tasks = parse_task_spec(args.eval_tasks, limit=_limit(args.eval_limit)) if args.eval_tasks else []
    if tasks:
        check_tasks(tasks, args.include_path)
    ppl = PerplexityRequest(source=args.eval_data, seqlen=args.eval_seqlen) if args.eval_data else None
    return EvalRequest(tasks=tasks, include_paths=args.include_path, perplexity=ppl, batch_size=args.eval_batch_size,
                       baseline=args.model if args.eval_baseline else None)


def _limit(x: float | None) -> int | float | None:
    """--limit N: an integer count, or a fraction of each task when below 1."""
    if x is None:
        return None
    if x <= 0:
        raise ValueError(f"--limit must be positive, got {x:g}")
    return x if x < 1 else int(x)


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

    if get_pruner(recipe.method).wants_data(recipe.options):
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
    from .checkpoint import update_results
    from .evaluate.runner import EvalRequest, PerplexityRequest, print_summary
    from .evaluate.tasks import parse_task_spec

    tasks = parse_task_spec(args.tasks, args.num_fewshot, _limit(args.limit)) if args.tasks else []
    if not tasks and (args.limit is not None or args.num_fewshot is not None or args.include_path):
        raise ValueError("--limit / --num-fewshot / --include-path apply to lm-eval tasks; add --tasks")
    ppl = None
    if args.data is not None or not tasks:  # perplexity only: the old behaviour of `eval`
        ppl = PerplexityRequest(source=args.data or "wikitext2", split=args.split, seqlen=args.seqlen,
                                max_windows=args.max_windows, explicit=args.data is not None)
    path = Path(args.path)
    is_ckpt = (path / "pruning.json").exists()
    report_dir = Path(args.report) if args.report else (path if is_ckpt else None)
    if report_dir is not None and not report_dir.is_dir():
        raise ValueError(f"--report {report_dir}: no such directory")
    req = EvalRequest(tasks=tasks, include_paths=args.include_path, perplexity=ppl, batch_size=args.batch_size,
                      baseline=args.baseline, use_cache=not args.no_cache)
    outcome = api.run_eval(args.path, req, report_dir=report_dir, device=args.device, dtype=args.dtype,
                           progress=not args.quiet)
    run = outcome.run
    for name, e in (run.get("perplexity") or {}).items():
        print(f"perplexity on {name} [{e.get('split')}], {e['n_windows']} windows x {e['seqlen']} tokens")
        rows = [(str(args.path), e["pruned"], e["pruned_nll"])]
        if e.get("baseline") is not None:
            rows.append((f"{req.baseline} (baseline)", e["baseline"], e["baseline_nll"]))
        width = max(len(r[0]) for r in rows)
        for label, p, nll in rows:
            print(f"  {label.ljust(width)}  ppl {p:10.3f}   nll {nll:.4f}")
        if is_ckpt:  # the flat keys earlier versions wrote, kept for readers of pruning.json
            common = {"n_windows": e["n_windows"], "seqlen": e["seqlen"], "n_tokens": e["n_tokens"]}
            legacy: dict[str, Any] = {"perplexity": {"dataset": e["source"], "perplexity": e["pruned"],
                                                     "nll": e["pruned_nll"], **common}}
            if e.get("baseline") is not None:
                legacy["perplexity_baseline"] = {"model": req.baseline, "perplexity": e["baseline"],
                                                 "nll": e["baseline_nll"], **common}
            update_results(path, legacy)
    if run.get("tasks"):
        print(print_summary({"tasks": run["tasks"], "tasks_average": run.get("tasks_average")}))
    if report_dir is not None:
        print(f"report: {report_dir / 'report.md'}")
    return 0


def cmd_bench(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api
    from .evaluate.bench import BenchSettings

    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers, e.g. 1,4") from None
    settings = BenchSettings(prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, batch_sizes=batch_sizes,
                             repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    report = api.run_bench(args.path, args.baseline, settings, device=args.device, dtype=args.dtype,
                           memory=not args.no_memory, report_dir=args.report, progress=not args.quiet)
    from .evaluate.speed import speed_table

    print(speed_table(report["speed"]))
    print(f"report: {Path(args.report or args.path) / 'report.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
