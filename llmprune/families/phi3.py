"""Phi-3: Llama-like pre-norm layers with fused projections.

`self_attn.qkv_proj` stacks the query rows (n_q·hd), then the key rows (n_kv·hd), then the value
rows (n_kv·hd); `mlp.gate_up_proj` stacks the gate rows (m), then the up rows (m). The views
expose each block as `FusedRows`, so pruners score q/k/v and gate/up as usual and surgery cuts
the matching rows of every block of the fused weight, keeping the stacked layout (GQA included).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..modeling.configuration_llmprune import LlmprunePhi3Config
from .base import FusedRows, Projection
from .decoder import DecoderFamily


class Phi3Family(DecoderFamily):
    name = "phi3"
    model_types = ("phi3", "llmprune_phi3")
    pruned_configs = {"phi3": LlmprunePhi3Config}

    def qkv(self, attn: nn.Module) -> tuple[Projection, Projection, Projection]:
        # Shapes from the module itself (its config may be the global one of a pruned model).
        hd, fused = attn.head_dim, attn.qkv_proj
        n_q = attn.o_proj.in_features // hd
        n_kv = (fused.out_features - n_q * hd) // (2 * hd)
        q_end, k_end = n_q * hd, (n_q + n_kv) * hd
        return FusedRows(fused, 0, q_end), FusedRows(fused, q_end, k_end), FusedRows(fused, k_end, fused.out_features)

    def mlp_inputs(self, mlp: nn.Module) -> list[Projection]:
        m = mlp.down_proj.in_features
        return [FusedRows(mlp.gate_up_proj, 0, m), FusedRows(mlp.gate_up_proj, m, 2 * m)]

    def stock_layer_types(self, config: Any) -> list[str]:
        sliding = getattr(config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers

    def native_biases(self, config: Any) -> tuple[bool, bool, bool, bool]:
        return False, False, False, False
