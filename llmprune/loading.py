"""Loading a model: Hub id, local directory or embedded name -> (model, tokenizer, Family), and the
device / dtype choices. Used by api.py (the verbs) and evaluate/ (baselines, speed probes)."""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .embedded import EMBEDDED, is_embedded, resolve_embedded
from .families import Family, family_for
from .identity import identity_of, weight_files
from .errors import EXIT_USAGE, LlmpruneError, UsageError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(LlmpruneError, RuntimeError):
    """The model named by --model cannot be found or read (exit 2)."""

    exit_code = EXIT_USAGE

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
    identity: dict[str, Any] | None = None  # see identity.py; recorded in pruning.json and the Plan


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """auto: cuda if available, else cpu. Any other value must name a device this machine has."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                             f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''}); check CUDA_VISIBLE_DEVICES")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)):
        raise UsageError(f"--device {device}: device type {dev.type!r} is not supported; use auto, cpu, cuda or mps")
    if not backend.is_available():
        raise UsageError(f"--device {device}: {dev.type} is not available on this machine; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config: Any = None) -> torch.dtype:
    """auto: the checkpoint's own dtype (config `dtype` / `torch_dtype`, as transformers reads it),
    float32 when the config names none. Explicit names: float32, bfloat16, float16 (and short forms)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return checkpoint_dtype(config) or torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(DTYPES)))}")
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


def resolve_source(model_id: str, revision: str | None = None) -> tuple[str, str]:
    """(what to hand to from_pretrained: local dir or Hub id, Hub id or name to credit); checks local dirs."""
    path = locate(model_id, revision)
    return path, EMBEDDED[model_id].hub_id if is_embedded(model_id) else model_id


def load_config(model_id: str, path: str, revision: str | None = None) -> Any:
    """The model's config, with a clear error for unknown names, gated or offline models."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load model {model_id!r}: {str(e).splitlines()[0]}\nFix: check the name (no local directory "
            f"of that name exists either), log in with `hf auth login` for gated models, pre-download it (HF_HOME "
            f"cache) when offline, or pass a local directory. The embedded offline model is `smollm2-135m`.") from e


def base_model_of(model_id: str, path: str, base: str) -> str:
    """What to record as the base model: the Hub id, or the absolute local folder (pruning.json is read from
    other directories later); a pruned checkpoint credits its own base."""
    if Path(path).is_dir() and not is_embedded(model_id):
        base = str(Path(path).resolve())
        if (Path(path) / "pruning.json").exists():
            base = _base_of_checkpoint(path)
    return str(base)


def load(model_id: str, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
         revision: str | None = None, device_map: str | dict | None = None) -> Loaded:
    """Load a causal LM (Hub id, local directory, or an embedded name such as `smollm2-135m`) + tokenizer.

    The architecture and the weight files are checked before any weight is read, so unsupported,
    missing or truncated models fail at once with a message that names the fix.
    `device_map="auto"` spreads the model over the GPUs (and CPU) with accelerate instead of `device`.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    model_id, revision = split_revision(model_id, revision)
    path, base = resolve_source(model_id, revision)
    config = load_config(model_id, path, revision)
    family = family_for(config)
    dt = resolve_dtype(dtype, dev, config)
    if Path(path).is_dir():
        check_weights(Path(path), model_id)
    try:
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dt)
            model.to(dev)
        else:  # accelerate places the layers; inputs go to the first device, hooks move activations on
            model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dt, device_map=device_map)
    except OSError as e:
        raise ModelLoadError(f"could not read the weights of {model_id!r}: {str(e).splitlines()[0]}") from e
    model.eval()
    tokenizer = load_tokenizer(path, revision, model_id)
    check_vocab(model.config, tokenizer, model_id)
    return Loaded(model=model, tokenizer=tokenizer, family=family, model_id=model_id, path=str(path),
                  base_model=base_model_of(model_id, path, base), revision=revision,
                  identity=identity_for(model_id, path, revision, config))


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """`org/name@rev` (a Hub id pinned to a branch, tag or commit) -> ("org/name", "rev"); anything that exists
    locally, or carries no `@`, is returned as it is with `revision`. Both pins at once are refused."""
    if "@" not in spec or Path(spec).expanduser().exists() or looks_local(spec) or is_embedded(spec):
        return spec, revision
    name, _, rev = spec.rpartition("@")
    if not name or not rev:
        raise UsageError(f"model spec {spec!r}: expected NAMESPACE/NAME@REVISION")
    if revision is not None and revision != rev:
        raise UsageError(f"model spec {spec!r} pins revision {rev!r} but --revision {revision!r} was also given; "
                         "pass only one")
    return name, rev


