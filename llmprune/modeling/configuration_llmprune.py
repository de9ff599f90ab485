"""Configurations of structurally pruned models, one per base family:
  llmprune_llama        Llama, Mistral, Qwen2, Qwen3 (base_model_type says which)
  llmprune_gemma2       Gemma 2
  llmprune_gemma3_text  Gemma 3 (text)
  llmprune_phi3         Phi-3
  llmprune_olmo2        OLMo 2

This file is copied next to the weights of every non-uniform llmprune checkpoint and loaded by
`AutoConfig.from_pretrained(dir, trust_remote_code=True)`, so it must import nothing but
transformers and huggingface_hub. Each class is its base family's own config class plus the
pruning fields; per-layer shapes live in transformers' native `per_layer_config` (sparse overrides
of num_attention_heads, num_key_value_heads, intermediate_size, o_proj_bias, down_proj_bias and
`skip: ["attention" | "mlp"]`).
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.gemma2.configuration_gemma2 import Gemma2Config
from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.olmo2.configuration_olmo2 import Olmo2Config
from transformers.models.phi3.configuration_phi3 import Phi3Config

BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # of llmprune_llama
SKIPPABLE = ("attention", "mlp")
# Layer type of an attention-free layer: a KV-cache placeholder that stores nothing. Newer transformers
# know "mlp" (mapped to a dummy layer); 5.14 only has the "moe" placeholder.
NO_ATTENTION = "mlp" if "mlp" in DYNAMIC_LAYER_TYPE_MAPPING or "dummy" in DYNAMIC_LAYER_TYPE_MAPPING else "moe"
ATTENTION_TYPES = ("full_attention", "sliding_attention")
_LIVE = "_llmprune_live_config"  # per-layer config -> the model's config (see link_layer_config)


class _PrunedConfigMixin:
    """What every pruned config adds to its base class: derived layer types, per-layer validation."""

    base_model_types: tuple[str, ...] = ()

    @property
    def layer_types(self) -> list[str] | None:
        # Derived, never serialized: an attention-free layer is "mlp", which the KV cache maps to a
        # layer that stores nothing, so cache lengths come from the first layer that has attention.
        base = self.base_layer_types or ["full_attention"] * self.num_hidden_layers
        return [NO_ATTENTION if "attention" in self._skips(i) else base[i] for i in range(self.num_hidden_layers)]

    @layer_types.setter
    def layer_types(self, value: list[str] | None) -> None:
        # Base classes with a `layer_types` field (Gemma) assign it in __init__ / __post_init__: keep the
        # attention types (a derived list with "mlp" entries carries no information base_layer_types lacks).
        if value is not None and "mlp" not in value and NO_ATTENTION not in value:
            self.__dict__["base_layer_types"] = list(value)

    @property
    def _attn_implementation(self) -> str | None:
        # A per-layer config (a copy made at init) follows the live model config, so switching the
        # attention implementation after loading reaches every layer's attention module.
        live = self.__dict__.get(_LIVE)
        return live._attn_implementation if live is not None else self.__dict__.get("_attn_implementation_internal")

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        PreTrainedConfig._attn_implementation.fset(self, value)

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
            bad = set(self.base_layer_types) - set(ATTENTION_TYPES)
            if bad:
                raise ValueError(f"unsupported base_layer_types {sorted(bad)}")

    def validate_architecture(self) -> None:
        if self.base_model_type not in self.base_model_types:
            raise ValueError(f"base_model_type {self.base_model_type!r} is not one of {self.base_model_types}")
        if self.head_dim is None:
            raise ValueError(f"{self.model_type} needs an explicit head_dim")
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


def link_layer_config(layer_config: PreTrainedConfig, config: PreTrainedConfig) -> PreTrainedConfig:
    """Make a per-layer config copy follow `config`'s attention implementation; returns it."""
    if layer_config is not config:
        layer_config.__dict__[_LIVE] = config
    return layer_config


# `@strict` on every class is required: it re-collects the validate_* overrides (the parents' would
# reject per-layer heads, or a head count that does not divide hidden_size).
@strict
class LlmpruneLlamaConfig(_PrunedConfigMixin, LlamaConfig):
    model_type = "llmprune_llama"
    base_model_types = BASE_MODEL_TYPES

    base_model_type: str = "llama"  # which transformers family provides attention / MLP / norm modules
    base_layer_types: list[str] | None = None  # "full_attention" | "sliding_attention" per layer, before skips
    sliding_window: int | None = None
    o_proj_bias: bool = False  # bias added to o_proj (e.g. FLAP bias compensation)
    down_proj_bias: bool = False  # bias added to down_proj


@strict
class LlmpruneGemma2Config(_PrunedConfigMixin, Gemma2Config):
    model_type = "llmprune_gemma2"
    base_model_types = ("gemma2",)

    base_model_type: str = "gemma2"
    base_layer_types: list[str] | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


@strict
class LlmpruneGemma3TextConfig(_PrunedConfigMixin, Gemma3TextConfig):
    model_type = "llmprune_gemma3_text"
    base_model_types = ("gemma3_text",)

    base_model_type: str = "gemma3_text"
    base_layer_types: list[str] | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


@strict
class LlmprunePhi3Config(_PrunedConfigMixin, Phi3Config):
    model_type = "llmprune_phi3"
    base_model_types = ("phi3",)

    base_model_type: str = "phi3"
    base_layer_types: list[str] | None = None
    head_dim: int | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    def validate_rope(self) -> None:
        # Phi3Config sizes longrope factors by hidden_size // num_attention_heads, which is the head size
        # only before pruning; the rotary dimension follows head_dim.
        PreTrainedConfig.validate_rope(self)
        rope = self.rope_parameters
        if rope.get("rope_type", "default") not in ("default", "longrope"):
            raise ValueError(f"rope_type must be 'default' or 'longrope', got {rope.get('rope_type')}")
        half = int(self.head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            if rope.get(key) is not None and len(rope[key]) != half:
                raise ValueError(f"rope_parameters.{key} must have {half} entries, got {len(rope[key])}")


@strict
class LlmpruneOlmo2Config(_PrunedConfigMixin, Olmo2Config):
    model_type = "llmprune_olmo2"
    base_model_types = ("olmo2",)

    base_model_type: str = "olmo2"
    base_layer_types: list[str] | None = None
    head_dim: int | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


CONFIG_CLASSES = (LlmpruneLlamaConfig, LlmpruneGemma2Config, LlmpruneGemma3TextConfig, LlmprunePhi3Config,
                  LlmpruneOlmo2Config)

__all__ = ["CONFIG_CLASSES", "LlmpruneGemma2Config", "LlmpruneGemma3TextConfig", "LlmpruneLlamaConfig",
           "LlmpruneOlmo2Config", "LlmprunePhi3Config", "link_layer_config"]
