"""OLMo 2: post-norm layers and q/k RMSNorms over the whole projection.

Each sublayer's output is normalised before the residual add (`post_attention_layernorm`,
`post_feedforward_layernorm`); nothing normalises its input. `q_norm` / `k_norm` act on the whole
q / k projection (weights of n_q·hd and n_kv·hd, one RMS statistic over all heads), so pruning heads
slices their weights with the q / k rows, and the surviving heads see a statistic over the surviving
heads only: `simulate` reproduces exactly that, so scores from simulation match the applied model.
"""
from __future__ import annotations

from ..modeling.configuration_llmprune import LlmpruneOlmo2Config
from .decoder import DecoderFamily


class Olmo2Family(DecoderFamily):
    name = "olmo2"
    model_types = ("olmo2", "llmprune_olmo2")
    pruned_configs = {"olmo2": LlmpruneOlmo2Config}
    attn_norm = None
    attn_post_norm = "post_attention_layernorm"
    mlp_norm = None
    mlp_post_norm = "post_feedforward_layernorm"
    qk_norm_per_head = False
