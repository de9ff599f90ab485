"""Llama-architecture family: Llama 2/3, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms, free head_dim).

All four share module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, RMSNorm pre-norms),
so one adapter serves them and the pruned models they turn into (`llmprune_llama`).
"""
from __future__ import annotations

from typing import Any

from ..modeling.configuration_llmprune import BASE_MODEL_TYPES, LlmpruneLlamaConfig
from .decoder import DecoderFamily


class LlamaFamily(DecoderFamily):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "llmprune_llama")
    pruned_configs = dict.fromkeys(BASE_MODEL_TYPES, LlmpruneLlamaConfig)

    def stock_layer_types(self, config: Any) -> list[str]:
        n = config.num_hidden_layers
        if config.model_type in ("qwen2", "qwen3") and getattr(config, "layer_types", None):
            return list(config.layer_types)
        if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
            return ["sliding_attention"] * n
        return ["full_attention"] * n

    def native_biases(self, config: Any) -> tuple[bool, bool, bool, bool]:
        mt = self.base_model_type(config)
        if mt == "qwen2":
            return True, False, False, False
        att = bool(getattr(config, "attention_bias", False))
        mlp = bool(getattr(config, "mlp_bias", False)) if mt == "llama" else False
        return att, att, mlp, mlp
