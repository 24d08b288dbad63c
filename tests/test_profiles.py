"""Hardware profiles: schema validation of good and bad files, budgets, CLI, calibrate-device."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgesvd.cli import main
from edgesvd.errors import ConfigError
from edgesvd.profiles import BUDGET_KEYS, SCHEMA, builtin_dir, builtin_names, load_profile, parse_budget

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ["host", "host-gpu", "raspberry-pi-5", "jetson-orin-nano", "intel-n100", "laptop-4core-x86", "nvidia-t4",
           "nvidia-l4", "nvidia-h200"]


def _good() -> dict:
    return tomllib.loads((builtin_dir() / "raspberry-pi-5.toml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "board.toml") -> Path:
    from edgesvd.exporters.calibrate_device import _toml_value

    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_builtin_profile_loads_and_cites_a_source():
    assert sorted(builtin_names()) == sorted(BUILTIN)
    for name in BUILTIN:
        p = load_profile(name, measure_host=False)
        assert p.name == name and p.rank_multiple >= 1
        assert p.device.source
        if not p.device.measure:
            assert "http" in p.device.source  # a public specification, cited
            assert p.device.peak_gflops > 0 and p.device.bandwidth_gbs > 0 and p.device.memory_bytes > 0
        assert (p.device.kind == "gpu") == (p.runtime.execution_provider == "CUDAExecutionProvider")
    assert load_profile("jetson-orin-nano").runtime.execution_provider == "CUDAExecutionProvider"


def test_host_is_measured_at_run_time():
    p = load_profile("host")
    assert p.device.measure and p.device.cores >= 1
    assert p.device.memory_bytes > 1e8 and p.device.peak_gflops > 1 and p.device.bandwidth_gbs > 0.1


def test_user_profile_by_path(tmp_path):
    data = _good()
    data["name"] = "my-board"
    path = _write(tmp_path, data)
    p = load_profile(str(path))
    assert p.name == "my-board" and p.path == str(path)
    assert p.budgets["latency_p50"].relative == pytest.approx(0.6)


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d["device"].pop("peak_gflops"), "device.peak_gflops"),
    (lambda d: d["device"].__setitem__("memory_gb", "lots"), "device.memory_gb"),
    (lambda d: d["runtime"].__setitem__("precision", "fp8"), "runtime.precision"),
    (lambda d: d["workload"].__setitem__("batch", 0), "workload.batch"),
    (lambda d: d["budgets"].__setitem__("latency_p50", "fast"), "budgets.latency_p50"),
    (lambda d: d.__setitem__("rank_multiple", 0), "rank_multiple"),
    (lambda d: d.pop("workload"), "workload"),
    (lambda d: d["runtime"].__setitem__("execution_provider", "CUDAExecutionProvider"), "runtime.execution_provider"),
])
def test_bad_profile_names_the_file_and_the_key(tmp_path, mutate, key):
    data = _good()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


def test_unknown_key_wrong_version_and_bad_toml(tmp_path):
    data = _good()
    data["device"]["turbo"] = True
    with pytest.raises(ConfigError, match="turbo"):
        load_profile(str(_write(tmp_path, data)))
    data = _good()
    data["schema_version"] = 2
    with pytest.raises(ConfigError, match="schema_version"):
        load_profile(str(_write(tmp_path, data, "v2.toml")))
    bad = tmp_path / "broken.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="broken.toml.*not valid TOML"):
        load_profile(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_profile(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="unknown profile 'pi9'"):
        load_profile("pi9")


def test_budget_parsing():
    assert parse_budget("latency_p50", "60%", "x").relative == pytest.approx(0.6)
    assert parse_budget("model_bytes", "48 MB", "x").absolute == 48e6
    assert parse_budget("peak_memory", "1.5GiB", "x").absolute == 1.5 * 2**30
    assert parse_budget("latency_p90", "0.02 s", "x").absolute == pytest.approx(20.0)
    assert parse_budget("latency_p50", 15, "x").absolute == 15.0
    assert parse_budget("model_bytes", "40%", "x").limit(100e6) == pytest.approx(40e6)
    for key, bad in [("latency_p50", "20 MB"), ("model_bytes", "20 ms"), ("model_bytes", "-3%"), ("model_bytes", 0)]:
        with pytest.raises(ConfigError, match=key):
            parse_budget(key, bad, "x")
    p = load_profile("raspberry-pi-5").with_budgets({"model_bytes": "40 MB", "latency_p50": "none"})
    assert p.budgets["model_bytes"].absolute == 40e6 and "latency_p50" not in p.budgets
    with pytest.raises(ConfigError, match="unknown budget"):
        p.with_budgets({"speed": "1 ms"})


def test_schema_documents_every_key():
    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert "description" in sub or "properties" in sub, f"{path}{key} undocumented"
            walk(sub, f"{path}{key}.")
    walk(SCHEMA, "")
    assert set(SCHEMA["properties"]["budgets"]["properties"]) == set(BUDGET_KEYS)


def test_cli_profiles_list_and_show():
    runner = CliRunner()
    result = runner.invoke(main, ["profiles", "list"])
    assert result.exit_code == 0, result.output
    for name in BUILTIN:
        assert name in result.output
    result = runner.invoke(main, ["profiles", "show", "jetson-orin-nano"])
    assert result.exit_code == 0 and "CUDAExecutionProvider" in result.output and "estimated" in result.output
    result = runner.invoke(main, ["profiles", "show", "nowhere"])
    assert result.exit_code == 2 and "unknown profile" in result.output


def test_minimal_onnx_encoder_matches_onnx_and_runs():
    """calibrate_device writes ONNX without the onnx package: check the bytes with onnx itself."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgesvd.exporters.calibrate_device import linear_model

    for rank in (None, 3):
        proto = onnx.load_from_string(linear_model(8, 5, rank))
        onnx.checker.check_model(proto, full_check=True)
        weights = [numpy_helper.to_array(t) for t in proto.graph.initializer]
        x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
        expected = x @ weights[0] if rank is None else (x @ weights[0]) @ weights[1]
        expected = expected + weights[-1]
        got = ort.InferenceSession(linear_model(8, 5, rank), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert [n.op_type for n in proto.graph.node].count("MatMul") == (1 if rank is None else 2)
    # The pivoted form: the same nodes as edgesvd's export of a PivotedLowRank (attributes included).
    proto = onnx.load_from_string(linear_model(8, 5, 3, bias=False, pivoted=True))
    onnx.checker.check_model(proto, full_check=True)
    a, c, s, rows = (numpy_helper.to_array(t) for t in proto.graph.initializer)
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Mul", "MatMul", "Concat", "Transpose", "Gather",
                                                     "Transpose"]
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    h = x @ a
    expected = np.concatenate([h * s, h @ c], axis=-1)[:, rows]
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_calibrate_device_standalone_writes_a_loadable_profile(tmp_path):
    """The script runs as a plain file with only onnxruntime + numpy importable (no edgesvd)."""
    out = tmp_path / "My Board.toml"
    script = REPO / "exporters" / "calibrate_device.py"
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    guard = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['edgesvd'] = None; sys.modules['onnx'] = None; "
             f"sys.argv = ['calibrate_device.py', '--out', {str(out)!r}, '--sizes', '64,256', '--runs', '3']; "
             f"runpy.run_path({str(script)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", guard], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    p = load_profile(str(out))
    assert p.name == "my-board" and p.measured is not None and len(p.measured.matmul) == 4
    assert {(r.k, r.n) for r in p.measured.matmul} == {(64, 64), (64, 256), (256, 64), (256, 256)}
    assert all(r.p50_ms > 0 for r in p.measured.matmul)


def test_cli_calibrate_device_refuses_existing_output(tmp_path):
    out = tmp_path / "b.toml"
    out.write_text("")
    result = CliRunner().invoke(main, ["calibrate-device", "--out", str(out)])
    assert result.exit_code == 2 and "exists" in result.output
