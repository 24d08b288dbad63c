"""The bundle's HTML report: built by pack from a real tiny-model bundle, self-contained, and checked
in headless Chromium (console errors, network requests, image decoding, budgets in the summary)."""

from __future__ import annotations

import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgesvd.calibration import CalibrationConfig
from edgesvd.checkpoint import save_compressed
from edgesvd.cli import main
from edgesvd.compression import compress
from edgesvd.exporters.bundle import pack
from edgesvd.exporters.export import ExportConfig, export_checkpoint, export_dense
from edgesvd.exporters.manifest import check_bundle
from edgesvd.exporters.parity import ParityConfig, verify
from edgesvd.exporters.profiling import ProfileConfig, profile
from edgesvd.exporters.providers import CPU
from edgesvd.exporters.report import REPORT_FILE
from edgesvd.exporters.report_data import read_bundle
from edgesvd.methods import Learned, method_config
from edgesvd.units import fmt_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
import report_screenshot  # noqa: E402  (the sample's browser helpers, so the test drives what the sample does)

CALIB = CalibrationConfig(("builtin",), 8, 32, 0)


def _bundle(model_dir: Path, root: Path, name: str, method: str, keep: float, with_profile: bool) -> Path:
    """compress → save → export → verify → (profile dense vs compressed) → pack, all real."""
    # learned: a few steps; the report needs learned scores, not a good model
    config = (Learned(keep=keep, steps=8, finetune_steps=4, batch_size=4) if method == "learned"
              else method_config(method, keep=keep))
    result = compress(str(model_dir), config, calib=CALIB)
    save_compressed(result.model, result.tokenizer, result.record, root / f"{name}-ck", result.spectra)
    export_checkpoint(root / f"{name}-ck", root / f"{name}-onnx", ExportConfig())
    parity = verify(root / f"{name}-ck", root / f"{name}-onnx", ParityConfig(batch=2, seq_len=16, eps=(CPU,)))
    prof = None
    if with_profile:
        export_dense(str(model_dir), root / f"{name}-dense", ExportConfig())
        prof = profile(root / f"{name}-onnx", root / f"{name}-dense",
                       ProfileConfig(seq_len=16, warmup=1, runs=3)).to_json()
    return pack(root / f"{name}-onnx", root / f"{name}-ck", root / name, parity.to_json(), prof)


def _budget_run(model_dir: Path, root: Path) -> dict[str, Path]:
    """`edgesvd run --profile host --profile raspberry-pi-5` as a function: one importance pass, one
    bundle per device whose manifest carries budgets, receipt and (host) measured values."""
    from test_export_helpers import run_profiles

    from edgesvd.exporters.deploy import DeployConfig, RunConfig
    from edgesvd.profiles import load_profile

    loose = {"model_bytes": "20 MB", "peak_memory": "none", "latency_p50": "none", "latency_p90": "none"}
    profiles = [load_profile("host").with_budgets(loose).with_workload(sequence_length=16),
                load_profile("raspberry-pi-5").with_budgets(loose)]
    cfg = RunConfig(model=str(model_dir), calibration=CALIB, out_root=root / "runs",
                    deploy=DeployConfig(runs=3, warmup=1))
    return {r.profile: r.bundle for r in run_profiles(cfg, profiles, max_plans=1)}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_bert_dir):
    from edgesvd.methods import DEFAULT_METHOD

    root = tmp_path_factory.mktemp("report")
    plain = _bundle(tiny_bert_dir, root, "default", DEFAULT_METHOD, 0.5, with_profile=True)
    return {"default": plain, **_budget_run(tiny_bert_dir, root)}


def _images(page: str) -> list[str]:
    return re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)


