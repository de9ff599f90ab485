"""The model card: metadata valid for huggingface_hub (and the fake Hub's validate-yaml), honest body."""
from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard, ModelCardData, constants
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from llmprune.modelcard import CARD_MARKER, base_license, build_model_card, write_model_card

from .fake_hub import FakeHub, check_card
from .hub_helpers import REPORT, SMOL, front_matter, nonuniform_checkpoint, uniform_checkpoint


@pytest.fixture
def nonuniform(tmp_path, tiny_tokenizer):
    return nonuniform_checkpoint(tmp_path / "nu", tiny_tokenizer)[0]


@pytest.fixture
def uniform(tmp_path, tiny_tokenizer):
    return uniform_checkpoint(tmp_path / "u", tiny_tokenizer)[0]


def test_nonuniform_card_metadata_round_trips(nonuniform, tmp_path):
    card = build_model_card(nonuniform, repo_id="alice/tiny-ft")
    text = str(card)
    meta = front_matter(text)
    assert meta["base_model"] == SMOL and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["Salesforce/wikitext"]
    assert meta["tags"][:4] == ["llmprune", "pruned", "structured-pruning", "finercut"]

    # model-index: this model's numbers only, through huggingface_hub's own parser and back
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-ft"
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in results}
    assert values == {("python-docs", "perplexity"): 31.2, ("wikitext2", "perplexity"): 40.5,
                      ("arc_easy", "acc"): 0.5, ("arc_easy", "acc_norm"): 0.51}
    assert not {24.1, 30.25, 0.6} & set(values.values())  # baseline numbers stay out of the metadata
    wiki = next(r for r in results if r.dataset_name == "wikitext2")
    assert (wiki.dataset_type, wiki.dataset_config, wiki.dataset_split) == ("Salesforce/wikitext",
                                                                           "wikitext-2-raw-v1", "test")
    arc = next(r for r in results if r.metric_type == "acc_norm")
    assert arc.metric_name == "acc_norm (0-shot, first 100 examples)" and arc.source_name.endswith("0.4.13")
    assert eval_results_to_model_index(name, results) == meta["model-index"]

    # strict parsing (errors not ignored), a save/load round trip, and the Hub-style YAML checks
    ModelCardData(**meta)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == SMOL and loaded.data.get("base_model_relation") == "finetune"
    assert loaded.data.eval_results[0].metric_value == 31.2 and str(loaded) == text
    assert check_card(text) == ([], [])


def test_nonuniform_card_body(nonuniform):
    text = str(build_model_card(nonuniform, repo_id="alice/tiny-ft"))
    pj = json.loads((nonuniform / "pruning.json").read_text())
    p = pj["params"]
    assert CARD_MARKER in text
    assert f"| decoder-layer linear | {p['linear_before']:,} | {p['linear_after']:,} | {p['sparsity']:.2%} |" in text
    assert f"| all parameters | {p['total_before']:,} | {p['total_after']:,} | {p['total_sparsity']:.2%} |" in text
    assert "| 0 | removed | 96 → 96 |" in text and "| 1 | 4 / 2 → 1 / 1 | 96 → 48 |" in text
    assert "| 2 | 4 / 2 → 4 / 2 | removed |" in text
    assert "attention sublayer removed in layers: 0" in text and "FFN sublayer removed in layers: 2" in text
    assert "| 1 | 0 | attn | 0.0125 | yes |" in text and "| 3 | 1 | mlp | 0.5 | no |" in text  # removal order
    assert "| python-docs | test | 256 | 32 | 31.200 | 24.100 |" in text
    assert "| arc_easy | acc_norm | 0 | 100 | 0.5100 ± 0.050 | 0.6000 | 85.0 | acc 0.5000 |" in text
    assert "| **average** |" in text and "| 1.31× | 1.22× | 1.45× | 21.0% |" in text
    assert "| 1 | pruned | 10 ± 0.4 | 80 ± 2 | 3.0 MiB | 1.0 MiB |" in text and "![report.png](report.png)" in text
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-ft", trust_remote_code=True)' in text
    assert "import llmprune" in text
    assert f"```bash\n{pj['provenance']['command']}\n```" in text
    assert "llmprune apply --model smollm2-135m --plan pruning.json" in text
    assert "method: finercut\nsparsity: 0.25" in text  # the recipe
    assert "No recovery fine-tuning" in text and "bit-identical" in text  # embedded GGUF-derived base weights
    assert "Not evaluated" not in text and "`apache-2.0`, inherited" in text


def test_uniform_card_without_evaluation(uniform):
    text = str(build_model_card(uniform, repo_id="acme/u"))
    meta = front_matter(text)
    assert meta["base_model"] == "acme/base-model" and "model-index" not in meta
    assert "license" not in meta and "datasets" not in meta and "custom_code" not in meta["tags"]
    assert "**Not evaluated.**" in text and "Not measured" in text and "has **not been evaluated**" in text
    assert "## License\n\nNot determined" in text
    assert "**uniform**" in text and "trust_remote_code" not in text
    assert "`/data/local.txt`" in text  # local calibration text is described, not put into `datasets`
    assert check_card(text) == ([], [])


