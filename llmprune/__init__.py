"""llmprune: post-training structured pruning for Hugging Face causal LMs.

    import llmprune as lp
    loaded = lp.load("smollm2-135m")
    pruned, plan = lp.prune(loaded.model, lp.load_recipe("magnitude", {"sparsity": 0.2}))
    lp.save_pruned(pruned, loaded.tokenizer, "out/", plan)
    model, tokenizer = lp.load_pruned("out/")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .modeling import register as _register

_register()  # `llmprune_*` checkpoints load through the Auto classes without trust_remote_code

from .api import Loaded, calibration_tokens, eval_perplexity, load, make_plan, prune, run, run_bench, run_eval  # noqa: E402,E501
from .calibrate import Stats, calibrate  # noqa: E402
from .checkpoint import load_pruned, save_pruned  # noqa: E402
from .errors import LlmpruneError, UsageError  # noqa: E402
from .families import Geometry, family_for  # noqa: E402
from .hub import push_to_hub  # noqa: E402
from .modelcard import build_model_card  # noqa: E402
from .plan import AttnPlan, LayerPlan, MlpPlan, Plan  # noqa: E402
from .recipe import load_recipe  # noqa: E402
from .surgery import apply, simulate  # noqa: E402

__all__ = ["AttnPlan", "Geometry", "LayerPlan", "Loaded", "MlpPlan", "Plan", "Stats", "__version__", "apply",
           "calibrate", "calibration_tokens", "eval_perplexity", "family_for", "load", "load_pruned",
           "load_recipe", "make_plan", "prune", "run", "run_bench", "run_eval", "save_pruned", "simulate"]
__all__ += ["LlmpruneError", "UsageError"]  # every user-facing error (errors.py)
__all__ += ["build_model_card", "push_to_hub"]  # publishing (hub.py, modelcard.py)
