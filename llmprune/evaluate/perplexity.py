"""Corpus perplexity over non-overlapping windows.

The evaluation stream (documents joined with "\\n\\n") is cut into ⌊N / seqlen⌋ windows of
`seqlen` tokens; the remainder is dropped. Each window is scored independently (no context carried
over) and every window position after the first is a prediction:

    ppl = exp( Σ_windows Σ_{t=1}^{seqlen-1} −log p(x_t | x_<t) / (n_windows · (seqlen − 1)) )

Log-probabilities are computed in float32 whatever the model dtype.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import data


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_windows: int
    seqlen: int
    n_tokens: int  # predicted tokens

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token stream, non-overlapping windows of `seqlen`."""
    if tokens.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    n_windows = tokens.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
                         f"lower --seqlen or use more text")
    device = next(model.parameters()).device
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)
    total_nll = 0.0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", disable=not progress,
                      total=math.ceil(n_windows / batch_size)):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # [b, T, V]
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, T-1]
        total_nll += float(nll.double().sum())
    n_pred = n_windows * (seqlen - 1)
    mean_nll = total_nll / n_pred
    return PerplexityResult(perplexity=math.exp(mean_nll), nll=mean_nll, n_windows=n_windows, seqlen=seqlen,
                            n_tokens=n_pred)


def eval_perplexity(model: nn.Module, tokenizer: Any, source: str | None = None, seqlen: int = 512,
                    split: str = "test", max_windows: int | None = None,
                    batch_size: int = 1, text_field: str = "text", progress: bool = True) -> tuple[PerplexityResult, dict]:
    """Perplexity on a named dataset or local text (None: the default, see data.resolve_source); returns the
    result and the resolved source."""
    source = data.resolve_source(source)
    tokens, resolved = data.eval_tokens(tokenizer, source, split=split, text_field=text_field)
    res = perplexity(model, tokens, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows, progress=progress)
    return res, resolved.to_dict()
