"""Save and load pruned checkpoints (DESIGN §5).

A checkpoint is an ordinary HF folder: safetensors weights with the base model's tensor names
(removed sublayers have no tensors), tokenizer and generation config, `config.json`, and
`pruning.json` (Plan + provenance + parameter counts), written once at save time and never
rewritten: evaluation results live in `report.json` (llmprune.evaluate.report). Uniform results carry the stock config of the base
architecture; non-uniform ones `model_type: llmprune_llama` plus `auto_map` to the
configuration/modeling files saved beside the weights, so they load with
`trust_remote_code=True` where llmprune is not installed.

Saving is atomic: everything is written to a hidden sibling directory, reloaded and compared with
the in-memory model, and only then renamed into place.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import __version__
from .modeling import REMOTE_CODE_FILES, LlmpruneLlamaConfig, LlmpruneLlamaForCausalLM, LlmpruneLlamaModel, register
from .plan import Plan

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "llmprune.checkpoint"
PRUNING_FILE = "pruning.json"
RECIPE_FILE = "llmprune_recipe.yaml"


class CheckpointError(RuntimeError):
    pass


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless overwriting; call early, before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {out} is not empty; pass --overwrite to replace it, "
                              f"or choose another -o")
    return out


def save_pruned(model: nn.Module, tokenizer: Any, out: str | Path, plan: Plan, info: dict[str, Any] | None = None,
                overwrite: bool = False, verify: bool = True) -> Path:
    """Write the pruned model to `out` atomically and return its path.

    info: JSON-able facts merged into pruning.json (keys: provenance, params, timings).
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _mark_remote_code(model)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _finish_config(tmp, model)
        artifacts = _pruner_artifacts(plan, tmp)
        doc = {"format": CHECKPOINT_FORMAT, "llmprune_version": __version__, "plan": plan.to_dict()}
        doc.update(plan.extras)  # method reports (e.g. FinerCut's removal_order) also sit at the top level
        if artifacts:
            doc["artifacts"] = artifacts
        doc.update(info or {})
        (tmp / PRUNING_FILE).write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
        if plan.recipe:
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(plan.recipe, sort_keys=False))
        if verify:
            _verify(model, tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pruner_artifacts(plan: Plan, directory: Path) -> list[str]:
    """Extra files the plan's pruner writes into the (still temporary) checkpoint, e.g. figures."""
    from .prune import PRUNERS  # lazy: the pruner registry pulls in calibration code

    spec = PRUNERS.get(plan.method)
    if spec is None or spec.artifacts is None:
        return []
    return list(spec.artifacts(plan, directory))


def _mark_remote_code(model: nn.Module) -> None:
    # Registering the classes for auto classes makes save_pretrained copy the two code files and
    # write `auto_map` into config.json.
    if isinstance(model.config, LlmpruneLlamaConfig):
        LlmpruneLlamaConfig.register_for_auto_class("AutoConfig")
        LlmpruneLlamaModel.register_for_auto_class("AutoModel")
        LlmpruneLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _finish_config(path: Path, model: nn.Module) -> None:
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") == LlmpruneLlamaConfig.model_type:
        amap = cfg.setdefault("auto_map", {})
        amap.setdefault("AutoConfig", "configuration_llmprune.LlmpruneLlamaConfig")
        amap.setdefault("AutoModel", "modeling_llmprune.LlmpruneLlamaModel")
        amap.setdefault("AutoModelForCausalLM", "modeling_llmprune.LlmpruneLlamaForCausalLM")
        missing = [f for f in REMOTE_CODE_FILES if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"remote code files were not written: {missing}")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _verify(model: nn.Module, path: Path) -> None:
    """Reload the written folder and compare logits with the in-memory model on a short input."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    reloaded, _ = load_pruned(path, device=device, dtype=dtype, with_tokenizer=False)
    vocab = model.config.vocab_size
    ids = torch.arange(16, device=device).unsqueeze(0) * 7919 % vocab
    a = model(input_ids=ids, use_cache=False).logits.float()
    b = reloaded(input_ids=ids, use_cache=False).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    err = (a - b).abs().max().item()
    if not err <= tol * max(1.0, a.abs().max().item()):
        raise CheckpointError(f"reloaded checkpoint differs from the in-memory model (max |Δlogit| = {err:.3g})")
    del reloaded


def load_pruned(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                with_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """Load a pruned checkpoint (uniform or not) with llmprune's registered classes: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register()
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a model directory (no config.json)")
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return model, tok


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
