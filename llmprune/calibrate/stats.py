"""Streaming statistics in float64, mergeable (Chan et al.), whatever the model dtype."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class RunningMoments:
    """Per-channel count / mean / M2 over every token seen. `update` takes [..., C]."""

    count: int = 0
    mean: torch.Tensor | None = None  # [C] float64
    m2: torch.Tensor | None = None  # [C] float64: sum of squared deviations from the mean

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # [N, C]
        n = x.shape[0]
        if n == 0:
            return
        b_mean = x.mean(dim=0)
        b_m2 = ((x - b_mean) ** 2).sum(dim=0)
        self.merge(RunningMoments(count=n, mean=b_mean, m2=b_m2))

    def merge(self, other: RunningMoments) -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.clone(), other.m2.clone()
            return
        other_mean, other_m2 = other.mean.to(self.mean.device), other.m2.to(self.mean.device)
        n = self.count + other.count
        delta = other_mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other_m2 + delta**2 * (self.count * other.count / n)
        self.count = n

    # ---- derived ---------------------------------------------------------------------------------
    def var(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel variance over all tokens (unbiased: divided by N-1, as FLAP's formula)."""
        self._check()
        denom = self.count - 1 if unbiased and self.count > 1 else self.count
        return self.m2 / denom

    def sumsq(self) -> torch.Tensor:
        """Σ x² per channel (= M2 + N·mean²)."""
        self._check()
        return self.m2 + self.count * self.mean**2

    def l2(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens (Wanda's activation norm)."""
        return self.sumsq().sqrt()

    def _check(self) -> None:
        if self.count == 0 or self.mean is None:
            raise ValueError("no data was recorded at this site")


@dataclass
class BlockSimilarity:
    """Similarity of a block's input and output hidden states, summed over tokens.

    angular: arccos(cos(x_in, x_out)) / π per token (CFSP); one_minus_cos: 1 − cos (ShortGPT BI).
    A zero vector gives cos = NaN; it counts as 0.5 angular distance and 1.0 for 1−cos.
    """

    count: int = 0
    angular_sum: float = 0.0
    one_minus_cos_sum: float = 0.0

    @torch.no_grad()
    def update(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        a = x_in.detach().reshape(-1, x_in.shape[-1]).to(torch.float64)
        b = x_out.detach().reshape(-1, x_out.shape[-1]).to(torch.float64)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=0.0)
        bad = torch.isnan(cos)
        cos = cos.clamp(-1.0, 1.0)
        ang = torch.where(bad, torch.full_like(cos, 0.5), torch.arccos(cos) / math.pi)
        omc = torch.where(bad, torch.ones_like(cos), 1.0 - cos)
        self.count += int(cos.numel())
        self.angular_sum += float(ang.sum())
        self.one_minus_cos_sum += float(omc.sum())

    def merge(self, other: BlockSimilarity) -> None:
        self.count += other.count
        self.angular_sum += other.angular_sum
        self.one_minus_cos_sum += other.one_minus_cos_sum

    @property
    def angular_mean(self) -> float:
        return self.angular_sum / max(self.count, 1)

    @property
    def block_influence(self) -> float:
        """ShortGPT's BI = 1 − E[cos]."""
        return self.one_minus_cos_sum / max(self.count, 1)


@dataclass
class Stats:
    """Statistics by canonical site name: `L3.attn.o_in`, `L3.mlp.down_in`, `L3.block`, ..."""

    moments: dict[str, RunningMoments] = field(default_factory=dict)
    blocks: dict[str, BlockSimilarity] = field(default_factory=dict)
    n_tokens: int = 0

    def __getitem__(self, site: str) -> RunningMoments:
        if site not in self.moments:
            raise KeyError(f"no statistics were collected at {site!r} (collected: {sorted(self.moments)[:6]}...)")
        return self.moments[site]

    def __contains__(self, site: str) -> bool:
        return site in self.moments or site in self.blocks

    def block(self, layer: int) -> BlockSimilarity:
        return self.blocks[site_name(layer, "block")]

    def merge(self, other: Stats) -> None:
        for k, v in other.moments.items():
            self.moments.setdefault(k, RunningMoments()).merge(v)
        for k, v in other.blocks.items():
            self.blocks.setdefault(k, BlockSimilarity()).merge(v)


def site_name(layer: int, site: str) -> str:
    return f"L{layer}.{site}"
