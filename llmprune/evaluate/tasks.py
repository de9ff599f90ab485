"""lm-evaluation-harness tasks: resolve task names and task lists, run them, pick the reported metric.

A task spec is a comma-separated list whose items are
- the name of a task list in `eval/` (e.g. `zero_shot`, `finercut`) or a path to such a YAML list;
- any lm-eval task, group or tag name (`arc_easy`, `mmlu`, ...), including tasks defined by YAML files
  in `--include-path` directories (custom local tasks).

Task lists (`eval/*.yaml`) look like::

    name: zero_shot
    num_fewshot: 0            # defaults for every task of the list
    limit: null
    metric_preference: [acc_norm, acc]
    tasks: [boolq, {task: hellaswag, metric: acc_norm}, {task: mmlu, num_fewshot: 5, limit: 50}]

Runs go through `lm_eval.simple_evaluate` with an `HFLM` wrapping the model *object* (no reload), once
per distinct (num_fewshot, limit) pair. Names are checked against a `TaskManager` before any model
runs; lm-eval's built-in index (≈15 s to build) is only built when a name is not found in the
include paths.
"""
from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn
from ..errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "f1", "mcc", "bleu")
_LIST_KEYS = {"name", "description", "num_fewshot", "limit", "metric_preference", "tasks", "reference"}
_ITEM_KEYS = {"task", "num_fewshot", "limit", "metric"}


class TaskError(UsageError):
    """An unknown task or a malformed task list; the message says how to find valid names."""


@dataclass(frozen=True)
class TaskRequest:
    """One lm-eval task (or group) to run and the metric to report for it."""

    name: str
    num_fewshot: int | None = None
    limit: int | float | None = None
    metric: str | None = None  # None: first of metric_preference that the task reports
    metric_preference: tuple[str, ...] = DEFAULT_METRIC_PREFERENCE


@dataclass
class TaskScore:
    """What one run of one task produced (the chosen metric plus everything else)."""

    name: str
    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool
    num_fewshot: int | None
    limit: int | float | None
    n_samples: int | None
    all_metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "stderr": self.stderr,
                "higher_is_better": self.higher_is_better, "num_fewshot": self.num_fewshot, "limit": self.limit,
                "n_samples": self.n_samples, "all_metrics": dict(self.all_metrics)}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> TaskScore:
        return cls(name=name, metric=d["metric"], value=d["value"], stderr=d.get("stderr"),
                   higher_is_better=d.get("higher_is_better", True), num_fewshot=d.get("num_fewshot"),
                   limit=d.get("limit"), n_samples=d.get("n_samples"), all_metrics=d.get("all_metrics") or {})


# ---- task lists ------------------------------------------------------------------------------------
def task_lists_dir() -> Path:
    """Built-in task lists: `eval/` of a source checkout, or the copy installed as llmprune/eval_tasks."""
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "eval", here / "eval_tasks"):
        if cand.is_dir():
            return cand
    return here.parent / "eval"


def builtin_task_lists() -> dict[str, Path]:
    return {p.stem: p for p in sorted(task_lists_dir().glob("*.yaml"))}


def load_task_list(path: Path) -> list[TaskRequest]:
    """Read one task-list YAML into requests (list defaults applied to every item)."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TaskError(f"cannot read task list {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise TaskError(f"{path}: a task list is a mapping with a `tasks:` list")
    unknown = set(doc) - _LIST_KEYS
    if unknown:
        raise TaskError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_LIST_KEYS)}")
    pref = tuple(doc.get("metric_preference") or DEFAULT_METRIC_PREFERENCE)
    out = []
    for item in doc["tasks"]:
        item = {"task": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "task" not in item or set(item) - _ITEM_KEYS:
            raise TaskError(f"{path}: each task is a name or a mapping with keys {sorted(_ITEM_KEYS)}, got {item!r}")
        out.append(TaskRequest(name=str(item["task"]), num_fewshot=item.get("num_fewshot", doc.get("num_fewshot")),
                               limit=item.get("limit", doc.get("limit")), metric=item.get("metric"),
                               metric_preference=pref))
    return out


def _is_task_list_file(p: Path) -> bool:
    if p.suffix not in (".yaml", ".yml") or not p.is_file():
        return False
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return False  # lm-eval task YAMLs may use !function tags; not a list of ours
    return isinstance(doc, dict) and isinstance(doc.get("tasks"), list) and "task" not in doc


def parse_task_spec(spec: str | list[str], num_fewshot: int | None = None,
                    limit: int | float | None = None) -> list[TaskRequest]:
    """Expand task lists; explicit `num_fewshot` / `limit` override the lists' values. Order kept, no duplicates."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if not items:
        raise TaskError("no task given; e.g. --tasks arc_easy,hellaswag or --tasks zero_shot")
    lists = builtin_task_lists()
    out: list[TaskRequest] = []
    for item in items:
        if item in lists:
            reqs = load_task_list(lists[item])
        elif _is_task_list_file(Path(item)):
            reqs = load_task_list(Path(item))
        else:
            reqs = [TaskRequest(name=item)]
        out.extend(reqs)
    seen: dict[str, TaskRequest] = {}
    for r in out:
        if num_fewshot is not None or limit is not None:
            r = TaskRequest(r.name, num_fewshot if num_fewshot is not None else r.num_fewshot,
                            limit if limit is not None else r.limit, r.metric, r.metric_preference)
        seen.setdefault(r.name, r)
    return list(seen.values())


