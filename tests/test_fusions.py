"""Fusions that keep the factorization: outputs equal the unfused graph's, the graph check still
finds every layer's factors (through a fused A MatMul too), and a tampered fusion fails the check."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_export_helpers import checkpoint, exported, work_root

from edgesvd.checkpoint import read_record
from edgesvd.errors import ConfigError
from edgesvd.exporters.export import ExportConfig, export_checkpoint, read_export
from edgesvd.exporters.graphcheck import check_graph
from edgesvd.exporters.parity import sample_inputs
from edgesvd.families import DECODER, ENCODER
from edgesvd.loading import load_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


def _outputs(onnx_dir, feed: dict) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    full = dict(feed)
    for inp in sess.get_inputs():  # decoders: an empty KV cache
        if inp.name.startswith("past_key_values"):
            full[inp.name] = np.zeros((feed["input_ids"].shape[0], inp.shape[1], 0, inp.shape[3]), np.float32)
        if inp.name == "position_ids":
            full[inp.name] = np.tile(np.arange(feed["input_ids"].shape[1]), (feed["input_ids"].shape[0], 1))
    outs = sess.run(None, {k: v for k, v in full.items() if k in names})
    return {o.name: v for o, v in zip(sess.get_outputs(), outs) if not o.name.startswith("present")}


def _feed(ck, family) -> dict[str, np.ndarray]:
    inputs = sample_inputs(load_tokenizer(ck), family, batch=3, seq_len=24)  # padded sentences for encoders
    return {k: v.numpy() for k, v in inputs.items()}


@pytest.mark.parametrize("family_fixture,family,fuse", [
    ("tiny_bert_dir", ENCODER, ("concat-a",)), ("tiny_bert_dir", ENCODER, ("attention",)),
    ("tiny_bert_dir", ENCODER, ("all",)), ("tiny_llama_dir", DECODER, ("concat-a",))])
def test_fused_graph_equals_unfused_and_keeps_every_factor(family_fixture, family, fuse, request, root, tmp_path):
    ck = checkpoint(request.getfixturevalue(family_fixture), root)
    _, record = read_record(ck)
    plain = exported(ck, root, pooled=family is ENCODER)
    fused = export_checkpoint(ck, tmp_path / "fused", ExportConfig(pooled=family is ENCODER, fuse=fuse)).out
    meta = read_export(fused)
    factorized = sum(l.rank is not None for l in record.layers)
    assert meta["graph_check"]["ok"] and meta["graph_check"]["factorized"] == factorized
    report = meta["fusions"]
    ops = Counter(n.op_type for n in onnx.load(str(fused / "model.onnx"), load_external_data=False).graph.node)
    if "concat-a" in report["applied"]:
        # q/k/v share the block's input (and gate/up in the Llama): every block has a fused group.
        assert len(report["groups"]) >= 2 and ops["Split"] >= len(report["groups"])
        assert all(len(g["layers"]) >= 2 for g in report["groups"])
    if "attention" in report["applied"]:
        assert ops["MultiHeadAttention"] == report["attention_blocks"] == 2 and ops["Softmax"] == 0
    if "ort" in report["applied"]:
        assert ops["SkipLayerNormalization"] > 0
    feed = _feed(ck, family)
    ref, got = _outputs(plain, feed), _outputs(fused, feed)
    mask = feed["attention_mask"].astype(bool)
    for name, value in ref.items():
        a, b = (value[mask], got[name][mask]) if value.ndim == 3 else (value, got[name])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name


def test_fused_int8_keeps_the_groups_and_a_tampered_split_fails_the_check(tiny_llama_dir, root, tmp_path):
    ck = checkpoint(tiny_llama_dir, root)
    _, record = read_record(ck)
    out = export_checkpoint(ck, tmp_path / "fused8", ExportConfig(quantize="int8", fuse=("concat-a",))).out
    meta = read_export(out)
    groups = meta["fusions"]["groups"]
    assert meta["graph_check"]["ok"] and groups
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert check_graph(graph, record, groups).ok
    assert not check_graph(graph, record).ok, "without the groups the fused A factors are not found"
    members = set(groups[0]["layers"])
    sizes = next(n.input[1] for n in graph.graph.node if n.name == groups[0]["split"])
    init = next(i for i in graph.graph.initializer if i.name == sizes)
    values = onnx.numpy_helper.to_array(init).copy()
    values[0], values[-1] = values[0] + 8, values[-1] - 8  # the split no longer cuts the members' ranks
    init.CopyFrom(onnx.numpy_helper.from_array(values, sizes))
    check = check_graph(graph, record, groups)
    assert {l.name for l in check.failures()} == members


def test_fusions_a_decoder_lacks_are_refused(tiny_llama_dir, root, tmp_path):
    ck = checkpoint(tiny_llama_dir, root)
    with pytest.raises(ConfigError, match="applies to encoders"):
        export_checkpoint(ck, tmp_path / "x", ExportConfig(fuse=("attention",)))
    with pytest.raises(ConfigError, match="unknown fusion"):
        ExportConfig(fuse=("qkv",))
    assert not (tmp_path / "x").exists()
