"""Peak memory of one prefill + decode run, including the KV cache.

- CUDA: in the benchmark process. `torch.cuda.max_memory_allocated` after a peak reset, minus what
  was allocated before the run (the other model's weights may be resident too), plus this model's
  own weight bytes: peak = weights + KV cache + activations + allocator workspace of this model.
- CPU: allocations are not tracked per model, so each model runs in a fresh Python process
  (`python -m llmprune.evaluate.memory`) that loads it and, for each batch size in increasing order,
  resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), runs prefill + decode once, and reports
  peak RSS minus the RSS the process had before loading the model (interpreter + libraries). Memory
  freed by a smaller batch and kept by the allocator is reused by the next, larger one.
  Where the mark cannot be reset (not Linux), the lifetime peak `ru_maxrss` is used, which also
  counts transient memory of loading; the report names the method used.

Both paths also report exact `weight_bytes` (parameters + buffers) and `kv_cache_bytes` (the cache
tensors after prefill + decode), which do not depend on the allocator.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bench import BenchSettings, cache_bytes, random_prompts, time_once, weight_bytes

CPU_METHOD = "peak RSS of a fresh process per model (peak mark reset before each batch size), minus its RSS " \
             "before loading the model"
CPU_METHOD_FALLBACK = "ru_maxrss of a fresh process per model (lifetime peak, includes loading), minus its RSS " \
                      "before loading the model"
CUDA_METHOD = "torch.cuda.max_memory_allocated during the run, minus memory allocated before it, plus the model's weights"


# ---- CUDA, in process ----------------------------------------------------------------------------------
def cuda_peak(model: nn.Module, vocab: int, settings: BenchSettings) -> dict[int, dict[str, int]]:
    """{batch size: memory columns} for a model that lives on a CUDA device."""
    dev = next(model.parameters()).device
    out = {}
    for bs in settings.batch_sizes:
        ids = random_prompts(vocab, bs, settings.prompt_len, settings.seed + bs)
        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        _, _, cache = time_once(model, ids, settings.decode_tokens)
        peak = torch.cuda.max_memory_allocated(dev)
        w = weight_bytes(model)
        out[bs] = {"peak_mem_bytes": peak - before + w, "weight_bytes": w, "kv_cache_bytes": cache_bytes(cache)}
        del cache
    return out


# ---- CPU, one fresh process per measurement -----------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def _peak_rss(reset_ok: bool) -> int:
    if reset_ok:
        hwm = _status_kb("VmHWM")
        if hwm is not None:
            return hwm
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _current_rss() -> int:
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def probe(model_spec: str, settings: BenchSettings, dtype: str) -> dict[int, dict[str, Any]]:
    """Runs inside the fresh process: load, then per batch size reset the peak mark, run once, report."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    from ..loading import load  # imports transformers and the model classes before the baseline RSS is read

    gc.collect()
    rss0 = _current_rss()
    model = load(model_spec, device="cpu", dtype=dtype).model
    gc.collect()
    out = {}
    for bs in sorted(settings.batch_sizes):
        ids = random_prompts(model.config.vocab_size, bs, settings.prompt_len, settings.seed + bs)
        reset_ok = _reset_peak_rss()
        _, _, cache = time_once(model, ids, settings.decode_tokens)
        peak = _peak_rss(reset_ok)
        out[bs] = {"peak_mem_bytes": peak - rss0, "peak_rss_bytes": peak, "weight_bytes": weight_bytes(model),
                   "kv_cache_bytes": cache_bytes(cache), "method": CPU_METHOD if reset_ok else CPU_METHOD_FALLBACK}
        del cache
        gc.collect()
    return out


def cpu_peaks(specs: dict[str, str], settings: BenchSettings, dtype: str,
              timeout: float = 3600) -> dict[str, dict[int, dict[str, Any]]]:
    """{name: {batch size: memory columns}}, one fresh subprocess per model. The processes run side by side:
    each measures only its own RSS, so they do not disturb each other's numbers (timing runs separately)."""
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    procs = {}
    for name, spec in specs.items():
        cmd = [sys.executable, "-m", "llmprune.evaluate.memory", "--model", spec,
               "--batch-sizes", ",".join(map(str, settings.batch_sizes)), "--prompt-len", str(settings.prompt_len),
               "--decode-tokens", str(settings.decode_tokens), "--seed", str(settings.seed), "--dtype", dtype]
        if settings.threads is not None:
            cmd += ["--threads", str(settings.threads)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe of {specs[name]} failed:\n{stderr[-2000:]}")
            rows = json.loads(stdout.strip().splitlines()[-1])
            out[name] = {int(bs): row for bs, row in rows.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmprune.evaluate.memory",
                                description="Peak memory of one prefill + decode run (used by `llmprune bench`).")
    p.add_argument("--model", required=True)
    p.add_argument("--batch-sizes", required=True, help="comma-separated")
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--decode-tokens", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    settings = BenchSettings(prompt_len=a.prompt_len, decode_tokens=a.decode_tokens, threads=a.threads, seed=a.seed,
                             batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")))
    print(json.dumps(probe(a.model, settings, a.dtype)))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through cpu_peak in a subprocess
    sys.exit(main())
