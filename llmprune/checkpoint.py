"""Save and load pruned checkpoints (DESIGN §5).

A checkpoint is an ordinary HF folder: safetensors weights with the base model's tensor names
(removed sublayers have no tensors), tokenizer and generation config, `config.json`, and
`pruning.json` (Plan + provenance + parameter counts), written once at save time and never
rewritten: evaluation results live in `report.json` (llmprune.evaluate.report). Uniform results carry the stock config of the base
architecture; non-uniform ones `model_type: llmprune_<family>` plus `auto_map` to the
configuration/modeling files saved beside the weights, so they load with
`trust_remote_code=True` where llmprune is not installed.

Saving is atomic (atomic.py): everything is written to a hidden sibling directory, reloaded, compared
with the in-memory model and run (forward + a short generate with the KV cache), and only then swapped
into place; the output path never holds a partial checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import __version__
from .modeling import MODEL_CLASSES, REMOTE_CODE_FILES, is_pruned_model_type, register
from .plan import Plan
from . import atomic
from .atomic import recover
from .errors import EXIT_FAILURE, EXIT_USAGE, LlmpruneError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "llmprune.checkpoint"
PRUNING_FILE = "pruning.json"
RECIPE_FILE = "llmprune_recipe.yaml"


class CheckpointError(LlmpruneError, RuntimeError):
    """A bad output/checkpoint path (exit 2) or a save that failed (raised with exit_code=1)."""

    exit_code = EXIT_USAGE



def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output path that cannot or must not be replaced; call early, before any work.

    inputs: paths the run reads (the input model's folder, a plan checkpoint); the output may not be,
    contain or lie inside any of them. Also repairs / reports what killed earlier saves left (atomic.recover).
    """
    out = Path(out)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"output path {out} is inside {parent}, which is a file, not a directory")
            break
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is not a directory")
    res = out.resolve()
    cwd = Path.cwd().resolve()
    if res == cwd or res in cwd.parents:
        raise CheckpointError(f"output directory {out} is the current directory or contains it; a checkpoint is "
                              f"written by replacing its directory. Choose a new subdirectory, e.g. -o pruned/")
    for inp in inputs:
        src = Path(inp).expanduser().resolve()
        if res == src or res in src.parents or src in res.parents:
            rel = "is" if res == src else ("contains" if res in src.parents else "is inside")
            raise CheckpointError(f"output directory {out} {rel} the input {inp}; saving there would destroy the "
                                  f"input. Choose another -o")
    writable = next((a for a in out.absolute().parents if a.exists()), None)  # where the staging dir goes
    if writable is not None and not os.access(writable, os.W_OK):
        raise CheckpointError(f"cannot write to {out}: {writable} is not writable (permission denied)")
    recover(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"output directory {out} is not empty; pass --overwrite to replace it, "
                                  f"or choose another -o")
        if not (out / "config.json").exists() and not (out / PRUNING_FILE).exists():
            raise CheckpointError(f"--overwrite only replaces a model directory, and {out} has no config.json; "
                                  f"it holds other files. Remove it yourself or choose another -o")
    return out


def check_runnable(plan: Plan) -> None:
    """Refuse a plan whose model could not generate: with no attention left anywhere, the KV cache has no
    layer to report a sequence length, so transformers' default generate()/forward fail."""
    if plan.layers and all(lp.attn.drop or not g.has_attn for lp, g in zip(plan.layers, plan.geometry)):
        raise CheckpointError(
            f"the plan removes every attention sublayer ({len(plan.layers)} of {len(plan.layers)}): the model "
            "could no longer attend to earlier tokens nor generate with a KV cache. Lower --sparsity, use "
            "--set pruner.allocation=uniform, or prune only FFN channels (--set pruner.attention=false)")


