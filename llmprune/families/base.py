"""Architecture-neutral views of a decoder-only transformer.

Everything outside `llmprune/families/` talks to models through these types, never through HF
module names. A Family turns a concrete HF model into per-layer `BlockView`s and `Geometry`s.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn
from ..errors import UsageError


@dataclass(frozen=True)
class Geometry:
    """Shape of one decoder layer. Parameter costs are derived from it, never from constants."""

    hidden: int
    n_q_heads: int  # 0 when the attention sublayer is gone
    n_kv_heads: int
    head_dim: int  # never changes under pruning (RoPE and kernels depend on it)
    intermediate: int  # 0 when the FFN sublayer is gone
    has_attn: bool = True  # False with o_bias: a bias-only sublayer (constant vector on the residual)
    has_mlp: bool = True  # False with down_bias: likewise
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_in_bias: bool = False  # gate/up bias
    down_bias: bool = False
    gated_mlp: bool = True  # gate+up+down (3 matrices) vs up+down

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads per KV head (g)."""
        return self.n_q_heads // self.n_kv_heads if self.n_kv_heads else 0

    @property
    def n_mlp_mats(self) -> int:
        return 3 if self.gated_mlp else 2

    # ---- parameter costs (decoder-layer linear parameters, biases included) --------------------
    def attn_params(self) -> int:
        if not self.has_attn:
            return self.hidden * self.o_bias  # a bias-only sublayer (FLAP compensation of a removed one)
        q, kv, hd, d = self.n_q_heads, self.n_kv_heads, self.head_dim, self.hidden
        weights = (2 * q + 2 * kv) * hd * d
        biases = (q + 2 * kv) * hd * self.qkv_bias + d * self.o_bias
        return weights + biases

    def mlp_params(self) -> int:
        if not self.has_mlp:
            return self.hidden * self.down_bias
        m, d = self.intermediate, self.hidden
        in_mats = self.n_mlp_mats - 1
        return self.n_mlp_mats * m * d + in_mats * m * self.mlp_in_bias + d * self.down_bias

    def linear_params(self) -> int:
        return self.attn_params() + self.mlp_params()

    def kv_group_cost(self) -> int:
        """Parameters of one KV group: one KV head and its g query heads ((2g+2)·hd·d, + q/k/v biases)."""
        g, hd, d = self.group_size, self.head_dim, self.hidden
        return (2 * g + 2) * hd * d + (g + 2) * hd * self.qkv_bias

    def q_head_cost(self) -> int:
        """Parameters of one query head inside a group (q rows + o columns)."""
        return 2 * self.head_dim * self.hidden + self.head_dim * self.qkv_bias

    def ffn_channel_cost(self) -> int:
        """Parameters of one FFN channel (gate/up row + down column)."""
        return self.n_mlp_mats * self.hidden + (self.n_mlp_mats - 1) * self.mlp_in_bias

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(**d)

    def with_(self, **changes: Any) -> Geometry:
        return replace(self, **changes)


class FusedRows:
    """Rows [start, stop) of a fused nn.Linear, seen as a projection of its own (Phi-3's qkv_proj, gate_up_proj).

    Pruners read `weight` / `bias` (views, [stop-start, in] / [stop-start]); calibration hooks register on the
    fused module, whose input is the input of every part. Surgery cuts all parts of one parent together.
    """

    def __init__(self, parent: nn.Linear, start: int, stop: int):
        if not 0 <= start < stop <= parent.out_features:
            raise ValueError(f"rows [{start}, {stop}) do not lie in a Linear with {parent.out_features} outputs")
        self.parent, self.start, self.stop = parent, start, stop

    @property
    def weight(self) -> torch.Tensor:
        return self.parent.weight[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.parent.bias
        return None if b is None else b[self.start:self.stop]

    @property
    def in_features(self) -> int:
        return self.parent.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def register_forward_pre_hook(self, hook: Any, **kwargs: Any) -> Any:
        return self.parent.register_forward_pre_hook(hook, **kwargs)

    def __repr__(self) -> str:
        return f"FusedRows({self.parent!r}, {self.start}, {self.stop})"


Projection = nn.Linear | FusedRows


@dataclass
class AttnView:
    """The attention sublayer of one block: its projections and norms.

    norm: applied to the sublayer input (None in post-norm layouts such as OLMo 2); post_norm: applied to the
    sublayer output before the residual add (Gemma 2/3 sandwich, OLMo 2), None otherwise. Both go when the
    sublayer is removed. q_norm / k_norm: norms on the projected queries / keys; `qk_norm_per_head` says
    whether they act per head ([head_dim] weight: Qwen3, Gemma 3) or over the whole projection
    ([n_heads·head_dim] weight: OLMo 2), where pruning heads slices the weight and changes the statistic.
    """

    module: nn.Module
    norm: nn.Module | None
    q: Projection
    k: Projection
    v: Projection
    o: nn.Linear
    head_dim: int
    post_norm: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    qk_norm_per_head: bool = True

    def norms(self) -> list[nn.Module]:
        """The residual-branch norms that belong to this sublayer (removed with it)."""
        return [n for n in (self.norm, self.post_norm) if n is not None]


@dataclass
class MlpView:
    """The FFN sublayer of one block. `inputs` are the row-sliced matrices (gate, up); `down` is column-sliced."""

    module: nn.Module
    norm: nn.Module | None
    inputs: list[Projection]
    down: nn.Linear
    post_norm: nn.Module | None = None

    def norms(self) -> list[nn.Module]:
        return [n for n in (self.norm, self.post_norm) if n is not None]


@dataclass
class BlockView:
    index: int
    module: nn.Module
    attn: AttnView | None
    mlp: MlpView | None


class Family(Protocol):
    """What llmprune needs to know about one architecture family."""

    name: str
    model_types: tuple[str, ...]

    def matches(self, config: Any) -> bool: ...

    def layers(self, model: nn.Module) -> nn.ModuleList: ...

    def block(self, model: nn.Module, index: int) -> BlockView: ...

    def geometry(self, model: nn.Module) -> list[Geometry]: ...

    def base_model_type(self, config: Any) -> str: ...

    def target_config(self, model: nn.Module, geometries: list[Geometry], keep_layers: list[int]) -> Any: ...

    def model_class_for(self, config: Any) -> type[nn.Module]: ...

    def final_norm(self, model: nn.Module) -> nn.Module: ...

    def lm_head(self, model: nn.Module) -> nn.Module: ...

    def embed(self, model: nn.Module) -> nn.Module: ...

    def logit_softcap(self, config: Any) -> float | None:
        """c when the model's logits are c·tanh(lm_head(x)/c) (Gemma 2), else None."""
        ...

    def attn_residual(self, block: BlockView, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        """hidden + attention(norm(hidden)) — half a decoder layer, for what-if evaluation ([b, T, d])."""
        ...

    def mlp_residual(self, block: BlockView, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + mlp(norm(hidden)) — the other half ([b, T, d])."""
        ...


class UnsupportedModelError(UsageError):
    """The model's architecture has no llmprune family."""
