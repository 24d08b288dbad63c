"""Bundles: manifest with every file's sha256, --check on folder and archive, tampering, the runner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from test_export_helpers import checkpoint, exported, exported_dense, work_root

from edgesvd.checkpoint import load_compressed
from edgesvd.cli import main
from edgesvd.errors import BundleError
from edgesvd.exporters.bundle import pack
from edgesvd.exporters.manifest import check_bundle
from edgesvd.exporters.parity import ParityConfig, verify
from edgesvd.exporters.profiling import ProfileConfig, profile
from edgesvd.exporters.providers import CPU
from edgesvd.loading import load_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


@pytest.fixture(scope="module")
def llama_bundle(tiny_llama_dir, root):
    ck = checkpoint(tiny_llama_dir, root)
    onnx_dir = exported(ck, root)
    parity = verify(ck, onnx_dir, ParityConfig(batch=2, seq_len=16, new_tokens=4)).to_json()
    prof = profile(onnx_dir, exported_dense(tiny_llama_dir, root), ProfileConfig(seq_len=8, warmup=1, runs=3)).to_json()
    out = root / "bundle-llama"
    if not out.exists():
        pack(onnx_dir, ck, out, parity, prof)
    return out, ck


def test_manifest_lists_everything(llama_bundle):
    bundle, _ = llama_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    files = set(manifest["files"])
    assert {"model.onnx", "tokenizer.json", "config.json", "run.py", "reports/parity.json", "reports/profile.json",
            "reports/report.md"} <= files
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert files == on_disk
    assert manifest["source"]["sha256"] and len(manifest["checkpoint"]["sha256"]) == 64
    assert manifest["compression"]["method"] == "whiten" and any(manifest["compression"]["ranks"].values())
    assert manifest["parity"]["ok"] and manifest["parity"]["providers"][CPU]["status"] == "passed"
    assert {"prefill", "decode"} <= set(manifest["latency"]["models"]["compressed"][CPU])
    for lib in ("edgesvd", "torch", "transformers", "onnx", "onnxruntime"):
        assert manifest["versions"][lib]
    assert manifest["model"]["opset"] >= 14 and manifest["runtime"]["session_options"]["graph_optimization"] == "all"
    assert "| compressed |" in (bundle / "reports" / "report.md").read_text()
    assert (bundle.parent / (bundle.name + ".tar.gz")).is_file()


def test_check_passes_on_folder_and_archive(llama_bundle):
    bundle, _ = llama_bundle
    for target in (bundle, bundle.parent / (bundle.name + ".tar.gz")):
        r = CliRunner().invoke(main, ["pack", "--check", str(target)])
        assert r.exit_code == 0 and r.output.startswith("ok:"), r.output


@pytest.mark.parametrize("tamper", ["modify", "delete", "add"])
def test_tampered_bundle_fails_check(llama_bundle, tmp_path, tamper):
    import shutil

    bundle = shutil.copytree(llama_bundle[0], tmp_path / "b")
    if tamper == "modify":
        data = bytearray((bundle / "model.onnx").read_bytes())
        data[-1] ^= 1
        (bundle / "model.onnx").write_bytes(bytes(data))
        expected = "model.onnx was modified"
    elif tamper == "delete":
        (bundle / "tokenizer.json").unlink()
        expected = "tokenizer.json is missing"
    else:
        (bundle / "extra.bin").write_bytes(b"x")
        expected = "extra.bin is not in the manifest"
    with pytest.raises(BundleError, match=expected):
        check_bundle(bundle)
    r = CliRunner().invoke(main, ["pack", "--check", str(bundle)])
    assert r.exit_code == 1 and expected in r.output


def test_runner_generates_like_pytorch(llama_bundle):
    bundle, ck = llama_bundle
    out = subprocess.run([sys.executable, str(bundle / "run.py"), "The file is", "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True, cwd=bundle.parent, check=True)
    result = json.loads(out.stdout)
    model, _ = load_compressed(ck)
    ids = torch.tensor([result["prompt_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert result["new_ids"] == ref[: len(result["new_ids"])] and len(result["new_ids"]) > 0


def test_minilm_pack_cli_and_runner_embeddings(minilm_dir, root, tmp_path):
    ck = checkpoint(minilm_dir, root)
    onnx_dir = exported(ck, root, pooled=True)
    out = tmp_path / "mini"
    r = CliRunner().invoke(main, ["pack", str(onnx_dir), "--out", str(out), "--runs", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["pack", str(onnx_dir), "--out", str(out), "--runs", "2"])
    assert r.exit_code == 2 and "--force" in r.output
    texts = ["A man is playing a guitar.", "Someone plays an instrument."]
    res = subprocess.run([sys.executable, str(out / "run.py"), *texts, "--json"], capture_output=True, text=True,
                         check=True)
    got = torch.tensor(json.loads(res.stdout)["embeddings"])
    model, _ = load_compressed(ck)
    enc = load_tokenizer(ck)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = (hidden * m).sum(1) / m.sum(1)
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.9999
    r = CliRunner().invoke(main, ["pack", "--check", str(out)])
    assert r.exit_code == 0


@pytest.mark.parametrize("dtype,quantize", [("fp16", None), ("fp32", "int8")])
def test_external_data_path_end_to_end(tiny_llama_dir, root, tmp_path, monkeypatch, dtype, quantize):
    """The path models over protobuf's 2 GB limit take when edgesvd rewrites the graph (fp16 here;
    pooling and int8 alike), on a tiny model with the threshold lowered: weights in model.onnx_data, the factorization check reads them, onnxruntime and optimum load
    them, parity holds, and the bundle lists and re-verifies the data file (tampering is caught)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    import edgesvd.exporters.export as onnx_export
    from edgesvd.exporters.export import ExportConfig, export_checkpoint, read_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1)
    ck = checkpoint(tiny_llama_dir, root)
    onnx_dir = tmp_path / "onnx"
    export_checkpoint(ck, onnx_dir, ExportConfig(dtype=dtype, quantize=quantize))
    [data] = [p for p in onnx_dir.iterdir() if p.name.startswith("model.") and "data" in p.name]
    # Every weight of 1 KiB or more lives in the data file (onnx's size threshold: on this tiny model
    # int8 leaves many small tensors inline, so comparing file sizes would test the model, not the path).
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph
    big = [t for t in graph.initializer if uses_external_data(t) or len(t.raw_data) >= 1024]
    assert big and all(uses_external_data(t) for t in big) and data.stat().st_size > 0
    _, record = load_compressed(ck)
    assert read_export(onnx_dir)["graph_check"]["factorized"] == sum(l.rank is not None for l in record.layers)
    parity = verify(ck, onnx_dir, ParityConfig(batch=2, seq_len=16, new_tokens=4))
    assert parity.ok
    prof = profile(onnx_dir, None, ProfileConfig(seq_len=8, warmup=1, runs=2)).to_json()
    bundle = pack(onnx_dir, ck, tmp_path / "bundle", parity.to_json(), prof)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert any(name.endswith(data.name) for name in manifest["files"])
    check_bundle(bundle)
    with open(next(bundle.rglob(data.name)), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError):
        check_bundle(bundle)


def test_the_weights_sha_of_a_checkpoint_in_parts_covers_every_part(tmp_path):
    """A streamed checkpoint's identity in the manifest changes when any part's bytes change, though
    its index (which only names the parts) does not."""
    import json

    import torch
    from safetensors.torch import save_file

    from edgesvd.exporters.bundle import _weights_sha

    save_file({"a": torch.zeros(4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(4)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    before = _weights_sha(tmp_path)
    save_file({"b": torch.ones(4)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert before is not None and _weights_sha(tmp_path) != before
