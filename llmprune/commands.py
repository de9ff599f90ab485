"""The commands behind `llmprune` and its subcommands: each turns parsed arguments into api calls
and prints what a user needs to see. Argument parsing lives in llmprune.cli."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import ResolvedRecipe

from .errors import UsageError

log = logging.getLogger(__name__)


FLAG_KEYS = (("sparsity", "sparsity"), ("target_sublayers", "pruner.target_sublayers"),
             ("calibration", "calibration.source"), ("nsamples", "calibration.nsamples"),
             ("seqlen", "calibration.seqlen"), ("seed", "calibration.seed"), ("batch_size", "calibration.batch_size"))


def _recipe_from_args(args: argparse.Namespace) -> ResolvedRecipe:
    from .recipe import RecipeError, load_recipe, parse_override

    overrides: dict[str, Any] = dict(parse_override(o) for o in args.overrides)
    given = {key: f"--set {key}" for key in overrides}
    if args.sparsity is not None and args.target_sublayers is not None:
        raise UsageError("give one target: --sparsity (fraction of parameters) or --target-sublayers (fraction of "
                         "sublayers), not both")
    for flag, key in FLAG_KEYS:
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
            given[key] = "--" + flag.replace("_", "-")
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as e:
        if "pruner.target_sublayers" in given:
            _target_sublayers_needs_finercut(args, {k: v for k, v in overrides.items() if k != "pruner.target_sublayers"})
        raise _name_flags(e, given) from None
    return recipe


def _target_sublayers_needs_finercut(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    from .recipe import RecipeError, load_recipe

    try:
        method = load_recipe(args.recipe, overrides).method
    except RecipeError:
        return
    if method != "finercut":
        raise UsageError(f"--target-sublayers is FinerCut's target (a fraction of sublayers to remove); recipe "
                         f"{args.recipe!r} uses method {method!r}, which takes --sparsity. Use --recipe finercut, "
                         f"or --sparsity")


def _name_flags(e: Exception, given: dict[str, str]) -> Exception:
    """A recipe error about a value that came from a flag names the flag, not the built-in recipe file."""
    from .recipe import RecipeError

    lines = str(e).splitlines()
    out, from_flags = [], True
    for line in lines[1:]:
        key = line.strip().split(":", 1)[0]
        if key in given:
            label = given[key] if given[key].startswith("--set") else f"{given[key]} (recipe key {key})"
            line = line.replace(f"{key}:", f"{label}:", 1)
        elif line.startswith("  "):
            from_flags = False
        out.append(line)
    head = "invalid command-line value:" if from_flags and out else lines[0]
    return RecipeError("\n".join([head, *out]))



def cmd_prune(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api

    recipe = _recipe_from_args(args)
    if args.push_to_hub:  # fail on a missing/invalid token now, not after an hour of pruning
        from .hub import preflight

        preflight(args.push_to_hub, token=args.hub_token, endpoint=args.hub_endpoint)
    eval_req = _main_eval_request(args)  # bad task names fail here, before any pruning work
    res = api.run(args.model, recipe, args.output, device=args.device, dtype=args.dtype, overwrite=args.overwrite,
                  offload=args.offload, revision=args.revision, progress=not args.quiet,
                  command="llmprune " + shlex.join(_redact_secrets(argv)), keep_model=eval_req is not None)
    if not args.quiet:
        print(res.plan.summary())
    from .prune.finercut.report import removal_report

    removals = removal_report(res.plan)
    if removals:
        print(removals)
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
            pushed = push_to_hub(res.out, args.push_to_hub, private=args.hub_private, revision=args.hub_branch,
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

    r = push_to_hub(args.path, args.repo_id, private=args.private, revision=args.branch, token=args.token,
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
            raise UsageError("--eval-baseline / --eval-limit / --include-path need --eval-tasks or --eval-data")
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
        raise UsageError(f"--limit must be positive, got {x:g}")
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
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory; the plan is one JSON file, e.g. -o {out / 'plan.json'}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    recipe = _recipe_from_args(args)
    t = time.perf_counter()
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"-o {out}: {out.parent} is a file, not a directory")
    loaded = api.load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    api.check_fits(loaded.model.config, recipe)
    tokens = None
    from .prune import get_pruner

    if get_pruner(recipe.method).wants_data(recipe.options):
        tokens, _ = api.calibration_tokens(loaded.tokenizer, recipe)
    plan = api.make_plan(loaded.model, recipe, tokens, family=loaded.family, base_model=loaded.base_model,
                         offload=args.offload, progress=not args.quiet)
    plan.base_revision = args.revision
    plan.base_identity = loaded.identity
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    print(plan.summary())
    print(f"plan written to {out} ({time.perf_counter() - t:.1f} s)")
    return 0


def cmd_apply(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api, surgery
    from .checkpoint import check_output_dir, check_runnable, save_pruned
    from .identity import describe, mismatch
    from .plan import Plan

    t = time.perf_counter()
    check_output_dir(args.output, args.overwrite, inputs=(*api.input_paths(args.model), Path(args.plan)))
    plan = Plan.load(args.plan)
    check_runnable(plan)
    loaded = api.load(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    differs = mismatch(plan.base_identity, loaded.identity)
    if differs:
        msg = (f"the plan {args.plan} was made for {describe(plan.base_identity)}, but --model {args.model} is "
               f"another model ({differs}); its kept units and compensation biases were computed on that model")
        if not args.force:
            raise UsageError(msg + ". Pass the model it was made for, or --force to apply it anyway")
        log.warning("%s; applying anyway (--force)", msg)
    before = api.count_params(loaded.model)
    pruned = surgery.apply(loaded.model, plan, loaded.family)
    params = api.params_summary(plan, before, api.count_params(pruned))
    info = {"params": params, "provenance": {"applied_from": str(Path(args.plan).resolve()), "model_arg": args.model,
                                             "revision": args.revision, "base": loaded.identity,
                                             "forced": bool(differs) or None,
                                             "command": "llmprune " + shlex.join(_redact_secrets(argv))}}
    save_pruned(pruned, loaded.tokenizer, args.output, plan, info=info, overwrite=args.overwrite)
    print(summary_table(params, time.perf_counter() - t, args.output))
    return 0


def cmd_inspect(args: argparse.Namespace, argv: list[str]) -> int:
    from .checkpoint import PRUNING_FILE
    from .plan import Plan

    path = Path(args.path)
    plan = Plan.load(path)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    print(f"method: {plan.method}   base model: {plan.base_model}")
    print(plan.summary())
    from .prune.finercut.report import removal_report

    removals = removal_report(plan)
    if removals:
        print(removals)
    if path.is_dir():
        doc, cfg = _read_json(path / PRUNING_FILE), _read_json(path / "config.json")
        from .modeling import is_pruned_model_type

        mt = cfg.get("model_type")
        kind = f"non-uniform ({mt}, needs trust_remote_code without llmprune)" \
            if is_pruned_model_type(mt) else f"uniform (stock {mt})"
        print(f"checkpoint: {kind}")
        if "params" in doc:
            p = doc["params"]
            print(f"total params {p['total_before']:,} -> {p['total_after']:,} ({p['total_sparsity']:.2%} removed)")
        if doc.get("artifacts"):
            print(f"artifacts: {', '.join(str(path / a) for a in doc['artifacts'])}")
        print("\n".join(_report_lines(path)))
    return 0


def _read_json(p: Path) -> dict[str, Any]:
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"{p} is missing: {p.parent} is not a complete checkpoint") from None
    except (ValueError, OSError) as e:
        raise UsageError(f"{p} cannot be read ({e}); the checkpoint is damaged, re-create it") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{p} is not a JSON object; the checkpoint is damaged, re-create it")
    return doc


def _report_lines(path: Path) -> list[str]:
    """A few readable lines from the checkpoint's report.json (the full data stays there and in report.md)."""
    from .evaluate.report import REPORT_JSON, REPORT_MD

    file = path / REPORT_JSON
    if not file.is_file():
        return ["evaluation: none stored (run `llmprune eval DIR`)"]
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        return [f"evaluation: {file} is not valid JSON ({e})"]
    lines = []
    for name, e in (report.get("perplexity") or {}).items():
        base = f", baseline {e['baseline']:.3f}" if isinstance(e.get("baseline"), (int, float)) else ""
        if isinstance(e.get("pruned"), (int, float)):
            lines.append(f"perplexity on {name} [{e.get('split')}]: {e['pruned']:.3f}{base}")
    avg = report.get("tasks_average") or {}
    if isinstance(avg.get("pruned"), (int, float)):
        kept = f" ({avg['retained_pct']:.1f} % of the baseline)" if isinstance(avg.get("retained_pct"), (int, float)) \
            else ""
        lines.append(f"lm-eval tasks: mean {avg['pruned']:.4f} over {avg.get('n_tasks')} task(s){kept}")
    if report.get("speed"):
        lines.append("speed: measured (see the report)")
    lines.append(f"report: {path / REPORT_MD}")
    return lines


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> int:
    from . import api
    from .checkpoint import PRUNING_FILE
    from .evaluate.runner import EvalRequest, PerplexityRequest, print_summary
    from .evaluate.tasks import parse_task_spec

    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2 (a window predicts tokens 2..L), got {args.seqlen}")
    tasks = parse_task_spec(args.tasks, args.num_fewshot, _limit(args.limit)) if args.tasks else []
    if not tasks and (args.limit is not None or args.num_fewshot is not None or args.include_path):
        raise UsageError("--limit / --num-fewshot / --include-path apply to lm-eval tasks; add --tasks")
    ppl = None
    if args.data is not None or not tasks:  # perplexity only: the old behaviour of `eval`
        ppl = PerplexityRequest(source=args.data, split=args.split, seqlen=args.seqlen, max_windows=args.max_windows)
    path = Path(args.path)
    is_ckpt = (path / PRUNING_FILE).exists()
    report_dir = Path(args.report) if args.report else (path if is_ckpt else None)
    if report_dir is not None and not report_dir.is_dir():
        raise UsageError(f"--report {report_dir}: no such directory")
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
        raise UsageError(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers, e.g. 1,4") from None
    settings = BenchSettings(prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, batch_sizes=batch_sizes,
                             repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    report = api.run_bench(args.path, args.baseline, settings, device=args.device, dtype=args.dtype,
                           memory=not args.no_memory, report_dir=args.report, progress=not args.quiet)
    from .evaluate.speed import speed_table

    print(speed_table(report["speed"]))
    print(f"report: {Path(args.report or args.path) / 'report.md'}")
    return 0


COMMANDS = {"prune": cmd_prune, "plan": cmd_plan, "apply": cmd_apply, "inspect": cmd_inspect, "eval": cmd_eval,
            "bench": cmd_bench, "push": cmd_push}
