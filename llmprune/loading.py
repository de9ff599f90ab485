"""Loading a model: Hub id, local directory or embedded name -> (model, tokenizer, Family), and the
device / dtype choices. Used by api.py (the verbs) and evaluate/ (baselines, speed probes)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .embedded import EMBEDDED, is_embedded, resolve_embedded
from .families import Family, family_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    family: Family
    model_id: str  # what the user asked for
    path: str  # what was loaded (local dir or Hub id)
    base_model: str  # Hub id to credit as the base model
    revision: str | None = None


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config: Any = None) -> torch.dtype:
    """auto: the checkpoint's own dtype (config `dtype` / `torch_dtype`, as transformers reads it),
    float32 when the config names none. Explicit names: float32, bfloat16, float16 (and short forms)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return checkpoint_dtype(config) or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The floating dtype a config says its weights are stored in, or None."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
        if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
            return DTYPES[value.removeprefix("torch.")]
    return None


def resolve_source(model_id: str) -> tuple[str, str]:
    """(what to load: local dir or Hub id, Hub id to credit) for a model argument; checks local dirs."""
    if is_embedded(model_id):
        return str(resolve_embedded(model_id)), EMBEDDED[model_id].hub_id
    if Path(model_id).exists() and not (Path(model_id) / "config.json").exists():
        raise ModelLoadError(f"{model_id} exists but has no config.json: not a Hugging Face model directory")
    return model_id, model_id


def load_config(model_id: str, path: str, revision: str | None = None) -> Any:
    """The model's config, with a clear error for unknown names, gated or offline models."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except OSError as e:
        raise ModelLoadError(
            f"could not load model {model_id!r}: {str(e).splitlines()[0]}\nFix: check the name, log in with "
            f"`hf auth login` for gated models, pre-download it (HF_HOME cache) when offline, or pass a local "
            f"directory. The embedded offline model is `smollm2-135m`.") from e


def base_model_of(model_id: str, path: str, base: str, config: Any) -> str:
    """The Hub id to credit as the base model (a pruned checkpoint credits its own base)."""
    if is_embedded(model_id):
        return EMBEDDED[model_id].hub_id
    if Path(path).is_dir():
        base = getattr(config, "_name_or_path", None) or base
        if base == path and (Path(path) / "pruning.json").exists():
            base = _base_of_checkpoint(path)
    return str(base)


def load(model_id: str, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
         revision: str | None = None, device_map: str | dict | None = None) -> Loaded:
    """Load a causal LM (Hub id, local directory, or an embedded name such as `smollm2-135m`) + tokenizer.

    The architecture is checked before any weight is read, so unsupported models fail at once.
    `device_map="auto"` spreads the model over the GPUs (and CPU) with accelerate instead of `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    path, base = resolve_source(model_id)
    config = load_config(model_id, path, revision)
    family = family_for(config)
    dt = resolve_dtype(dtype, dev, config)
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dt)
        model.to(dev)
    else:  # accelerate places the layers; inputs go to the first device, hooks move activations on
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dt, device_map=device_map)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    return Loaded(model=model, tokenizer=tokenizer, family=family, model_id=model_id, path=str(path),
                  base_model=base_model_of(model_id, path, base, config), revision=revision)


def _base_of_checkpoint(path: str) -> str:
    return json.loads((Path(path) / "pruning.json").read_text()).get("plan", {}).get("base_model") or path


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights


__all__ = ["DTYPES", "Loaded", "ModelLoadError", "base_model_of", "checkpoint_dtype", "count_params", "load",
           "load_config", "resolve_device", "resolve_dtype", "resolve_source"]