def test_local_base_model_gets_no_base_model_metadata(tmp_path, tiny_tokenizer):
    base_dir = tmp_path / "my-base"
    base_dir.mkdir()
    (base_dir / "README.md").write_text("---\nlicense: mit\n---\n# my base\n")
    d, _ = uniform_checkpoint(tmp_path / "u", tiny_tokenizer, base=str(base_dir))
    meta = front_matter(str(build_model_card(d)))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["license"] == "mit"  # read from the local base model's card


def test_license_from_the_hf_cache(tmp_path, tiny_tokenizer):
    cache = tmp_path / "hub-cache"
    snap = cache / "models--acme--base-model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: llama3.1\nlicense_link: https://example.org/LICENSE\n---\nhi\n")
    (cache / "models--acme--base-model" / "refs").mkdir()
    (cache / "models--acme--base-model" / "refs" / "main").write_text("abc123")
    info = base_license("acme/base-model", {}, cache_dir=cache)
    assert (info.license, info.link) == ("llama3.1", "https://example.org/LICENSE") and "cached" in info.source
    d, _ = uniform_checkpoint(tmp_path / "u", tiny_tokenizer)
    text = str(build_model_card(d, cache_dir=cache))
    assert front_matter(text)["license"] == "llama3.1" and "Built with Llama" in text
    assert base_license("acme/other", {}, cache_dir=cache).license is None


def test_partial_reports_are_tolerated_and_only_report_json_is_read(nonuniform, tmp_path, tiny_tokenizer):
    (nonuniform / "report.json").write_text(json.dumps({"format": "llmprune.report", "version": 1,
                                                        "speed": {"prefill_speedup": 1.5}, "tasks": {"x": "bad"}}))
    text = str(build_model_card(nonuniform))
    assert "**Not evaluated.**" in text and "| 1.5× | — | — | — |" in text and "model-index" not in text
    (nonuniform / "report.json").write_text("{not json")
    assert "**Not evaluated.**" in str(build_model_card(nonuniform))

    d, _ = uniform_checkpoint(tmp_path / "u", tiny_tokenizer)
    pj = json.loads((d / "pruning.json").read_text())
    pj["results"] = {"report": {"tasks": REPORT["tasks"]}}  # keys of an unreleased version: not read
    (d / "pruning.json").write_text(json.dumps(pj))
    assert "**Not evaluated.**" in str(build_model_card(d))

    (d / "report.json").write_text(json.dumps({"format": "llmprune.report", "version": 1, "baseline": "acme/base-model",
                                               "perplexity": {"python-docs": {"split": "test", "seqlen": 32,
                                                              "n_windows": 4, "pruned": 55.5, "baseline": 44.4}}}))
    text = str(build_model_card(d))
    assert "| python-docs | test | 32 | 4 | 55.500 | 44.400 |" in text
    _, results = model_index_to_eval_results(front_matter(text)["model-index"])
    assert [r.metric_value for r in results] == [55.5]


def test_write_model_card_keeps_a_users_readme(uniform):
    card = build_model_card(uniform)
    assert write_model_card(uniform, card) and CARD_MARKER in (uniform / "README.md").read_text()
    (uniform / "README.md").write_text("# my own card\n")
    assert not write_model_card(uniform, card)
    assert (uniform / "README.md").read_text() == "# my own card\n"
    assert not [p for p in uniform.iterdir() if p.name.startswith(".")]  # no temp file left behind


@pytest.mark.parametrize("bad, error", [
    ("base_model: acme/x\nbase_model_relation: pruned", "base_model_relation"),
    ("base_model: /tmp/local/dir", "base_model"),
    ("license: Apache 2.0", "license"),
    ("model-index:\n- name: x\n  results:\n  - task: {type: t}\n    dataset: {name: d}\n    metrics: []", "parse"),
])
def test_validator_really_checks(bad, error):
    errors, _ = check_card(f"---\n{bad}\n---\n# card\n")
    assert errors and error in " ".join(errors)


def test_card_validate_against_the_fake_hub(nonuniform, monkeypatch):
    """RepoCard.validate() posts to {ENDPOINT}/api/validate-yaml (ENDPOINT is fixed at import: patch it)."""
    hub = FakeHub().start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        card = build_model_card(nonuniform, repo_id="alice/v")
        card.validate()
        card.data["base_model_relation"] = "pruned"
        with pytest.raises(ValueError, match="base_model_relation"):
            card.validate()
        assert [c.path for c in hub.calls] == ["/api/validate-yaml"] * 2
    finally:
        hub.stop()


@pytest.mark.slow
def test_card_of_a_real_smollm2_checkpoint(tmp_path, capsys):
    """The embedded SmolLM2-135M-Instruct, magnitude 20 %: the card names the real base and its license."""
    from llmprune.cli import main

    out = tmp_path / "smol"
    argv = ["--model", "smollm2-135m", "--recipe", "magnitude", "--sparsity", "0.2", "-o", str(out), "-q"]
    assert main(argv) == 0
    assert main(["push", str(out), "alice/smol-20", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == SMOL and meta["license"] == "apache-2.0" and "magnitude" in meta["tags"]
    assert text.count("\n| ") >= 30 + 2  # a row per layer (30) plus the parameter table
    assert "llmprune --model smollm2-135m --recipe magnitude --sparsity 0.2 -o" in text
    assert ("trust_remote_code=True" in text) == (json.loads((out / "config.json").read_text())["model_type"]
                                                  == "llmprune_llama")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "pruning.json"):
        assert f"  {name}\n" in listed
    assert check_card(text) == ([], [])
