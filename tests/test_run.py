"""`edgesvd run`: the whole job on tiny models, its summary, the default method, refusing existing output."""

from __future__ import annotations

import importlib
import json

from click.testing import CliRunner
from test_export_helpers import run_cfg

from edgesvd.cli import main
from edgesvd.exporters.deploy import run
from edgesvd.exporters.manifest import check_bundle

FAST = ["--calib-samples", "8", "--calib-len", "32", "--runs", "3", "--seq-len", "16", "--quiet", "--device", "cpu"]


def test_run_cli_end_to_end_on_a_decoder(tiny_llama_dir, tmp_path):
    args = ["run", str(tiny_llama_dir), "--method", "whiten", "--out-root", str(tmp_path), *FAST]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / tiny_llama_dir.name
    for sub in ("checkpoint", "onnx", "onnx-dense", "bundle", "bundle.tar.gz", "summary.json"):
        assert (out / sub).exists(), sub
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "whiten" and summary["parity_ok"]
    assert summary["params_compressed"] < summary["params_dense"]
    assert summary["onnx_bytes_compressed"] < summary["onnx_bytes_dense"]
    assert {l["mode"] for l in summary["latency"]} == {"prefill", "decode"}
    for row in ("parameters", "ONNX bytes", "p50 prefill", "p50 decode", "parity", "bundle.tar.gz"):
        assert row in r.output, row
    check_bundle(out / "bundle.tar.gz")
    before = (out / "summary.json").read_text()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--force" in r.output
    assert (out / "summary.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [tiny_llama_dir.name], "no temporary folder may be left"


def test_a_decoder_run_that_quantizes_to_4_bits_factorizes_plain_and_trains_for_the_grid(tiny_llama_dir, tmp_path):
    """Decoders are pivoted by default, but 4-bit weights break pivoted factors (exporters/quantize.py):
    a run with --quantize int4 factorizes plain, and the learned method fine-tunes through the 4-bit grid."""
    layers, grids = {}, {}
    for quantize in (None, "int4"):
        root = tmp_path / str(quantize)
        args = ["run", str(tiny_llama_dir), "--method", "learned", "--keep", "0.6", "--out-root", str(root), *FAST]
        r = CliRunner().invoke(main, args + (["--quantize", quantize] if quantize else []))
        assert r.exit_code == 0, r.output
        record = json.loads((root / tiny_llama_dir.name / "checkpoint" / "config.json").read_text())["edgesvd"]
        layers[quantize] = {bool(l.get("pivoted")) for l in record["layers"] if l.get("rank") is not None}
        grids[quantize] = record["details"]["learned"]["quantize_aware"]
    assert layers == {None: {True}, "int4": {False}}, layers
    assert grids == {None: None, "int4": "int4"}, grids
    # Asking for both is refused before any work.
    r = CliRunner().invoke(main, ["run", str(tiny_llama_dir), "--quantize", "int4", "--form", "pivoted",
                                  "--out-root", str(tmp_path / "both")])
    assert r.exit_code == 2 and r.output.startswith("error: --quantize int4 needs --form plain")
    assert not (tmp_path / "both").exists()


def test_run_reads_the_default_method_at_call_time(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.import_module("edgesvd.exporters.deploy"), "DEFAULT_METHOD", "plain")
    summary = run(run_cfg(tiny_bert_dir, tmp_path, runs=2, warmup=0, seq_len=16, device="cpu")).summary
    assert summary.method == "plain"
    record = json.loads((summary.out / "checkpoint" / "config.json").read_text())["edgesvd"]
    assert record["method"] == "plain"
    manifest = json.loads((summary.bundle / "manifest.json").read_text())
    assert manifest["compression"]["method"] == "plain" and manifest["parity"]["ok"]
    assert summary.latency[0]["mode"] == "forward"


def test_run_bad_model_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["run", str(tmp_path / "missing"), "--out-root", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: model path does not exist")
    assert not (tmp_path / "o").exists()


def test_budget_run_refuses_a_method_it_cannot_plan_with(tiny_bert_dir, tmp_path):
    r = CliRunner().invoke(main, ["run", str(tiny_bert_dir), "--profile", "host", "--method", "asvd",
                                  "--out-root", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2 and r.output.strip() == "error: --profile plans with method learned or whiten, not 'asvd'"
    assert not (tmp_path / "o").exists()


def test_run_eval_scores_dense_and_compressed_into_summary_and_manifest(tiny_llama_dir, prose_file, tmp_path):
    from edgesvd.checkpoint import load_compressed
    from edgesvd.evaluate import perplexity
    from edgesvd.loading import load_tokenizer

    args = ["run", str(tiny_llama_dir), "--method", "whiten", "--out-root", str(tmp_path), "--eval",
            str(prose_file), *FAST]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / tiny_llama_dir.name
    q = json.loads((out / "bundle" / "manifest.json").read_text())["quality"]["perplexity"]
    assert json.loads((out / "summary.json").read_text())["quality"]["perplexity"] == q
    model, _ = load_compressed(out / "checkpoint")  # the recorded score is this model's, recomputed
    assert q["compressed"] == round(perplexity(model, load_tokenizer(out / "checkpoint"), prose_file), 4)
    assert q["dense"] != q["compressed"] and q["dense"] > 1 and "perplexity" in r.output


def test_run_eval_missing_file_is_one_line(tiny_llama_dir, tmp_path):
    r = CliRunner().invoke(main, ["run", str(tiny_llama_dir), "--eval", str(tmp_path / "none.csv"),
                                  "--out-root", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2 and r.output.strip() == f"error: --eval file does not exist: {tmp_path / 'none.csv'}"
    assert not (tmp_path / "o").exists()


def test_host_gpu_profile_without_a_gpu_is_one_line_before_any_work(tiny_bert_dir, tmp_path):
    from edgesvd.exporters.providers import cuda_status

    if cuda_status()[0]:
        import pytest

        pytest.skip("a GPU works here: the no-GPU message cannot be exercised")
    for args in (["run", str(tiny_bert_dir), "--profile", "host-gpu", "--out-root", str(tmp_path / "o"), "--quiet"],
                 ["plan", str(tiny_bert_dir), "--profile", "host-gpu", "--quiet"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: profile host-gpu measures this machine's GPU") and r.output.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_run_eval_file_of_the_wrong_kind_fails_before_any_work(tiny_bert_dir, prose_file, tmp_path):
    for extra in ([], ["--profile", "host"]):  # an encoder needs STS-B pairs, not prose
        r = CliRunner().invoke(main, ["run", str(tiny_bert_dir), "--eval", str(prose_file),
                                      "--out-root", str(tmp_path / "o"), *FAST, *extra])
        assert r.exit_code == 2 and r.output.startswith(f"error: no scored sentence pairs in {prose_file}")
        assert r.output.count("\n") == 1 and not (tmp_path / "o").exists()
