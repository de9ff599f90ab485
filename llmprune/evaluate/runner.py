"""Evaluation jobs: a pruned model (in memory or a checkpoint) against a dense baseline, into one report.

`evaluate_pruned` runs perplexity and lm-eval tasks on the pruned model; `evaluate_baseline` runs the
same items on the baseline, reusing results cached in the existing report under the same settings
(the baseline is not even loaded when everything is cached); `build_report` combines both. Bad
inputs (unknown tasks, a baseline with a different tokenizer) fail before any model runs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import PRUNING_FILE, CheckpointError
from .perplexity import PerplexityResult
from .report import environment, new_report
from .tasks import TaskRequest, TaskScore, check_tasks, run_tasks
from ..errors import UsageError

log = logging.getLogger(__name__)


class BaselineError(UsageError):
    """The baseline cannot be compared with the pruned model (different tokenizer or vocabulary)."""


@dataclass
class PerplexityRequest:
    source: str | None = None  # None: the default, resolved once by data.resolve_source
    split: str = "test"
    seqlen: int = 512
    max_windows: int | None = None


@dataclass
class EvalRequest:
    tasks: list[TaskRequest] = field(default_factory=list)
    include_paths: list[str] = field(default_factory=list)
    perplexity: PerplexityRequest | None = None
    batch_size: int = 1
    baseline: str | None = None
    use_cache: bool = True
    cached_baseline_only: bool = False  # fill baseline numbers from the report's cache, never load the baseline
    device_map: str | None = None  # "auto": the baseline is spread over the GPUs too (accelerate)


@dataclass
class PrunedResults:
    perplexity: tuple[str, PerplexityResult, dict] | None = None  # (dataset key, result, resolved source)
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    task_manager: Any = None


# ---- inputs ----------------------------------------------------------------------------------------------
def resolve_baseline(spec: str | None, checkpoint: str | Path | None) -> str | None:
    """`base` means the model the checkpoint was pruned from (as recorded in its pruning.json)."""
    if spec != "base":
        return spec
    doc_path = Path(checkpoint) / PRUNING_FILE if checkpoint is not None else None
    if doc_path is None or not doc_path.exists():
        raise BaselineError("--baseline base needs a checkpoint directory with pruning.json; pass a model id or "
                            "directory instead")
    doc = json.loads(doc_path.read_text())
    ident = (doc.get("provenance") or {}).get("base")
    if isinstance(ident, dict):
        return _recorded_base(ident, doc_path)
    model = (doc.get("provenance") or {}).get("model_arg") or (doc.get("plan") or {}).get("base_model")
    if not model:
        raise BaselineError(f"{doc_path} does not record the base model; pass --baseline MODEL explicitly")
    return str(model)


def _recorded_base(ident: dict[str, Any], doc_path: Path) -> str:
    """The base model recorded by identity (absolute path, embedded name or Hub id), checked to be the same
    model (config + weights fingerprint) so a moved or replaced folder is not silently compared against."""
    from ..embedded import is_embedded, resolve_embedded
    from ..identity import describe, identity_of, mismatch

    name = ident.get("embedded")
    if name and is_embedded(name):
        path: str | None = str(resolve_embedded(name))
        spec = name
    elif ident.get("path"):
        path = spec = ident["path"]
    else:
        hub_id = ident.get("hub_id")
        pin = ident.get("commit") or ident.get("revision")
        if hub_id and pin:  # the Hub model may have moved on since: compare against the commit that was pruned
            log.info("baseline: %s pinned to commit %s, the one this checkpoint was pruned from", hub_id, pin)
            return f"{hub_id}@{pin}"
        return str(hub_id or ident.get("model_arg"))
    if not Path(path).is_dir():
        raise BaselineError(f"the base model recorded in {doc_path}, {path}, no longer exists; pass --baseline "
                            f"MODEL (the dense model this checkpoint was pruned from)")
    differs = mismatch(ident, identity_of(path))
    if differs:
        raise BaselineError(f"{path} is no longer the model this checkpoint was pruned from ({differs} since; "
                            f"recorded {describe(ident)}); pass --baseline MODEL with the original dense model")
    return str(spec)


def check_model_path(path: str) -> None:
    """A path-like argument that does not exist is a missing checkpoint, not a Hub id to try."""
    from ..embedded import is_embedded

    p = Path(path)
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists():
            raise CheckpointError(f"{path} is a directory without config.json: not a checkpoint or model directory")
        return
    looks_local = path.startswith((".", "/", "~")) or path.endswith("/") or path.count("/") != 1
    if looks_local and not is_embedded(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist; check the path (the main job writes "
                              f"one with -o DIR)")


def _baseline_config_and_tokenizer(spec: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from ..embedded import is_embedded, resolve_embedded

    from ..loading import split_revision

    path, revision = split_revision(spec)
    path = str(resolve_embedded(path)) if is_embedded(path) else path
    try:
        check_model_path(path)
    except CheckpointError as e:
        raise BaselineError(f"baseline {spec!r}: " + str(e).replace("checkpoint directory ", "directory ")) from None
    try:
        return (AutoConfig.from_pretrained(path, revision=revision),
                AutoTokenizer.from_pretrained(path, revision=revision))
    except OSError as e:
        raise BaselineError(f"cannot load baseline {spec!r}: {str(e).splitlines()[0]}") from e


def check_baseline(config: Any, tokenizer: Any, spec: str) -> None:
    """Refuse a baseline whose vocabulary differs: its perplexity and scores are not comparable."""
    b_cfg, b_tok = _baseline_config_and_tokenizer(spec)
    if getattr(b_cfg, "vocab_size", None) != getattr(config, "vocab_size", None):
        raise BaselineError(f"baseline {spec!r} has vocab_size {b_cfg.vocab_size}, the evaluated model "
                            f"{config.vocab_size}: they do not share a tokenizer, so perplexities and retained "
                            f"percentages would be meaningless. Pass the dense model this checkpoint was pruned from "
                            f"(--baseline base).")
    if tokenizer is not None and b_tok.get_vocab() != tokenizer.get_vocab():
        raise BaselineError(f"baseline {spec!r} has a different tokenizer vocabulary than the evaluated model; pass "
                            f"the dense model this checkpoint was pruned from (--baseline base).")


def cache_key(kind: str, baseline: str, device: torch.device, dtype: torch.dtype, **settings: Any) -> str:
    """Canonical key of one baseline measurement: what was run, on what, with which settings."""
    items = {"kind": kind, "baseline": baseline, "device": torch.device(device).type,
             "dtype": str(dtype).replace("torch.", ""), **settings}
    return json.dumps(items, sort_keys=True, default=str)


def _task_key(req: EvalRequest, r: TaskRequest, device: torch.device, dtype: torch.dtype, lm_eval: str | None) -> str:
    return cache_key("task", str(req.baseline), device, dtype, task=r.name, num_fewshot=r.num_fewshot,
                     limit=r.limit, lm_eval=lm_eval)


def _ppl_key(req: EvalRequest, source: str, device: torch.device, dtype: torch.dtype) -> str:
    p = req.perplexity
    assert p is not None
    return cache_key("perplexity", str(req.baseline), device, dtype, source=source, split=p.split, seqlen=p.seqlen,
                     max_windows=p.max_windows)


def _source_id(resolved: dict[str, Any]) -> str:
    """What identifies an evaluation text: the preset name or Hub spec, or the absolute path of a local file."""
    if resolved.get("kind") == "local":
        return str(resolved.get("name"))
    return str(resolved.get("spec") or resolved.get("name"))


# ---- running -----------------------------------------------------------------------------------------------
def prepare(req: EvalRequest, config: Any, tokenizer: Any) -> Any:
    """Fail-fast checks before any model runs; returns the TaskManager (or None without tasks)."""
    if req.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {req.batch_size}")
    tm = check_tasks(req.tasks, req.include_paths) if req.tasks else None
    if req.baseline and not req.cached_baseline_only:
        check_baseline(config, tokenizer, req.baseline)
    return tm


def evaluate_pruned(model: nn.Module, tokenizer: Any, req: EvalRequest, task_manager: Any = None,
                    progress: bool = True) -> PrunedResults:
    from .perplexity import eval_perplexity

    out = PrunedResults(task_manager=task_manager)
    if req.perplexity is not None:
        p = req.perplexity
        res, src = eval_perplexity(model, tokenizer, p.source, seqlen=p.seqlen, split=p.split,
                                   max_windows=p.max_windows, batch_size=req.batch_size, progress=progress)
        out.perplexity = (_source_id(src), res, src)
    if req.tasks:
        out.tasks = run_tasks(model, tokenizer, req.tasks, batch_size=req.batch_size, include_paths=req.include_paths,
                              task_manager_=task_manager)
    return out


def evaluate_baseline(req: EvalRequest, pruned: PrunedResults, device: torch.device, dtype: torch.dtype,
                      cache: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """{cache key: baseline result} for every item the pruned model was evaluated on; loads the baseline
    only for items missing from `cache`."""
    if not req.baseline:
        return {}
    from .perplexity import eval_perplexity
    from ..loading import load

    env = environment(device, dtype)
    wanted: dict[str, tuple[str, Any]] = {}
    if pruned.perplexity is not None:
        key, _, src = pruned.perplexity
        wanted[_ppl_key(req, key, device, dtype)] = ("perplexity", key)
    for r in req.tasks:
        wanted[_task_key(req, r, device, dtype, env.get("lm_eval"))] = ("task", r)
    cache = cache if (cache is not None and req.use_cache) else {}
    found = {k: cache[k] for k in wanted if k in cache}
    missing = {k: v for k, v in wanted.items() if k not in found}
    if found:
        log.info("baseline %s: %d result(s) reused from the report's cache", req.baseline, len(found))
    if not missing or req.cached_baseline_only:
        return found
    base = load(req.baseline, device=device, dtype=dtype, device_map=req.device_map)
    todo_tasks = [v[1] for v in missing.values() if v[0] == "task"]
    task_scores = run_tasks(base.model, base.tokenizer, todo_tasks, batch_size=req.batch_size,
                            include_paths=req.include_paths, task_manager_=pruned.task_manager) if todo_tasks else {}
    for k, (kind, what) in missing.items():
        if kind == "task":
            found[k] = task_scores[what.name].to_dict()
        else:
            p = req.perplexity
            assert p is not None
            # the pruned run resolved the source (fallbacks included); the baseline reads exactly that one
            res, _ = eval_perplexity(base.model, base.tokenizer, what, seqlen=p.seqlen,
                                     split=p.split, max_windows=p.max_windows,
                                     batch_size=req.batch_size, progress=progress)
            found[k] = res.to_dict()
    del base
    return found


def build_report(model_name: str, req: EvalRequest, pruned: PrunedResults, baseline: dict[str, Any],
                 device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The report sections of one eval run (merge it into the existing report with merge_reports)."""
    env = environment(device, dtype)
    report = new_report(model_name, req.baseline, env)
    if pruned.perplexity is not None:
        key, res, src = pruned.perplexity
        b = baseline.get(_ppl_key(req, key, device, dtype)) if req.baseline else None
        report["perplexity"] = {key: {
            "split": src.get("split"), "seqlen": res.seqlen, "n_windows": res.n_windows, "n_tokens": res.n_tokens,
            "pruned": res.perplexity, "pruned_nll": res.nll, "baseline": b["perplexity"] if b else None,
            "baseline_nll": b["nll"] if b else None, "baseline_model": req.baseline if b else None, "source": src}}
    if pruned.tasks:
        report["tasks"] = {}
        for r in req.tasks:
            s = pruned.tasks[r.name]
            b = baseline.get(_task_key(req, r, device, dtype, env.get("lm_eval"))) if req.baseline else None
            b_val = (b.get("all_metrics") or {}).get(s.metric) if b else None
            b_err = b.get("stderr") if b and b.get("metric") == s.metric else None
            report["tasks"][r.name] = {
                "metric": s.metric, "pruned": s.value, "baseline": b_val, "retained_pct": None,
                "num_fewshot": s.num_fewshot, "limit": s.limit, "stderr": s.stderr, "baseline_stderr": b_err,
                "higher_is_better": s.higher_is_better, "n_samples": s.n_samples, "all_metrics": s.all_metrics,
                "baseline_all_metrics": (b or {}).get("all_metrics"), "baseline_model": req.baseline if b else None}
    if baseline:
        report["baseline_cache"] = baseline
    return report