def test_pack_writes_a_self_contained_report(bundles):
    bundle = bundles["default"]
    page = (bundle / REPORT_FILE).read_text()
    manifest = check_bundle(bundle)  # report.html and the spectrum are listed with their sha256
    assert REPORT_FILE in manifest["files"] and "reports/spectrum.safetensors" in manifest["files"]
    with tarfile.open(bundle.with_name(bundle.name + ".tar.gz")) as tar:
        assert f"{bundle.name}/{REPORT_FILE}" in tar.getnames()
    # Nothing that could reach the network: no scripts, no stylesheets or fonts by link, no URLs.
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "url(" not in page
    images = _images(page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    # Per-layer chart, spectrum chart and latency chart, with the table beneath built from the bundle.
    for section in ("summary", "layers", "spectrum", "latency", "quality", "pareto"):
        assert f'id="{section}"' in page
    inputs = read_bundle(bundle)
    assert len(inputs.layers) == 12 and inputs.spectra  # 2 BERT blocks × 6 Linear layers
    for row in inputs.latency:
        assert f"{row.p50_ms:.2f}" in page
    # No budgets and a single variant: said plainly, nothing invented.
    assert "No budgets" in page and "Not applicable" in page


def test_spectrum_shows_learned_scores_or_says_there_are_none(bundles):
    inputs = read_bundle(bundles["default"])
    page = (bundles["default"] / REPORT_FILE).read_text()
    assert inputs.spectra
    if inputs.method == "learned":
        assert all(s.scores is not None for s in inputs.spectra) and "learned importance score" in page
    else:
        assert all(s.scores is None for s in inputs.spectra) and "learns no importance scores" in page
    # Kept marks agree with the ranks of the checkpoint.
    for spec in inputs.spectra:
        rank = next(l.rank for l in inputs.layers if l.name == spec.name)
        assert int(spec.kept.sum()) == (len(spec.sigma) if rank is None else rank)


def test_budgets_measured_on_the_host_are_in_the_summary(bundles):
    page = (bundles["host"] / REPORT_FILE).read_text()
    inputs = read_bundle(bundles["host"])
    manifest = check_bundle(bundles["host"])
    assert [b.key for b in inputs.budgets] == ["model_bytes"] == list(manifest["budgets"]["limits"])
    budget = inputs.budgets[0]
    assert budget.measured == manifest["budgets"]["values"]["model_bytes"]
    assert budget.verdict == ("pass" if budget.measured <= budget.limit else "fail")
    summary = page.split('id="layers"')[0]
    assert "model bytes" in summary and "20.00 MB" in summary and fmt_bytes(budget.measured) in summary
    assert "host" in summary and f">{budget.verdict.upper()}<" in summary
    # The planner's latency is an estimate and is labelled so, beside the measured rows.
    assert any(r.source.startswith("estimated") for r in inputs.latency)
    assert any(r.source == "measured" and r.model == "dense" for r in inputs.latency)
    assert any(q.kind.startswith("quality proxy") for q in inputs.quality)


def test_device_not_at_hand_is_estimated_not_measured(bundles):
    inputs = read_bundle(bundles["raspberry-pi-5"])
    assert inputs.budgets and all(b.measured is None and b.verdict.startswith("estimated") for b in inputs.budgets)
    assert not any(r.source == "measured" for r in inputs.latency)
    assert "ESTIMATED PASS" in (bundles["raspberry-pi-5"] / REPORT_FILE).read_text()


def test_several_devices_draw_the_tradeoff(bundles, tmp_path):
    # The run's comparison.json (two devices) gives the Pareto chart without asking.
    page = (bundles["host"] / REPORT_FILE).read_text()
    assert len(read_bundle(bundles["host"]).pareto) == 2
    pareto = page.split('id="pareto"')[1]
    assert "Not applicable" not in pareto and len(_images(pareto)) == 1
    # A bundle moved away from its run: the other device is named with --compare.
    alone = tmp_path / "alone"
    shutil.copytree(bundles["host"], alone)
    result = CliRunner().invoke(main, ["report", str(alone)])
    assert result.exit_code == 0, result.output
    assert "Not applicable" in (alone / REPORT_FILE).read_text().split('id="pareto"')[1]
    result = CliRunner().invoke(main, ["report", str(alone), "--compare", str(bundles["raspberry-pi-5"])])
    assert result.exit_code == 0 and "wrote" in result.output
    assert len(_images((alone / REPORT_FILE).read_text().split('id="pareto"')[1])) == 1
    check_bundle(alone)  # the manifest's file table followed the rewritten report
    # A variant with no quality measured against the dense model: no chart, and the reason.
    result = CliRunner().invoke(main, ["report", str(alone), "--compare", str(bundles["default"])])
    assert result.exit_code == 0, result.output
    assert "no quality against the dense model" in (alone / REPORT_FILE).read_text()


def test_run_writes_the_report_and_says_where(tiny_bert_dir, tmp_path):
    result = CliRunner().invoke(main, ["run", str(tiny_bert_dir), "--method", "whiten", "--calib-samples", "8",
                                       "--calib-len", "32", "--runs", "2", "--seq-len", "16", "--quiet",
                                       "--out-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("report: "))
    page = Path(line.removeprefix("report: ").strip())
    assert page.is_file() and page.parent.name == "bundle" and 'id="summary"' in page.read_text()


def test_report_command_bad_input(tmp_path):
    """A missing bundle, and a folder that is not one: bad input, one line, exit 2."""
    (tmp_path / "empty").mkdir()
    for target, needle in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "manifest.json")):
        result = CliRunner().invoke(main, ["report", str(target)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and needle in result.output
        assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def browser():
    reason = report_screenshot.chromium_available()
    if reason:
        pytest.skip(f"headless Chromium unavailable: {reason} (CI installs it)")
    with tempfile.TemporaryDirectory(prefix="edgesvd-chromium-") as profile_dir:
        driver = report_screenshot.open_browser(profile_dir)
        try:
            yield driver
        finally:
            driver.quit()


def _foreign(seen: dict, page: Path) -> list[str]:
    return [u for u in seen["requests"] if u != page.resolve().as_uri() and not u.startswith("data:")]


def test_report_renders_in_headless_chromium(bundles, browser, tmp_path):
    page = bundles["host"] / REPORT_FILE
    seen = report_screenshot.load_page(browser, page)
    assert [m for m in seen["console"] if m["level"] in ("SEVERE", "WARNING")] == []
    assert _foreign(seen, page) == []
    assert len(seen["images"]) >= 3 and all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in seen["images"])
    text = seen["text"]
    assert "Budgets vs measured" in text and "model bytes" in text and "20.00 MB" in text
    # The checks can fail: a page that reaches for the network is caught by the same helpers.
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png">'
                   "<script>console.error('broken')</script></body></html>")
    seen = report_screenshot.load_page(browser, bad)
    assert "http://127.0.0.1:9/x.png" in _foreign(seen, bad)
    assert any("broken" in m["message"] for m in seen["console"])
    assert seen["images"][0]["w"] == 0