def save_pruned(model: nn.Module, tokenizer: Any, out: str | Path, plan: Plan, info: dict[str, Any] | None = None,
                overwrite: bool = False, verify: bool = True) -> Path:
    """Write the pruned model to `out` atomically and return its path.

    info: JSON-able facts merged into pruning.json (keys: provenance, params, timings).
    The folder is written beside `out`, reloaded and run (forward + a short generate) before it replaces
    `out` in one atomic swap (atomic.py): a failure or Ctrl-C at any point leaves `out` as it was.
    """
    out = check_output_dir(out, overwrite)
    check_runnable(plan)
    with staging(out) as tmp:
        _mark_remote_code(model)
        model.save_pretrained(tmp)
        write_extras(tmp, model, tokenizer, plan, info)
        if verify:
            _verify(model, tmp)
    return out


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden sibling directory to write a checkpoint into, swapped in atomically when the block succeeds
    and removed on any error or interrupt (atomic.staging); I/O errors become a CheckpointError (exit 1)."""
    out = Path(out)
    try:
        with atomic.staging(out) as tmp:
            yield tmp
    except OSError as e:  # disk full, permissions, a vanished directory: a run failure, not a bug
        kept = "the previous checkpoint there is unchanged" if out.exists() else "nothing was written there"
        raise CheckpointError(f"could not write the checkpoint {out}: {e}; {kept}", exit_code=EXIT_FAILURE) from e


def write_extras(tmp: Path, model: nn.Module, tokenizer: Any, plan: Plan, info: dict[str, Any] | None) -> None:
    """Everything but the weights and config.json: tokenizer, remote-code check, pruning.json, recipe, artifacts."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        _local_tokenizer(tmp)
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


def _local_tokenizer(path: Path) -> None:
    """The saved tokenizer must load without remote code: drop an `auto_map` that points at code files
    the checkpoint does not carry (a base tokenizer with custom code would otherwise prompt to trust it)."""
    cfg_path = path / "tokenizer_config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    amap = cfg.get("auto_map")
    if not amap:
        return
    refs = [v for v in (amap.values() if isinstance(amap, dict) else []) for v in (v if isinstance(v, list) else [v])]
    missing = [r for r in refs if isinstance(r, str) and not (path / (r.split("--")[-1].split(".")[0] + ".py")).exists()]
    if missing:
        log.warning("the tokenizer's auto_map points at remote code not in the checkpoint (%s); dropped, so the "
                    "tokenizer loads with the stock classes", ", ".join(missing))
        del cfg["auto_map"]
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


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
    classes = MODEL_CLASSES.get(type(model.config))
    if classes is not None:
        type(model.config).register_for_auto_class("AutoConfig")
        classes[0].register_for_auto_class("AutoModel")
        classes[1].register_for_auto_class("AutoModelForCausalLM")


def _finish_config(path: Path, model: nn.Module) -> None:
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if is_pruned_model_type(cfg.get("model_type")):
        config_cls = type(model.config)
        model_cls, causal_cls = MODEL_CLASSES[config_cls]
        amap = cfg.setdefault("auto_map", {})
        amap.setdefault("AutoConfig", f"configuration_llmprune.{config_cls.__name__}")
        amap.setdefault("AutoModel", f"modeling_llmprune.{model_cls.__name__}")
        amap.setdefault("AutoModelForCausalLM", f"modeling_llmprune.{causal_cls.__name__}")
        missing = [f for f in REMOTE_CODE_FILES if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"remote code files were not written: {missing}")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def _verify(model: nn.Module, path: Path) -> None:
    """Reload the written folder, compare logits with the in-memory model on a short input, and run a short
    greedy generate with the KV cache: a checkpoint that cannot generate is never declared saved."""
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
        raise CheckpointError(f"reloaded checkpoint differs from the in-memory model (max |Δlogit| = {err:.3g})",
                              exit_code=EXIT_FAILURE)
    try:
        reloaded(input_ids=ids[:, :4])  # the default forward: with a KV cache
        out = reloaded.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=3,
                                min_new_tokens=3, do_sample=False, pad_token_id=0)
    except Exception as e:  # noqa: BLE001 - any failure here means the checkpoint is unusable; say so, chained
        raise CheckpointError(f"the saved checkpoint cannot generate ({type(e).__name__}: {e}); nothing was written "
                              f"to the output directory. This is a bug in llmprune; please report it with the "
                              f"command line", exit_code=EXIT_FAILURE) from e
    if out.shape != (1, 7):
        raise CheckpointError(f"the saved checkpoint generated {out.shape[1] - 4} tokens instead of 3",
                              exit_code=EXIT_FAILURE)
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
