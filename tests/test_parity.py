"""Parity of exported ONNX against the compressed PyTorch model: real sessions, real failures."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_export_helpers import FAMILIES, checkpoint, exported, work_root

from edgesvd.cli import main
from edgesvd.errors import ParityError
from edgesvd.exporters.parity import THRESHOLDS, ParityConfig, verify
from edgesvd.exporters.providers import CPU, CUDA, cuda_status
from edgesvd.families import DECODER


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


@pytest.mark.parametrize("family_fixture", FAMILIES)
def test_parity_passes_on_every_family(family_fixture, request, root):
    ck = checkpoint(request.getfixturevalue(family_fixture), root)
    report = verify(ck, exported(ck, root), ParityConfig(batch=2, seq_len=24, new_tokens=6))
    cpu = next(r for r in report.results if r.provider == CPU)
    assert report.ok and cpu.status == "passed"
    assert all(m.cosine > 0.99999 and m.max_rel < 1e-3 for m in cpu.outputs.values())
    if report.family == DECODER.name:
        assert cpu.top1 >= 0.98 and cpu.generation == 1.0 and len(cpu.generated["onnx"]) > 0
    else:
        assert cpu.embedding_cosine > 0.99999
    cuda = next(r for r in report.results if r.provider == CUDA)
    if not cuda_status()[0]:
        assert cuda.status == "skipped" and cuda.reason


def test_parity_on_real_models(minilm_dir, stories_dir, root):
    for model_dir in (minilm_dir, stories_dir):
        ck = checkpoint(model_dir, root)
        report = verify(ck, exported(ck, root, pooled=model_dir == minilm_dir), ParityConfig(eps=(CPU,)))
        assert report.ok, report.to_json()
        if model_dir == minilm_dir:
            assert "sentence_embedding" in report.results[0].outputs


def test_fp16_and_int8_use_their_thresholds(tiny_bert_dir, root):
    ck = checkpoint(tiny_bert_dir, root)
    for dtype, quantize in (("fp16", None), ("fp32", "int8")):
        report = verify(ck, exported(ck, root, dtype=dtype, quantize=quantize, pooled=True), ParityConfig(eps=(CPU,)))
        assert report.precision == (quantize or dtype)
        assert report.thresholds == THRESHOLDS[report.precision]
        assert report.ok, report.to_json()
        # Lower precision must actually differ from PyTorch (else the export silently stayed fp32).
        assert report.results[0].outputs["last_hidden_state"].max_abs > 1e-5


def _perturbed(ck, dest):
    """A copy of the checkpoint whose first factor is scaled: the ONNX no longer matches it."""
    shutil.copytree(ck, dest)
    state = load_file(str(dest / "model.safetensors"))
    key = next(k for k in state if k.endswith(".a.weight"))
    state[key] = state[key] * 1.5
    save_file(state, str(dest / "model.safetensors"))
    return dest


def test_parity_failure_raises_and_cli_exits_1(tiny_llama_dir, root, tmp_path):
    ck = checkpoint(tiny_llama_dir, root)
    onnx_dir = exported(ck, root)
    bad = _perturbed(ck, tmp_path / "perturbed")
    with pytest.raises(ParityError) as info:
        verify(bad, onnx_dir, ParityConfig(batch=2, seq_len=16, new_tokens=4, eps=(CPU,)))
    assert not info.value.report.ok and info.value.report.results[0].failures
    out_json = tmp_path / "parity.json"
    r = CliRunner().invoke(main, ["verify", str(bad), str(onnx_dir), "--ep", "cpu", "--batch", "2", "--seq-len", "16",
                                  "--new-tokens", "4", "--json", str(out_json)])
    assert r.exit_code == 1
    assert "FAIL" in r.output and "error: parity failed" in r.output and "Traceback" not in r.output
    assert json.loads(out_json.read_text())["ok"] is False


def test_cli_verify_table_and_cuda_without_gpu(tiny_bert_dir, root, tmp_path):
    ck = checkpoint(tiny_bert_dir, root)
    onnx_dir = exported(ck, root)
    r = CliRunner().invoke(main, ["verify", str(ck), str(onnx_dir), "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "passed" in r.output and "embedding cosine" in r.output
    if cuda_status()[0]:
        pytest.skip("a GPU is present: the no-GPU paths cannot be exercised here")
    assert "skipped" in r.output
    r = CliRunner().invoke(main, ["verify", str(ck), str(onnx_dir), "--ep", "cuda"])
    assert r.exit_code == 2 and "CUDA execution provider was asked for" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, ["verify", str(ck), str(onnx_dir), "--ep", "cuda", "--allow-cpu-fallback"])
    assert r.exit_code == 0 and "CPU" in r.output


def test_verify_refuses_a_folder_that_is_not_an_export(tiny_bert_dir, root, tmp_path):
    ck = checkpoint(tiny_bert_dir, root)
    r = CliRunner().invoke(main, ["verify", str(ck), str(tmp_path)])
    assert r.exit_code == 2 and "no model.onnx" in r.output
