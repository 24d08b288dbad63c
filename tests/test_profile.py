"""onnxruntime profiling: dense vs compressed side by side, decoder prefill/decode, FLOP ratio, EP errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_export_helpers import checkpoint, exported, exported_dense, work_root

from edgesvd.checkpoint import read_record
from edgesvd.cli import main
from edgesvd.exporters.profiling import ProfileConfig, graph_flops, profile
from edgesvd.exporters.providers import CPU, SessionConfig, cuda_status

FEW = dict(batch=1, seq_len=16, warmup=1, runs=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


def test_decoder_prefill_and_decode_side_by_side(tiny_llama_dir, root):
    ck = checkpoint(tiny_llama_dir, root)
    report = profile(exported(ck, root), exported_dense(tiny_llama_dir, root),
                     ProfileConfig(**FEW, session=SessionConfig(intra_op_threads=1)))
    assert {m.model for m in report.measurements} == {"dense", "compressed"}
    for m in report.measurements:
        assert set(m.modes) == {"prefill", "decode"}
        for s in m.modes.values():
            assert s["runs"] == 3 and 0 < s["p50_ms"] <= s["p99_ms"] and s["throughput_per_s"] > 0
        assert m.session_create_s > 0 and m.peak_rss_mb > 0 and m.provider == CPU
    comp = {c["mode"]: c for c in report.comparisons}
    assert set(comp) == {"prefill", "decode"}
    # keep 0.5 on the block Linears: the graph's FLOPs must shrink, but not below the untouched parts.
    assert 0.4 < comp["prefill"]["flop_ratio"] < 1.0
    assert comp["prefill"]["speedup"] == pytest.approx(comp["prefill"]["dense_p50_ms"] / comp["prefill"]["compressed_p50_ms"])
    assert report.config["session"]["intra_op_threads"] == 1


def test_flops_follow_keep_on_minilm(minilm_dir, root):
    ck = checkpoint(minilm_dir, root)
    _, record = read_record(ck)
    dense = graph_flops(exported_dense(minilm_dir, root), 128)
    comp = graph_flops(exported(ck, root, pooled=True), 128)
    assert comp["attention_per_token"] == dense["attention_per_token"]
    assert comp["linear_per_token"] / dense["linear_per_token"] == pytest.approx(record.keep_actual, rel=1e-6)


def test_encoder_profile_per_node_and_cli_json(tiny_bert_dir, root, tmp_path):
    ck = checkpoint(tiny_bert_dir, root)
    out = tmp_path / "prof.json"
    r = CliRunner().invoke(main, ["profile", str(exported(ck, root)), "--dense", str(exported_dense(tiny_bert_dir, root)),
                                  "--seq-len", "16", "--runs", "3", "--warmup", "1", "--per-node", "--ep", "cpu",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "dense → compressed" in r.output and "per-layer kernel time" in r.output and "layer.1" in r.output
    data = json.loads(out.read_text())
    comp = next(m for m in data["measurements"] if m["model"] == "compressed")
    assert "forward" in comp["modes"] and {"layer.0", "layer.1"} <= set(comp["per_layer_ms"])
    assert data["comparisons"][0]["flop_bound_speedup"] > 1


def test_profile_exports_the_dense_baseline_itself(tiny_gpt2_dir, root):
    ck = checkpoint(tiny_gpt2_dir, root)
    r = CliRunner().invoke(main, ["profile", str(exported(ck, root)), "--seq-len", "8", "--runs", "2",
                                  "--warmup", "0", "--ep", "cpu"])
    assert r.exit_code == 0, r.output
    assert "exporting the dense baseline" in r.output and "decode" in r.output and "dense → compressed" in r.output


def test_cuda_ep_without_gpu_is_one_line_error(tiny_bert_dir, root):
    if cuda_status()[0]:
        pytest.skip("a GPU is present")
    ck = checkpoint(tiny_bert_dir, root)
    args = ["profile", str(exported(ck, root)), "--no-dense", "--seq-len", "8", "--runs", "2", "--warmup", "0", "--ep", "cuda"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output.startswith("error: the CUDA execution provider was asked for")
    assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(main, args + ["--allow-cpu-fallback"])
    assert r.exit_code == 0 and "CPU" in r.output


def test_paired_latency_interleaves_dense_and_compressed(tiny_llama_dir, root):
    from edgesvd.exporters.profiling import paired_latency

    ck = checkpoint(tiny_llama_dir, root)
    pair = paired_latency(exported_dense(tiny_llama_dir, root), exported(ck, root), ProfileConfig(**FEW))
    assert set(pair) == {"prefill", "decode"}
    for pl in pair.values():  # one pair per run: dense and compressed timed back to back
        assert pl.pairs == 3 and len(pl.compressed_ms) == 3 and all(t > 0 for t in pl.dense_ms + pl.compressed_ms)
