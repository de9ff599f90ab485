"""The Python verbs: load, calibration_tokens, make_plan, prune, save, load_pruned, perplexity, run.

    import llmprune as lp
    loaded = lp.load("smollm2-135m")
    recipe = lp.load_recipe("magnitude", {"sparsity": 0.2})
    pruned, plan = lp.prune(loaded.model, recipe, tokenizer=loaded.tokenizer)
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, data, surgery
from .checkpoint import CheckpointError, check_output_dir, check_runnable, load_pruned, now_iso, save_pruned
from .errors import UsageError
from .embedded import EMBEDDED, is_embedded
from .evaluate.bench import BenchSettings
from .evaluate.perplexity import eval_perplexity
from .evaluate.runner import EvalRequest
from .families import Family, family_for
from .loading import Loaded, ModelLoadError, count_params, load, resolve_device, resolve_dtype
from .plan import Plan
from .prune import PruneContext, get_pruner
from .recipe import ResolvedRecipe, load_recipe

log = logging.getLogger(__name__)

def calibration_tokens(tokenizer: Any, recipe: ResolvedRecipe) -> tuple[torch.Tensor, dict]:
    """[nsamples, seqlen] calibration tokens as the recipe asks, and a description for provenance."""
    cal = recipe.recipe.calibration
    source = data.resolve_source(cal.source)
    tokens, resolved = data.calibration_tokens(tokenizer, source, nsamples=cal.nsamples, seqlen=cal.seqlen,
                                               seed=cal.seed, text_field=cal.text_field, split=cal.split)
    desc = resolved.to_dict()
    desc.update(nsamples=cal.nsamples, seqlen=cal.seqlen, seed=cal.seed)
    return tokens, desc


def make_plan(model: nn.Module, recipe: ResolvedRecipe, tokens: torch.Tensor | None = None,
              family: Family | None = None, base_model: str | None = None, device: str | torch.device | None = None,
              offload: bool = False, progress: bool = True, loader: Any = None) -> Plan:
    """Score and decide: the Plan for `model` under `recipe` (no weights are edited)."""
    family = family or family_for(model.config)
    spec = get_pruner(recipe.method)
    if spec.wants_data(recipe.options) and tokens is None:
        raise ValueError(f"method {recipe.method!r} needs calibration tokens")
    cal = recipe.recipe.calibration
    ctx = PruneContext(model=model, family=family, sparsity=recipe.recipe.sparsity, tokens=tokens,
                       batch_size=cal.batch_size, device=device, offload=offload, seed=cal.seed, progress=progress,
                       loader=loader)
    torch.manual_seed(cal.seed)
    plan = spec.plan(ctx, recipe.options)
    plan.method = recipe.method
    plan.family = family.name
    plan.recipe = recipe.to_dict()
    plan.base_model = base_model or getattr(model, "name_or_path", None) or None
    return plan


def prune(model: nn.Module, recipe: ResolvedRecipe | str, tokenizer: Any = None,
          calibration: torch.Tensor | None = None, progress: bool = True) -> tuple[nn.Module, Plan]:
    """Plan and apply in one call: returns (pruned model, plan). The input model is not modified."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    family = family_for(model.config)
    if calibration is None and get_pruner(recipe.method).wants_data(recipe.options):
        if tokenizer is None:
            raise ValueError("pass a tokenizer (to read the recipe's calibration text) or calibration tokens")
        calibration, _ = calibration_tokens(tokenizer, recipe)
    plan = make_plan(model, recipe, calibration, family=family, progress=progress)
    return surgery.apply(model, plan, family), plan


@dataclass
class RunResult:
    out: Path
    plan: Plan
    params: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = None  # the pruned model, when run(..., keep_model=True) and not streamed
    tokenizer: Any = None
    path_taken: str = ""  # "streamed: ..." or "in memory: ...", and why (stream.choose)


