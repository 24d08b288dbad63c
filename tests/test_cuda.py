"""The CUDA paths, where a GPU works: learned compression on the GPU (alone and in a budget run),
parity and IOBinding latency on onnxruntime's CUDA execution provider, fp16 on the GPU, the pivoted
form's row choice on the GPU.

Skipped, with the reason, on machines without a usable NVIDIA GPU (this project's CI). On a GPU
machine: `python -m pytest tests/test_cuda.py -v` (samples/check_cuda.sh runs it with a MiniLM
latency comparison on the CUDA EP).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_export_helpers import checkpoint, exported, exported_dense, run_cfg, run_profiles, work_root

from edgesvd import CalibrationConfig, Learned, compress, load_compressed, save_compressed
from edgesvd.exporters.export import ExportConfig, export_checkpoint
from edgesvd.exporters.parity import ParityConfig, verify
from edgesvd.exporters.profiling import ProfileConfig, profile
from edgesvd.exporters.providers import CUDA, cuda_status

_ORT_OK, _ORT_WHY = cuda_status()
pytestmark = pytest.mark.skipif(not (_ORT_OK and torch.cuda.is_available()),
                                reason="CUDA paths need a usable NVIDIA GPU: "
                                       + (_ORT_WHY if not _ORT_OK else "torch sees no CUDA device"))
FAST = Learned(steps=6, finetune_steps=4, batch_size=4)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


def test_learned_compression_runs_on_the_gpu_and_reloads_on_the_cpu(tiny_llama_dir, tmp_path):
    result = compress(str(tiny_llama_dir), replace(FAST, keep=0.5, rank_multiple=1),
                      calib=CalibrationConfig("builtin", 8, 32, 0), device="cuda")
    assert result.record.details["device"].startswith("cuda")
    assert abs(result.record.keep_actual / 0.5 - 1) <= 0.01
    assert next(result.model.parameters()).device.type == "cpu"  # returned on the CPU, ready to save
    save_compressed(result.model, result.tokenizer, result.record, tmp_path / "ck", result.spectra)
    loaded, _ = load_compressed(tmp_path / "ck")
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.parametrize("family_fixture", ["tiny_llama_dir", "tiny_bert_dir"])
def test_parity_passes_on_the_cuda_ep(family_fixture, request, root):
    ck = checkpoint(request.getfixturevalue(family_fixture), root)
    report = verify(ck, exported(ck, root), ParityConfig(batch=2, seq_len=16, new_tokens=4, eps=(CUDA,)))
    [result] = report.results
    assert result.provider == CUDA and result.status == "passed", result.failures


def test_fp16_export_passes_parity_on_the_cuda_ep(tiny_bert_dir, root, tmp_path):
    ck = checkpoint(tiny_bert_dir, root)
    export_checkpoint(ck, tmp_path / "fp16", ExportConfig(dtype="fp16"))
    report = verify(ck, tmp_path / "fp16", ParityConfig(batch=2, seq_len=16, eps=(CUDA,)))
    assert report.ok and report.results[0].status == "passed"


def test_profile_on_the_cuda_ep_with_iobinding(tiny_llama_dir, root):
    ck = checkpoint(tiny_llama_dir, root)
    report = profile(exported(ck, root), exported_dense(tiny_llama_dir, root),
                     ProfileConfig(seq_len=16, warmup=2, runs=5, eps=(CUDA,)))
    assert {m.provider for m in report.measurements} == {CUDA}
    for m in report.measurements:
        assert {"prefill", "decode"} <= set(m.modes) and all(s["p50_ms"] > 0 for s in m.modes.values())
    assert report.comparisons and all(c["provider"] == CUDA for c in report.comparisons)


def test_budget_run_learns_importance_on_the_gpu(tiny_llama_dir, tmp_path, monkeypatch):
    """One learning pass on the GPU, finished per plan on GPU copies, exported and measured on the CPU."""
    from edgesvd.profiles import load_profile

    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path / "cache"))
    budgets = {"model_bytes": "97%", "latency_p50": "none", "peak_memory": "none"}
    host = load_profile("host").with_workload(prompt_length=16, new_tokens=4).with_budgets(budgets)
    pi = load_profile("raspberry-pi-5").with_budgets(budgets)
    cfg = run_cfg(tiny_llama_dir, tmp_path / "out", runs=3, warmup=1, device="cuda", method=FAST)
    results = run_profiles(cfg, [host, pi], max_plans=2)
    for r in results:
        manifest = json.loads((r.bundle / "manifest.json").read_text())
        assert manifest["compression"]["method"] == "learned" and r.parity_ok
        assert r.values["model_bytes"] <= r.limits["model_bytes"]


def test_closed_loop_measures_on_this_gpu(tiny_bert_dir, tmp_path, monkeypatch):
    """`run --profile host-gpu`: plans timed with onnxruntime on the CUDA EP (IOBinding), exported
    in fp16, measured beside the fp16 dense model on the GPU, and labelled measured."""
    from edgesvd.profiles import load_profile

    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path / "cache"))
    gpu = load_profile("host-gpu").with_workload(batch=2, sequence_length=32).with_budgets(
        {"model_bytes": "99%", "latency_p50": "400%"})
    assert gpu.device.cores and gpu.device.peak_gflops > 0  # read from this GPU
    cfg = run_cfg(tiny_bert_dir, tmp_path / "out", runs=5, warmup=2, method=FAST)
    [result] = run_profiles(cfg, [gpu], max_plans=2)
    assert result.measured and result.latency_source == "measured"
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert manifest["budgets"]["values_are"].startswith("measured on this machine (peak memory estimated")
    assert manifest["budgets"]["execution_provider"] == CUDA and manifest["budgets"]["precision"] == "fp16"
    assert result.values["latency_p50"] <= result.limits["latency_p50"]
    assert (tmp_path / "out" / tiny_bert_dir.name / "host-gpu").is_dir()


def test_streamed_compression_on_the_gpu_matches_the_cpu(tiny_qwen2_dir):
    """Block-streamed whiten with blocks, activations and statistics on the GPU: the model comes back on
    the CPU and agrees with the CPU-streamed one (float tolerance: other kernels)."""
    from edgesvd.calibration import CalibrationConfig as Cal
    from edgesvd.methods import Whiten

    calib = Cal("builtin", 16, 32, 0)
    gpu = compress(str(tiny_qwen2_dir), Whiten(keep=0.5), calib=calib, device="cuda", stream="on")
    cpu = compress(str(tiny_qwen2_dir), Whiten(keep=0.5), calib=calib, device="cpu", stream="on")
    assert gpu.record.details["device"].startswith("cuda") and gpu.record.details["streamed"]
    assert next(gpu.model.parameters()).device.type == "cpu"
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gpu.model(input_ids=ids).logits, cpu.model(input_ids=ids).logits,
                                   rtol=1e-3, atol=1e-3)


def test_streamed_learned_runs_on_the_gpu_and_returns_a_cpu_model(tiny_qwen2_dir):
    """The three sweeps and the end-to-end stage with blocks, streams and factors on the GPU: the model
    comes back on the CPU, at the budget, with the same rank choice as the CPU run (the Fisher sums
    differ only by kernel rounding)."""
    from edgesvd.calibration import CalibrationConfig as Cal
    from edgesvd.methods import Learned

    calib = Cal("builtin", 16, 32, 0)
    gpu = compress(str(tiny_qwen2_dir), Learned(keep=0.5, finetune_steps=3), calib=calib, device="cuda", stream="on")
    cpu = compress(str(tiny_qwen2_dir), Learned(keep=0.5, finetune_steps=3), calib=calib, device="cpu", stream="on")
    assert gpu.record.details["device"].startswith("cuda") and gpu.record.details["end_to_end"]["ran"]
    assert next(gpu.model.parameters()).device.type == "cpu"
    assert gpu.record.keep_actual <= 0.5 + 1e-9
    assert [l.rank for l in gpu.record.layers] == [l.rank for l in cpu.record.layers]


def test_pivot_rows_are_chosen_on_the_gpu():
    """The pivoted form's row choice (LU, then maxvol swaps) runs where the factors are, and reaches
    the same bound on the combination weights there as on the CPU."""
    from edgesvd.factorize import MAXVOL_TOLERANCE, pivot_rows

    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(2048, 400, dtype=torch.float64)).Q.cuda()
    order = pivot_rows(q)
    assert order.device.type == "cuda" and sorted(order.tolist()) == list(range(2048))
    c = torch.linalg.solve(q[order[:400]], q, left=False)
    assert float(c.abs().max()) <= MAXVOL_TOLERANCE + 1e-6
