"""The README's Python snippets run, in order, in one namespace, as a user would paste them.

On one random-init block of MiniLM's shapes (with a small real BPE vocabulary) in place of
`minilm`, so the whole README fits in CI's time: the calls, their arguments and the files they
write are the README's.
Set EDGESVD_README_MODEL=minilm to run them verbatim (a few minutes on 2 cores).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def minilm_block(tmp_path_factory, bpe_tokenizer) -> Path:
    """One block of MiniLM's shapes (hidden 384, MLP 1536, 12 heads) with a 512-token vocabulary, so
    the blocks hold most of its bytes as MiniLM's six do: the README's budgets stay meetable at a
    fraction of MiniLM's cost."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=bpe_tokenizer.vocab_size, hidden_size=384, intermediate_size=1536,
                     num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("minilm-block")
    BertModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    bpe_tokenizer.save_pretrained(path)
    return path


def test_the_readme_python_snippets_run(tmp_path, monkeypatch, minilm_block):
    from edgesvd.calibration import builtin_documents

    model = os.environ.get("EDGESVD_README_MODEL", str(minilm_block))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 5, "the README shows a Python form beside its commands"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path / "cache"))
    # "texts.txt" in the snippets is the user's own calibration text: real prose here.
    Path("texts.txt").write_text("\n\n".join(builtin_documents()[:300]) + "\n", encoding="utf-8")
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        code = code.replace('"minilm"', repr(model))
        start = time.perf_counter()
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
        print(f"README python block {i + 1}: {time.perf_counter() - start:.1f} s")
    name = Path(model).name
    assert os.path.isfile("out/raspberry-pi-5/bundle/manifest.json")
    assert os.path.isfile("out/jetson-orin-nano/bundle/report.html")
    assert os.path.isfile("ck/model.safetensors") and os.path.isfile("bundle.tar.gz")
    assert os.path.isfile(f"runs/{name}/bundle/manifest.json")
