"""`edgesvd run --compare-quantized`: every baseline users have without edgesvd is built, scored and
timed with edgesvd's variants; the manifest and the report carry every point; dominance is decided
by size, every measured shape and the score tolerance."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_run import FAST

from edgesvd.cli import main
from edgesvd.exporters.baselines import EDGESVD, Point, dominates, paired_speedup, verdict_lines
from edgesvd.exporters.manifest import check_bundle
from edgesvd.exporters.report_data import read_bundle

ENCODER_BASELINES = ["dense", "dense + ort-opt", "dense int8", "dense + ort-opt + int8"]


def _run(model_dir, tmp_path, *extra):
    r = CliRunner().invoke(main, ["run", str(model_dir), "--method", "whiten", "--out-root", str(tmp_path),
                                  "--compare-quantized", *FAST, *extra])
    assert r.exit_code == 0, r.output
    out = tmp_path / model_dir.name
    return r, out, json.loads((out / "bundle" / "manifest.json").read_text())["baselines"]


def test_compare_quantized_on_an_encoder_builds_scores_and_times_every_baseline(tiny_bert_dir, stsb_file, tmp_path):
    pairs = tmp_path / "sts-dev-200.csv"  # the task score of 6 variants, on 200 pairs to fit CI's time
    pairs.write_text("".join(stsb_file.read_text(encoding="utf-8").splitlines(keepends=True)[:200]), encoding="utf-8")
    r, out, c = _run(tiny_bert_dir, tmp_path / "o", "--eval", str(pairs), "--compare-clock", "cpu")
    labels = [p["label"] for p in c["points"]]
    assert labels[:4] == ENCODER_BASELINES
    assert [p["precision"] for p in c["points"] if p["kind"] == EDGESVD] == ["fp32", "int8"]
    assert c["score_name"] == "stsb_spearman" and "task score" in c["score_source"]
    assert c["shapes"] == ["b1", "b8"] and c["clock"] == "cpu" and c["session"]["intra_op_threads"] == 1
    for p in c["points"]:
        assert p["onnx_bytes"] > 0 and -1 <= p["score"] <= 1
        assert all(p["latency_ms"][s] > 0 and p["speedup"][s][1] <= p["speedup"][s][0] <= p["speedup"][s][2]
                   for s in c["shapes"])
    by = {p["label"]: p for p in c["points"]}
    assert by["dense int8"]["onnx_bytes"] < by["dense"]["onnx_bytes"] / 2.5
    assert by["dense"]["speedup"]["b1"][0] == 1.0
    assert len(c["verdict"]) == 4 and c["load_average"]
    assert "what users already have vs edgesvd" in r.output and "dense + ort-opt + int8" in r.output
    assert not (out / "baselines").exists(), "the variants' ONNX folders are removed after measuring"
    check_bundle(out / "bundle.tar.gz")
    report = read_bundle(out / "bundle")
    assert [p.label for p in report.pareto] == labels and {p.kind for p in report.pareto} == {"baseline", EDGESVD}
    assert report.pareto_verdict == c["verdict"]
    html = (out / "bundle" / "report.html").read_text()
    assert "edgesvd against what users already have" in html and c["verdict"][0] in html


@pytest.mark.parametrize("form", ["plain", "pivoted"])
def test_compare_quantized_on_a_decoder_includes_4bit(tiny_llama_dir, tmp_path, form):
    """Plain factors are compared in 4 bits too; pivoted ones (the decoder default), which 4-bit
    weights break, are not, and the verdict says why."""
    _, _, c = _run(tiny_llama_dir, tmp_path, "--form", form)
    assert [p["label"] for p in c["points"] if p["kind"] == "baseline"] == ["dense", "dense int8", "dense int4"]
    ours = [p["precision"] for p in c["points"] if p["kind"] == EDGESVD]
    assert ours == (["fp32", "int8", "int4"] if form == "plain" else ["fp32", "int8"])
    omitted = [line for line in c["verdict"] if "int4 point" in line]
    assert len(omitted) == (form == "pivoted") and all("--form plain" in line for line in omitted)
    assert c["shapes"] == ["prefill", "decode"] and c["score_name"] == "top1_agreement_vs_dense"
    assert c["points"][0]["score"] == 1.0  # the dense model agrees with itself


def test_compare_quantized_with_a_budget_is_refused_before_any_work(tiny_bert_dir, tmp_path):
    r = CliRunner().invoke(main, ["run", str(tiny_bert_dir), "--budget", "latency_p50=60%", "--compare-quantized",
                                  "--out-root", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 2 and r.output.startswith("error: --compare-quantized")
    assert not (tmp_path / "o").exists()


def _point(label, kind, size, score, b1, b8):
    return Point(label, kind, "int8", [], size, score, {"b1": 1.0, "b8": 1.0}, {"b1": [b1, b1, b1], "b8": [b8, b8, b8]})


def test_dominance_needs_size_every_shape_and_the_score():
    base = _point("dense int8", "baseline", 100, 0.860, 2.0, 2.0)
    assert dominates(_point("a", EDGESVD, 90, 0.857, 2.1, 2.2), base, True, False)
    assert not dominates(_point("larger", EDGESVD, 101, 0.860, 3.0, 3.0), base, True, False)
    assert not dominates(_point("slower at b8", EDGESVD, 90, 0.860, 2.5, 1.9), base, True, False)
    assert not dominates(_point("worse", EDGESVD, 90, 0.854, 3.0, 3.0), base, True, False)
    # Perplexity: lower is better, within 1 %.
    assert dominates(_point("p", EDGESVD, 90, 10.09, 2.1, 2.1), _point("b", "baseline", 100, 10.0, 2, 2), False, True)
    assert not dominates(_point("p", EDGESVD, 90, 10.2, 2.1, 2.1), _point("b", "baseline", 100, 10.0, 2, 2), False, True)
    winner = _point("edgesvd int8", EDGESVD, 90, 0.859, 2.1, 2.1)
    winner.dominates = ["dense int8"]
    assert verdict_lines([base, winner]) == ["edgesvd int8 dominates dense int8"]


def test_paired_speedup_is_the_median_ratio_with_an_interval():
    reference, times = [10.0, 10.0, 12.0, 30.0, 10.0], [5.0, 5.0, 6.0, 10.0, 5.0]
    median, low, high = paired_speedup(reference, times)
    assert median == 2.0 and low <= median <= high


def test_a_reused_export_is_rebuilt_when_its_checkpoint_is_newer(tiny_llama_dir, tmp_path):
    """The benchmarks' `reuse`: an export with the same configuration is kept, unless the checkpoint
    was written again after it (a rebuilt checkpoint under the same folder name)."""
    import os

    from edgesvd import Whiten, compress
    from edgesvd.calibration import CalibrationConfig
    from edgesvd.exporters.baselines import edgesvd_variants
    from edgesvd.loading import resolve_model

    ck = tmp_path / "ck"
    compress(str(tiny_llama_dir), Whiten(keep=0.5), calib=CalibrationConfig("builtin", 4, 16), device="cpu").save(ck)
    family = resolve_model(str(tiny_llama_dir)).family

    def exported_at() -> float:
        (v,) = edgesvd_variants(ck, "k", family, tmp_path / "x", precisions=(None,), reuse=True)
        return (v.onnx_dir / "model.onnx").stat().st_mtime_ns

    first = exported_at()
    assert exported_at() == first  # same checkpoint, same configuration: reused
    later = (ck / "config.json").stat().st_mtime + 5
    os.utime(ck / "config.json", (later, later))
    assert exported_at() != first  # the checkpoint was written again: exported again
