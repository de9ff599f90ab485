"""The README: its Python example runs (on a tiny model instead of SmolLM2), its links resolve, it stays short."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "the Python API section has no python block"
    return m.group(1)


@pytest.mark.parametrize("family_name", ["llama"])
def test_readme_python_example_runs(model_dir, tmp_path, capsys, monkeypatch):
    code = python_example()
    out = tmp_path / "pruned"
    # the same code, pointed at a tiny model and a temporary output folder; every substitution must
    # apply, so renaming the model or the folder in the README without updating this test fails here
    for old, new in (('"smollm2-135m"', repr(str(model_dir))), ('"out/smol-flap-20"', repr(str(out)))):
        assert old in code, f"README example no longer contains {old}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert (out / "pruning.json").is_file() and (out / "config.json").is_file()
    assert 1 < namespace["ppl"].perplexity < float("inf")
    assert namespace["plan"].sparsity() == pytest.approx(0.2, abs=0.02)
    assert "linear params" in printed and "perplexity" in printed


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len({link for link in local if link.startswith("docs/")}) >= 3
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
