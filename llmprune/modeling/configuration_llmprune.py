"""Configuration of a structurally pruned Llama-architecture model (Llama, Mistral, Qwen2, Qwen3).

This file is copied next to the weights of every non-uniform llmprune checkpoint and loaded by
`AutoConfig.from_pretrained(dir, trust_remote_code=True)`, so it must import nothing but
transformers and huggingface_hub. Per-layer shapes live in transformers' native `per_layer_config`
(sparse overrides of num_attention_heads, num_key_value_heads, intermediate_size, o_proj_bias,
down_proj_bias and `skip: ["attention" | "mlp"]`).
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING
from transformers.models.llama.configuration_llama import LlamaConfig

BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SKIPPABLE = ("attention", "mlp")
# Layer type of an attention-free layer: a KV-cache placeholder that stores nothing. Newer transformers
# know "mlp" (mapped to a dummy layer); 5.14 only has the "moe" placeholder.
NO_ATTENTION = "mlp" if "mlp" in DYNAMIC_LAYER_TYPE_MAPPING or "dummy" in DYNAMIC_LAYER_TYPE_MAPPING else "moe"


@strict  # required: re-collects the validate_* overrides below (the parent's would reject per-layer heads)
class LlmpruneLlamaConfig(LlamaConfig):
    model_type = "llmprune_llama"

    base_model_type: str = "llama"  # which transformers family provides attention / MLP / norm modules
    base_layer_types: list[str] | None = None  # "full_attention" | "sliding_attention" per layer, before skips
    sliding_window: int | None = None
    # Bias added to o_proj / down_proj (e.g. FLAP bias compensation). On a layer that skips the
    # sublayer it means a bias-only sublayer: a constant vector (its mean output) added to the residual.
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    @property
    def layer_types(self) -> list[str]:
        # Derived, never serialized: an attention-free layer is "mlp", which the KV cache maps to a
        # layer that stores nothing, so cache lengths come from the first layer that has attention.
        base = self.base_layer_types or ["full_attention"] * self.num_hidden_layers
        out = []
        for i in range(self.num_hidden_layers):
            skip = self._skips(i)
            out.append(NO_ATTENTION if "attention" in skip else base[i])
        return out

    def _skips(self, layer_idx: int) -> list[str]:
        if not self.is_heterogeneous:
            return []
        return list(getattr(self.per_layer_config[layer_idx], "skip", None) or [])

    def validate_layer_type(self) -> None:
        if self.base_layer_types is not None:
            if len(self.base_layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"base_layer_types has {len(self.base_layer_types)} entries for {self.num_hidden_layers} layers"
                )
            bad = set(self.base_layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ValueError(f"unsupported base_layer_types {sorted(bad)}")

    def validate_architecture(self) -> None:
        if self.base_model_type not in BASE_MODEL_TYPES:
            raise ValueError(f"base_model_type {self.base_model_type!r} is not one of {BASE_MODEL_TYPES}")
        if self.head_dim is None:
            raise ValueError("llmprune_llama needs an explicit head_dim")
        layers = self.per_layer_config if self.is_heterogeneous else [self] * self.num_hidden_layers
        for i, lc in enumerate(layers):
            skip = set(getattr(lc, "skip", None) or [])
            if skip - set(SKIPPABLE):
                raise ValueError(f"layer {i}: skip may only contain {SKIPPABLE}, got {sorted(skip)}")
            if "attention" in skip:
                continue
            q, kv = lc.num_attention_heads, lc.num_key_value_heads
            if q <= 0 or kv <= 0 or q % kv:
                raise ValueError(f"layer {i}: {q} query heads are not a positive multiple of {kv} KV heads")


__all__ = ["LlmpruneLlamaConfig"]