# ---- task manager and validation ----------------------------------------------------------------------
_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def task_manager(include_paths: list[str] | tuple[str, ...] = (), defaults: bool = True) -> Any:
    """A (cached) lm-eval TaskManager over the include paths, with or without lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    paths = tuple(str(Path(p).resolve()) for p in include_paths)
    for p in paths:
        if not Path(p).is_dir():
            raise TaskError(f"--include-path {p}: no such directory (it should hold lm-eval task YAML files)")
    key = (paths, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(paths) or None, include_defaults=defaults)
    return _MANAGERS[key]


def check_tasks(requests: list[TaskRequest], include_paths: list[str] | tuple[str, ...] = ()) -> Any:
    """Return a TaskManager that knows every requested name, or raise TaskError saying how to find tasks."""
    names = [r.name for r in requests]
    if include_paths:
        tm = task_manager(include_paths, defaults=False)
        if all(n in set(tm.all_tasks) for n in names):
            return tm
    tm = task_manager(include_paths, defaults=True)
    known = set(tm.all_tasks)
    missing = [n for n in names if n not in known]
    if missing:
        hints = []
        for n in missing:
            close = difflib.get_close_matches(n, known, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise TaskError(
            f"unknown lm-eval task(s): {', '.join(hints)}. List the available ones with `lm-eval ls tasks` "
            f"(add `--include_path DIR` for local task YAMLs); task lists shipped in {task_lists_dir()}: "
            f"{', '.join(builtin_task_lists()) or 'none'}; local task YAML directories are passed with "
            f"--include-path DIR.")
    return tm


# ---- running -------------------------------------------------------------------------------------------
def run_tasks(model: nn.Module, tokenizer: Any, requests: list[TaskRequest], batch_size: int = 1,
              include_paths: list[str] | tuple[str, ...] = (), task_manager_: Any = None,
              bootstrap_iters: int = 1000, seed: int = 0) -> dict[str, TaskScore]:
    """Run the requested tasks on an in-memory model; one simple_evaluate call per (num_fewshot, limit)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm = task_manager_ or check_tasks(requests, include_paths)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    groups: dict[tuple, list[TaskRequest]] = {}
    for r in requests:
        groups.setdefault((r.num_fewshot, r.limit), []).append(r)
    scores: dict[str, TaskScore] = {}
    for (shots, limit), reqs in groups.items():
        log.info("lm-eval: %s (num_fewshot=%s, limit=%s)", ", ".join(r.name for r in reqs), shots, limit)
        res = lm_eval.simple_evaluate(model=lm, tasks=[r.name for r in reqs], num_fewshot=shots, limit=limit,
                                      task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
        for r in reqs:
            scores[r.name] = score_from_results(res, r)
    return scores


def score_from_results(res: dict[str, Any], req: TaskRequest) -> TaskScore:
    """Pick the reported metric of one task out of simple_evaluate's result dict."""
    row = (res.get("results") or {}).get(req.name)
    if row is None:
        raise TaskError(f"lm-eval returned no results for {req.name!r} (got {sorted(res.get('results') or {})})")
    values: dict[str, float] = {}
    stderrs: dict[str, float] = {}
    for key, val in row.items():
        if "," not in key or not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
            continue  # "N/A" stderrs, NaN, and non-metric fields such as alias / sample_len
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        if metric.endswith("_stderr"):
            stderrs[name.replace("_stderr", "", 1)] = float(val)
        else:
            values[name] = float(val)
    if not values:
        raise TaskError(f"lm-eval reported no numeric metric for {req.name!r}: {row}")
    if req.metric is not None:
        if req.metric not in values:
            raise TaskError(f"task {req.name!r} has no metric {req.metric!r}; it reports {sorted(values)}")
        metric = req.metric
    else:
        metric = next((m for m in req.metric_preference if m in values), sorted(values)[0])
    hib = ((res.get("higher_is_better") or {}).get(req.name) or {}).get(metric.split(",")[0], True)
    n = ((res.get("n-samples") or {}).get(req.name) or {}).get("effective")
    shots = (res.get("n-shot") or {}).get(req.name, req.num_fewshot)
    return TaskScore(name=req.name, metric=metric, value=values[metric], stderr=stderrs.get(metric),
                     higher_is_better=bool(hib), num_fewshot=shots if shots is not None else req.num_fewshot,
                     limit=req.limit, n_samples=n, all_metrics=values)


__all__ = ["DEFAULT_METRIC_PREFERENCE", "TaskError", "TaskRequest", "TaskScore", "builtin_task_lists",
           "check_tasks", "load_task_list", "parse_task_spec", "run_tasks", "score_from_results", "task_lists_dir",
           "task_manager"]
