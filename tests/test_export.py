"""ONNX export: factorized MatMuls on every family, optimum loading, fp16/int8/pooling, folded-graph
detection, and bad inputs."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from test_export_helpers import FAMILIES, checkpoint, exported, work_root
from torch import nn

from edgesvd.checkpoint import load_compressed, read_record
from edgesvd.cli import main
from edgesvd.errors import FactorizationError
from edgesvd.exporters.export import ExportConfig, export_model, read_export
from edgesvd.exporters.graphcheck import QUANTIZED_STORAGE, check_graph, check_onnx_file
from edgesvd.exporters.parity import THRESHOLDS, ParityConfig, verify
from edgesvd.exporters.providers import CPU
from edgesvd.exporters.quantize import form_for
from edgesvd.factorize import LowRankLinear
from edgesvd.families import DECODER


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


@pytest.mark.parametrize("family_fixture", FAMILIES)
def test_export_keeps_factors_and_loads_in_optimum(family_fixture, request, root):
    model_dir = request.getfixturevalue(family_fixture)
    ck = checkpoint(model_dir, root)
    onnx_dir = exported(ck, root)
    _, record = read_record(ck)
    compressed = [l for l in record.layers if l.rank is not None]
    assert compressed, "the tiny model must have factorized layers for this test to mean anything"
    check = check_onnx_file(onnx_dir / "model.onnx", record)
    assert check.ok and check.factorized == len(compressed)
    assert all(l.a_shape == (l_rec.in_features, l_rec.rank)
               and l.b_shape == (l_rec.rank, l_rec.out_features - l_rec.rank * l_rec.pivoted)
               for l, l_rec in zip(check.layers, compressed))
    meta = read_export(onnx_dir)
    assert meta["graph_check"]["factorized"] == len(compressed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(onnx_dir)
    if record.family == DECODER.name:
        from optimum.onnxruntime import ORTModelForCausalLM

        model = ORTModelForCausalLM.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
        enc = tok("The file is opened", return_tensors="pt")
        ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert out.shape[1] == ids["input_ids"].shape[1] + 5
    else:
        from optimum.onnxruntime import ORTModelForFeatureExtraction

        model = ORTModelForFeatureExtraction.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
        out = model(**tok(["a short sentence", "another one"], padding=True, return_tensors="pt"))
        assert out.last_hidden_state.shape[0] == 2


def test_minilm_export_is_smaller_and_factorized(minilm_dir, root):
    ck = checkpoint(minilm_dir, root)
    onnx_dir = exported(ck, root, pooled=True)
    meta = read_export(onnx_dir)
    assert meta["graph_check"]["ok"] and meta["graph_check"]["factorized"] == 36
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    assert "sentence_embedding" in [o.name for o in graph.graph.output]
    # 22.7M dense parameters in float32 are ~90 MB; keep 0.5 of the block Linears must show on disk.
    assert (onnx_dir / "model.onnx").stat().st_size < 75e6


@pytest.mark.parametrize("dtype,quantize,itemsize", [("fp16", None, 2), ("fp32", "int8", 1)])
def test_fp16_and_int8_keep_the_factorization(tiny_bert_dir, root, dtype, quantize, itemsize):
    ck = checkpoint(tiny_bert_dir, root)
    onnx_dir = exported(ck, root, dtype=dtype, quantize=quantize, pooled=True)
    _, record = read_record(ck)
    check = check_onnx_file(onnx_dir / "model.onnx", record)
    assert check.ok
    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    dtypes = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize for i in model.graph.initializer if len(i.dims) == 2}
    assert itemsize in dtypes
    if quantize:
        assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node)
    assert read_export(onnx_dir)["precision"] == (quantize or dtype)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("family_fixture", FAMILIES)
def test_quantized_exports_keep_factors_pass_parity_and_quantize_the_embedding(family_fixture, quantize, request,
                                                                              root):
    ck = checkpoint(request.getfixturevalue(family_fixture), root, form=form_for(quantize))
    onnx_dir = exported(ck, root, quantize=quantize)
    _, record = read_record(ck)
    meta = read_export(onnx_dir)
    assert meta["precision"] == quantize and meta["graph_check"]["ok"]
    assert meta["graph_check"]["factorized"] == sum(l.rank is not None for l in record.layers) > 0
    assert meta["embedding"] in QUANTIZED_STORAGE, f"the word embedding stayed {meta['embedding']}"
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in graph.graph.node)
    quantized_op = {"int8": "MatMulInteger", "int4": "MatMulNBits"}[quantize]
    assert ops[quantized_op] >= 2 * meta["graph_check"]["factorized"]
    assert ops["MatMul"] <= 2 * sum(l.rank is None for l in record.layers) + 8  # attention MatMuls stay float
    report = verify(ck, onnx_dir, ParityConfig(eps=(CPU,)))  # raises ParityError beyond the int thresholds
    assert report.ok and report.thresholds == THRESHOLDS[quantize]
    # No weight matrix stays float (a tied head read through a Transpose of the table once did).
    floats = [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
              and min(t.dims) >= 16]
    assert not floats, f"float weight matrices left in the {quantize} export: {floats}"
    # Bytes: a tied table is stored once in fp32 but twice quantized (Gather blocks by row, the head's
    # MatMulNBits blocks by column), hence 3.5 rather than 4 for int4.
    fp32 = read_export(exported(ck, root))["graph_check"]["initializer_bytes"]
    assert meta["graph_check"]["initializer_bytes"] < fp32 / (2.5 if quantize == "int8" else 3.5)


def folded(cls: type[LowRankLinear]) -> type[LowRankLinear]:
    """What must never happen: forward multiplies the factors back, so export constant-folds them."""

    class Folded(cls):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.weight_product(), self.out_bias)

    return Folded


def test_folded_graph_fails_the_check(tiny_llama_dir, root, tmp_path):
    ck = checkpoint(tiny_llama_dir, root)
    model, record = load_compressed(ck)
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            module.__class__ = folded(type(module))
    from edgesvd.loading import load_tokenizer

    with pytest.raises(FactorizationError, match="folded back into one dense MatMul"):
        export_model(model, load_tokenizer(ck), DECODER, tmp_path / "folded", ExportConfig(), record)
    assert not (tmp_path / "folded").exists(), "a failed export must leave no folder"


def test_check_graph_reports_rank_mismatch(tiny_llama_dir, root):
    ck = checkpoint(tiny_llama_dir, root)
    onnx_dir = exported(ck, root)
    _, record = read_record(ck)
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    record.layers[0].rank = record.layers[0].rank + 8  # the checkpoint now claims another rank
    check = check_graph(graph, record)
    assert not check.ok and check.factorized == check.expected - 1
    assert "differ from the expected" in check.failures()[0].reason


def test_cli_export_bad_inputs(tiny_llama_dir, root, tmp_path):
    runner = CliRunner()
    ck = checkpoint(tiny_llama_dir, root)

    def run(*args):
        return runner.invoke(main, ["export", *map(str, args)])

    r = run(tmp_path / "nope", "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "checkpoint is not a folder" in r.output

    dense_folder = tiny_llama_dir  # a model folder without an edgesvd section
    r = run(dense_folder, "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "not an edgesvd checkpoint" in r.output

    corrupt = tmp_path / "corrupt"
    shutil.copytree(ck, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    r = run(corrupt, "--out", tmp_path / "o3")
    assert r.exit_code == 2 and "corrupt" in r.output

    incomplete = tmp_path / "incomplete"
    shutil.copytree(ck, incomplete)
    (incomplete / "model.safetensors").unlink()
    r = run(incomplete, "--out", tmp_path / "o4")
    assert r.exit_code == 2 and "no model.safetensors" in r.output

    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(ck, no_tok)
    for f in no_tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    r = run(no_tok, "--out", tmp_path / "o5")
    assert r.exit_code == 2 and "tokenizer" in r.output

    (tmp_path / "exists").mkdir()
    r = run(ck, "--out", tmp_path / "exists")
    assert r.exit_code == 2 and "--force" in r.output

    r = run(ck, "--out", tmp_path / "o6", "--dtype", "fp16", "--quantize", "int8")
    assert r.exit_code == 2 and "int8" in r.output

    # The decoder's factors are pivoted (the family's form), which 4-bit weights break (exporters/quantize.py).
    assert any(l.pivoted and l.rank for l in read_record(ck)[1].layers)
    r = run(ck, "--out", tmp_path / "o7", "--quantize", "int4")
    assert r.exit_code == 2 and r.output.startswith("error: int4 weights break pivoted factors")
    assert "--form plain" in r.output and len(r.output.strip().splitlines()) == 1

    for i in range(1, 8):
        if i != 6:
            assert not (tmp_path / f"o{i}").exists()
    assert "Traceback" not in r.output


def test_cli_export_writes_report_line(tiny_gpt2_dir, root, tmp_path):
    ck = checkpoint(tiny_gpt2_dir, root)
    r = CliRunner().invoke(main, ["export", str(ck), "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    assert "text-generation-with-past" in r.output and "compressed layers are two MatMuls" in r.output
    meta = json.loads((tmp_path / "g" / "edgesvd_export.json").read_text())
    assert meta["kind"] == "compressed" and meta["graph_check"]["ok"]
    assert np.isclose(meta["graph_check"]["factorized"], meta["graph_check"]["expected"])
