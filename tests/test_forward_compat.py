"""The code shipped inside checkpoints uses the installed transformers' current API (no deprecated keywords)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmprune import surgery
from llmprune.checkpoint import save_pruned

from .conftest import NO_LLMPRUNE_PREAMBLE, make_model
from .test_surgery import mixed_plan

# A fresh interpreter where `import llmprune` is impossible and every Future/DeprecationWarning is an error.
STRICT_GENERATE = NO_LLMPRUNE_PREAMBLE + textwrap.dedent("""
    from transformers import AutoModelForCausalLM
    d, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    with torch.no_grad():
        cached = m.generate(ids, max_new_tokens=6, do_sample=False)
        plain = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    print(json.dumps({"cached": cached.tolist(), "plain": plain.tolist()}))
""")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_saved_checkpoint_generates_without_deprecated_api(tmp_path, tiny_tokenizer, family):
    model = make_model(family)
    pruned = surgery.apply(model, mixed_plan(model, compensate=True))
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "ckpt", mixed_plan(model, compensate=True))
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        local = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    proc = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-c", STRICT_GENERATE,
         str(out), json.dumps(ids.tolist())],
        capture_output=True, text=True, cwd=Path(out).parent, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["cached"] == res["plain"] == local.tolist()  # the KV cache changes nothing