def print_summary(report: dict[str, Any]) -> str:
    """A short plain-text table of what an eval run measured (the CLI prints it)."""
    lines = []
    for name, e in (report.get("perplexity") or {}).items():
        base = f"   baseline {e['baseline']:.3f}" if e.get("baseline") is not None else ""
        lines.append(f"perplexity {name} [{e.get('split')}], {e['n_windows']} x {e['seqlen']} tokens: "
                     f"{e['pruned']:.3f}{base}")
    tasks = report.get("tasks") or {}
    if tasks:
        w = max(len(t) for t in tasks)
        lines.append(f"{'task'.ljust(w)}  {'metric':<9} {'pruned':>8} {'baseline':>9} {'retained':>9}")
        for t, e in tasks.items():
            b = f"{e['baseline']:.4f}" if e.get("baseline") is not None else "-"
            r = f"{e['retained_pct']:.1f}%" if e.get("retained_pct") is not None else "-"
            lines.append(f"{t.ljust(w)}  {e['metric']:<9} {e['pruned']:>8.4f} {b:>9} {r:>9}")
        avg = report.get("tasks_average")
        if avg:
            b = f"{avg['baseline']:.4f}" if avg.get("baseline") is not None else "-"
            r = f"{avg['retained_pct']:.1f}%" if avg.get("retained_pct") is not None else "-"
            lines.append(f"{'average'.ljust(w)}  {'':<9} {avg['pruned']:>8.4f} {b:>9} {r:>9}")
    return "\n".join(lines)


__all__ = ["BaselineError", "EvalRequest", "PerplexityRequest", "PrunedResults", "build_report", "cache_key",
           "check_baseline", "check_model_path", "evaluate_baseline", "evaluate_pruned", "prepare", "print_summary",
           "resolve_baseline"]