def looks_local(name: str) -> bool:
    """A --model value that can only be a path (a Hub id is NAME or NAMESPACE/NAME)."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


def locate(model_id: str, revision: str | None = None) -> str:
    """What to hand to from_pretrained: the embedded model's folder, a checked local folder, or the Hub id."""
    if is_embedded(model_id):
        if revision is not None:
            raise UsageError(f"--revision {revision}: {model_id} is the embedded offline model, which has no Hub "
                             f"revisions; drop --revision")
        return str(resolve_embedded(model_id))
    p = Path(model_id).expanduser()
    if p.exists():
        if revision is not None:
            raise UsageError(f"--revision {revision}: --model {model_id} is a local directory, and revisions only "
                             f"apply to Hub models; drop --revision (or pass the Hub id)")
        check_model_dir(p, model_id)
        return str(p)
    if looks_local(model_id):
        raise ModelLoadError(f"--model {model_id}: directory does not exist; check the path (a Hub id looks like "
                             f"NAMESPACE/NAME)")
    return model_id


def check_model_dir(p: Path, model_id: str) -> None:
    """A local model folder with config.json."""
    if not p.is_dir():
        raise ModelLoadError(f"--model {model_id} is a file, not a model directory")
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{model_id} exists but has no config.json: not a Hugging Face model directory")


def check_weights(p: Path, model_id: str) -> None:
    """Weight files present and safetensors headers whole (cheap: headers and sizes only)."""
    files = weight_files(p)
    if not files:
        raise ModelLoadError(f"{model_id} has config.json but no weight files (*.safetensors or *.bin); copy the "
                             f"weights into it or point --model at the complete folder")
    for f in files:
        if f.name.endswith(".safetensors"):
            problem = safetensors_problem(f)
            if problem:
                raise ModelLoadError(f"{f} is corrupt or truncated ({problem}); re-download or re-save the model")


def safetensors_problem(f: Path) -> str | None:
    """Why a safetensors file cannot be whole (header unreadable, data shorter than the header says), or None."""
    size = f.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length"
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if 8 + n > size:
            return f"header of {n} bytes does not fit in {size} bytes"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "the header is not valid JSON"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return "the header does not describe tensors"
    if 8 + n + end > size:
        return f"{size} bytes on disk, the header needs {8 + n + end}"
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tokenizer.tiktoken")


def load_tokenizer(path: str, revision: str | None, model_id: str) -> Any:
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{model_id} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); copy the "
                             f"base model's tokenizer into it (tokenizer.save_pretrained(DIR))")
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError, ImportError) as e:
        msg = str(e)
        hint = ("; the tokenizer needs an optional package: `pip install sentencepiece` (or tiktoken / protobuf, as "
                "named above)") if any(w in msg for w in ("sentencepiece", "tiktoken", "protobuf")) else ""
        raise ModelLoadError(f"could not load the tokenizer of {model_id!r}: {msg.strip().splitlines()[-1]}"
                             f"{hint}") from e


def check_vocab(config: Any, tokenizer: Any, model_id: str) -> None:
    """A tokenizer whose base vocabulary exceeds the embedding table would crash (or read garbage) mid-run.
    Added tokens beyond it (a pad token a fine-tune appended) only matter if emitted: a warning."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or tokenizer is None:
        return
    base = getattr(tokenizer, "vocab_size", None)
    if isinstance(base, int) and base > vocab:
        raise ModelLoadError(f"the tokenizer of {model_id!r} has {base} tokens but the model's vocab_size is "
                             f"{vocab}: ids >= {vocab} have no embedding. Use the model's own tokenizer")
    if len(tokenizer) > vocab:
        extra = [t for t, i in tokenizer.get_added_vocab().items() if i >= vocab]
        log.warning("the tokenizer of %s has added tokens beyond the model's vocab_size %d (%s); text containing "
                    "them cannot be embedded", model_id, vocab, ", ".join(extra[:5]))


def identity_for(model_id: str, path: str, revision: str | None, config: Any) -> dict[str, Any] | None:
    """Where the model came from and a cheap fingerprint of its files (see identity.py)."""
    try:
        if Path(path).is_dir():
            ident = identity_of(path, model_arg=model_id)
            if is_embedded(model_id):
                ident["embedded"] = model_id
            return ident
        from transformers.utils import cached_file

        snapshot = Path(cached_file(model_id, "config.json", revision=revision)).parent
        return identity_of(snapshot, hub_id=model_id, revision=revision, model_arg=model_id,
                           commit=getattr(config, "_commit_hash", None))
    except (OSError, ValueError) as e:  # a fingerprint is provenance, never a reason to fail a load
        log.warning("could not fingerprint %s: %s", model_id, e)
        return {"model_arg": model_id, "hub_id": model_id, "revision": revision}


def _base_of_checkpoint(path: str) -> str:
    return json.loads((Path(path) / "pruning.json").read_text()).get("plan", {}).get("base_model") or path


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights


__all__ = ["DTYPES", "Loaded", "ModelLoadError", "base_model_of", "check_model_dir", "checkpoint_dtype", "count_params",
           "identity_for", "load", "load_config", "load_tokenizer", "locate", "looks_local", "resolve_device",
           "resolve_dtype", "resolve_source", "safetensors_problem"]
