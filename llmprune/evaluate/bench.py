"""Speed of dense vs pruned models on the current device: prefill latency and decode throughput.

What one measurement is (`time_once`), for a batch of B random prompts of T tokens:
- prefill: one forward pass over the prompts with the KV cache on and logits for the last position only
  (what `generate` does before the first new token, i.e. time to first token without sampling);
- decode: `decode_tokens` greedy steps of one token each, reusing that cache. Throughput is
  B · decode_tokens / seconds (tokens generated per second by the whole batch).

Timing hygiene: `torch.inference_mode`, a fixed thread count, `warmup` untimed runs per model and batch
size, then `repeats` timed rounds in which the models alternate and the order flips every round
(ABBA...), so slow drift of the machine (thermal, other load) hits both equally. On CUDA the clock is
read after `torch.cuda.synchronize()`. Reported: median and interquartile range of the repeats.
"""
from __future__ import annotations

import inspect
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from ..errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    prompt_len: int = 512
    decode_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 4)
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None  # None: leave torch's default (one per physical core)
    seed: int = 0

    def validate(self) -> None:
        if self.prompt_len < 1 or self.decode_tokens < 0:
            raise UsageError("--prompt-len must be ≥ 1 and --decode-tokens ≥ 0")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UsageError(f"--batch-sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError("--repeats must be ≥ 1 and --warmup ≥ 0")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be ≥ 1, got {self.threads}")


@dataclass
class Samples:
    """Seconds per repeat for one model at one batch size."""

    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)


def median_iqr(xs: list[float]) -> tuple[float, float]:
    """Median and interquartile range (Q3 − Q1, inclusive quartiles; 0 for a single value)."""
    if not xs:
        raise ValueError("no samples")
    if len(xs) == 1:
        return xs[0], 0.0
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q3 - q1


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(vocab: int, batch_size: int, prompt_len: int, seed: int) -> torch.Tensor:
    """[B, T] token ids drawn uniformly (content does not change the cost of a dense forward pass)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, prompt_len), generator=g)


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the KV cache: `cache` in current transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output, under either name (reading `.past_key_values` is deprecated)."""
    if isinstance(out, Mapping):  # ModelOutput: only the fields that are set are keys
        return next((out[k] for k in ("cache", "past_key_values") if k in out), None)
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def ratio_ci(num: list[float], den: list[float], level: float = 0.95, resamples: int = 2000,
             seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap confidence interval of the mean per-repeat ratio num[r] / den[r].

    Repeats are paired (the two models ran back to back, ABBA), so the per-repeat ratio cancels the
    machine's slow drift; resampling repeats gives the interval (deterministic: fixed seed).
    """
    ratios = torch.tensor([a / b for a, b in zip(num, den) if b > 0], dtype=torch.float64)
    if ratios.numel() < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, ratios.numel(), (resamples, ratios.numel()), generator=g)
    means = ratios[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


@torch.inference_mode()
def prefill(model: nn.Module, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Forward the prompts with the cache on; returns (cache, next token ids [B, 1])."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return output_cache(out), out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def decode(model: nn.Module, cache: Any, token: torch.Tensor, steps: int) -> Any:
    """`steps` greedy single-token steps on top of `cache`; returns the grown cache."""
    kw = cache_keyword(model)
    for _ in range(steps):
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **{kw: cache})
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    return cache


def time_once(model: nn.Module, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, Any]:
    """(prefill seconds, decode seconds, final cache) of one prefill + decode run."""
    device = model_device(model)
    ids = ids.to(device)
    _sync(device)
    t0 = time.perf_counter()
    cache, token = prefill(model, ids)
    _sync(device)
    t1 = time.perf_counter()
    cache = decode(model, cache, token, decode_tokens)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, cache


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key/value tensors of a transformers Cache (layers without attention hold none)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def time_models(models: dict[str, nn.Module], vocab: int, settings: BenchSettings,
                progress: bool = True) -> dict[tuple[str, int], Samples]:
    """Interleaved timing of every model at every batch size: {(model name, batch size): Samples}."""
    settings.validate()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    names = list(models)
    out: dict[tuple[str, int], Samples] = {}
    total = len(settings.batch_sizes) * len(names) * (settings.warmup + settings.repeats)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for bs in settings.batch_sizes:
        ids = random_prompts(vocab, bs, settings.prompt_len, settings.seed + bs)
        for name in names:
            out[(name, bs)] = Samples()
            for _ in range(settings.warmup):
                time_once(models[name], ids, settings.decode_tokens)
                bar.update()
        for r in range(settings.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                p, d, _ = time_once(models[name], ids, settings.decode_tokens)
                out[(name, bs)].prefill_s.append(p)
                out[(name, bs)].decode_s.append(d)
                bar.update()
    bar.close()
    return out


def summarize(samples: Samples, batch_size: int, decode_tokens: int) -> dict[str, float]:
    """Median / IQR of prefill latency (ms) and decode throughput (tokens/s for the whole batch)."""
    p_med, p_iqr = median_iqr([s * 1e3 for s in samples.prefill_s])
    row = {"prefill_ms_median": p_med, "prefill_ms_iqr": p_iqr, "prefill_ms_samples": [s * 1e3 for s in
                                                                                      samples.prefill_s]}
    if decode_tokens > 0:
        tps = [batch_size * decode_tokens / s for s in samples.decode_s]
        d_med, d_iqr = median_iqr(tps)
        row.update(decode_tok_s_median=d_med, decode_tok_s_iqr=d_iqr, decode_tok_s_samples=tps)
    return row


def run_speed(models: dict[str, nn.Module], vocab: int, settings: BenchSettings, progress: bool = True,
              memory: dict[str, dict[int, dict[str, Any]]] | None = None) -> list[dict]:
    """Rows of the report's `speed.runs`: one per model and batch size, with memory columns when given
    ({model name: {batch size: columns}})."""
    samples = time_models(models, vocab, settings, progress=progress)
    memory = memory or {}
    rows = []
    for bs in settings.batch_sizes:
        for name in models:
            row: dict[str, Any] = {"batch_size": bs, "model": name}
            row.update(summarize(samples[(name, bs)], bs, settings.decode_tokens))
            row.update(memory.get(name, {}).get(bs, {}))
            rows.append(row)
    return rows


__all__ = ["BenchSettings", "Samples", "cache_bytes", "cache_keyword", "decode", "output_cache", "ratio_ci", "median_iqr", "model_device", "prefill",
           "random_prompts", "run_speed", "summarize", "time_models", "time_once", "weight_bytes"]