def run(model_id: str, recipe: ResolvedRecipe, out: str | Path, *, device: str = "auto", dtype: str = "auto",
        overwrite: bool = False, offload: bool = False, revision: str | None = None,
        progress: bool = True, command: str | None = None, keep_model: bool = False,
        stream: bool | str = "auto") -> RunResult:
    """The main job: load → calibrate → plan → apply → save. Returns where it went and the numbers.

    stream: True streams the model block by block from its safetensors files (never loaded whole,
    docs/streaming.md), False loads it, "auto" streams when it would not fit in memory.
    """
    from . import stream as streaming

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    check_output_dir(out, overwrite, inputs=input_paths(model_id))  # before any expensive work
    dev = resolve_device(device)
    # the searched allocation evaluates whole-model candidates many times: no streamed path for it yet
    searched = getattr(recipe.options, "allocation", None) == "search"
    choice = streaming.choose(stream, model_id, f"{recipe.method} (allocation: search)" if searched else recipe.method,
                              dev, dtype, revision)
    log.info("pruning path: %s", choice.reason)
    loader = None
    if choice.stream:
        loaded, loader = streaming.open_streamed(model_id, dev, dtype, revision)
    else:
        loaded = load(model_id, device=device, dtype=dtype, revision=revision)
    check_fits(loaded.model.config, recipe)
    timings["load_s"] = time.perf_counter() - t0
    tokens, cal_desc = None, None
    if get_pruner(recipe.method).wants_data(recipe.options):
        t = time.perf_counter()
        tokens, cal_desc = calibration_tokens(loaded.tokenizer, recipe)
        timings["data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = make_plan(loaded.model, recipe, tokens, family=loaded.family, base_model=loaded.base_model,
                     device=dev if loader is not None else None, offload=offload, progress=progress, loader=loader)
    plan.base_revision = revision
    plan.base_identity = loaded.identity
    check_runnable(plan)  # before surgery: a model without any attention cannot generate
    timings["plan_s"] = time.perf_counter() - t
    t = time.perf_counter()
    total_before = count_params(loaded.model)
    dtype_name = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    prov = provenance(loaded, recipe, cal_desc, command, dtype=dtype_name)
    pruned = None
    if loader is not None:
        target = streaming.pruned_skeleton(loaded.model, loaded.family, plan, loader.dtype)
        params = params_summary(plan, total_before, count_params(target))
        info = {"params": params, "provenance": prov, "timings": timings}
        streaming.write_streamed(loaded, loader, plan, Path(out), info, target=target, progress=progress)
        timings["write_s"] = time.perf_counter() - t
    else:
        pruned = surgery.apply(loaded.model, plan, loaded.family)
        del loaded.model
        timings["apply_s"] = time.perf_counter() - t
        params = params_summary(plan, total_before, count_params(pruned))
        info = {"params": params, "provenance": prov, "timings": timings}
        t = time.perf_counter()
        save_pruned(pruned, loaded.tokenizer, out, plan, info=info, overwrite=overwrite)
        timings["save_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    res = RunResult(out=Path(out), plan=plan, params=params, timings=timings, path_taken=choice.reason)
    if keep_model and pruned is not None:  # e.g. to evaluate the pruned model right after saving (--eval-tasks)
        res.model, res.tokenizer = pruned, loaded.tokenizer
    return res


def input_paths(model_id: str) -> tuple[Path, ...]:
    """Local folders a run reads the model from (the output may not touch them); none for a Hub id."""
    from .embedded import cache_dir

    if is_embedded(model_id):
        return (cache_dir() / "models" / model_id,)
    p = Path(model_id).expanduser()
    return (p,) if p.exists() else ()


def check_fits(config: Any, recipe: ResolvedRecipe) -> None:
    """Recipe values that only the model can judge, checked before calibrating."""
    seqlen = recipe.recipe.calibration.seqlen
    limit = getattr(config, "max_position_embeddings", None)
    if get_pruner(recipe.method).wants_data(recipe.options) and limit and seqlen > limit:
        raise UsageError(f"--seqlen {seqlen} (calibration.seqlen) exceeds the model's max_position_embeddings "
                         f"{limit}; positions beyond it were never trained. Use --seqlen {limit} or less")


def params_summary(plan: Plan, total_before: int, total_after: int) -> dict[str, Any]:
    return {
        "linear_before": plan.params_before(), "linear_after": plan.params_after(), "sparsity": plan.sparsity(),
        "total_before": total_before, "total_after": total_after,
        "total_sparsity": 1.0 - total_after / total_before if total_before else 0.0,
    }


def provenance(loaded: Loaded, recipe: ResolvedRecipe, calibration: dict | None, command: str | None,
               dtype: str) -> dict[str, Any]:
    import transformers

    prov: dict[str, Any] = {
        "llmprune_version": __version__, "created": now_iso(), "base_model": loaded.base_model,
        "model_arg": loaded.model_id, "revision": loaded.revision, "base": loaded.identity,
        "recipe_origin": recipe.origin,
        "method": recipe.method, "seed": recipe.recipe.calibration.seed, "calibration": calibration,
        "command": command, "dtype": dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    if is_embedded(loaded.model_id):
        prov["embedded"] = {"name": loaded.model_id, "requirement": EMBEDDED[loaded.model_id].requirement,
                            "note": EMBEDDED[loaded.model_id].note}
    return prov


@dataclass
class EvalOutcome:
    report: dict[str, Any]  # the whole report after merging (what report.json holds)
    run: dict[str, Any]  # only what this call measured


def run_eval(model: str | nn.Module, request: EvalRequest, *, tokenizer: Any = None, name: str | None = None,
             report_dir: str | Path | None = None, device: str | torch.device | None = "auto",
             dtype: str | torch.dtype | None = "auto", progress: bool = True,
             device_map: str | None = None) -> EvalOutcome:
    """Perplexity and lm-eval tasks of a pruned model against `request.baseline`.

    Returns this run's report sections (`.run`) and the report merged with the existing one (`.report`).
    `model` is an in-memory model (pass its `tokenizer`), a checkpoint directory or a model id. With
    `report_dir` the report is merged into report.json/report.md there (and pruning.json, if present);
    baseline results cached in that report under the same settings are reused.
    """
    from .evaluate.report import load_report, merge_reports, save_report
    from .evaluate.runner import (build_report, check_model_path, evaluate_baseline, evaluate_pruned, prepare,
                                  resolve_baseline)

    old = load_report(report_dir) if report_dir is not None else None  # a broken report fails before any work
    request = dataclasses.replace(request)  # resolved below; the caller's object stays as it was
    request.device_map = request.device_map or device_map
    if isinstance(model, str):
        check_model_path(model)
        request.baseline = resolve_baseline(request.baseline, model if Path(model).is_dir() else None)
        try:
            loaded = load(model, device=device, dtype=dtype, device_map=device_map)
        except ModelLoadError as e:
            if Path(model).exists() or is_embedded(model):
                raise
            raise ModelLoadError(f"no local directory {model!r} exists, and as a Hub model id: {e}") from e
        name = name or model
        m, tok = loaded.model, loaded.tokenizer
        del loaded
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer of the in-memory model")
        request.baseline = resolve_baseline(request.baseline, report_dir)
        m, tok, name = model, tokenizer, name or getattr(model, "name_or_path", None) or "in-memory model"
    if request.baseline is None and old and old.get("baseline") and request.use_cache:
        # no --baseline: the report's baseline still fills in whatever it has cached for these settings
        request.baseline, request.cached_baseline_only = old["baseline"], True
    dev, dt = next(m.parameters()).device, next(m.parameters()).dtype
    tm = prepare(request, m.config, tok)
    pruned = evaluate_pruned(m, tok, request, task_manager=tm, progress=progress)
    del m  # the caller's reference (if any) keeps an in-memory model alive; a loaded one is freed here
    base = evaluate_baseline(request, pruned, dev, dt, cache=(old or {}).get("baseline_cache"), progress=progress)
    run_report = build_report(str(name), request, pruned, base, dev, dt)
    report = merge_reports(old, run_report)
    if report_dir is not None:
        save_report(report_dir, report)
        report = load_report(report_dir) or report  # exactly what report.json holds
    return EvalOutcome(report=report, run=merge_reports(None, run_report))


def run_bench(path: str | Path, baseline: str | None = "base", settings: BenchSettings | None = None, *,
              device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
              memory: bool = True, report_dir: str | Path | None = None, progress: bool = True,
              device_map: str | None = None) -> dict[str, Any]:
    """Dense vs pruned speed and memory of a checkpoint; merges the `speed` section into its report."""
    from .evaluate.report import environment, load_report, merge_reports, new_report, save_report
    from .evaluate.runner import check_baseline, check_model_path, resolve_baseline
    from .evaluate.speed import bench_models

    settings = settings or BenchSettings()
    settings.validate()
    path = str(path)
    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist" if not Path(path).exists() else
                              f"{path} is not a checkpoint directory")
    check_model_path(path)
    report_dir = Path(report_dir) if report_dir is not None else Path(path)
    base_spec = resolve_baseline(baseline or "base", path)
    assert base_spec is not None
    old = load_report(report_dir)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    pruned = load(path, device=device, dtype=dtype, device_map=device_map)
    check_baseline(pruned.model.config, pruned.tokenizer, base_spec)
    dense = load(base_spec, device=device, dtype=dtype, device_map=device_map)
    section = bench_models(dense.model, pruned.model, settings, dense_spec=base_spec, pruned_spec=path,
                           memory=memory, progress=progress)
    dev, dt = next(pruned.model.parameters()).device, next(pruned.model.parameters()).dtype
    attn = getattr(pruned.model.config, "_attn_implementation", None)
    report = new_report(path, base_spec, environment(dev, dt, attn_implementation=attn))
    report["speed"] = section
    save_report(report_dir, merge_reports(old, report))
    return load_report(report_dir) or report  # exactly what report.json holds


__all__ = ["EvalOutcome", "Loaded", "ModelLoadError", "RunResult", "calibration_tokens", "count_params", "eval_perplexity", "load",
           "load_pruned", "make_plan", "params_summary", "provenance", "prune", "resolve_device", "resolve_dtype",
           "run", "run_bench", "run_eval", "save_pruned"]
