"""Every decoder family edgesvd supports, by structure: a tiny random-init model of each goes through
compress → ONNX export with KV cache → parity, and streamed compression equals the whole-model path."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import TINY_FAMILIES

from edgesvd import CalibrationConfig, Learned, Whiten, compress
from edgesvd.checkpoint import read_record
from edgesvd.compression import compress_streamed
from edgesvd.errors import ModelLoadError
from edgesvd.exporters.export import ExportConfig, export_checkpoint, read_export
from edgesvd.exporters.parity import ParityConfig, verify
from edgesvd.exporters.providers import CPU
from edgesvd.families import DECODER, family_of
from edgesvd.loading import resolve_model

CALIB = CalibrationConfig("builtin", 24, 48)


@pytest.fixture(scope="module")
def whole(tiny_family_dir):
    """The whole-model (not streamed) compression of a family's tiny model, computed once."""
    done = {}

    def get(model_type: str):
        if model_type not in done:
            done[model_type] = compress(str(tiny_family_dir(model_type)), Whiten(keep=0.5), calib=CALIB, stream="off")
        return done[model_type]

    return get


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
def test_family_compresses_exports_with_kv_cache_and_passes_parity(model_type, tiny_family_dir, whole, tmp_path):
    folder = tiny_family_dir(model_type)
    source = resolve_model(folder)
    assert source.family is DECODER and source.model_type == model_type
    result = whole(model_type)
    result.save(tmp_path / "ck")
    _, record = read_record(tmp_path / "ck")
    compressed = [l for l in record.layers if l.rank is not None]
    # Every Linear of both blocks is a target (Phi-3's fused qkv_proj and gate_up_proj included).
    targets = [n for n, m in result.model.named_modules() if n.startswith("model.layers.") and n.count(".") == 4
               and hasattr(m, "a")]
    assert len(record.layers) == 2 * (4 if model_type == "phi3" else 7) and compressed
    assert {l.name for l in compressed} <= set(targets)
    assert record.keep_actual < 0.75

    onnx_dir = tmp_path / "onnx"
    export_checkpoint(tmp_path / "ck", onnx_dir, ExportConfig())
    meta = read_export(onnx_dir)
    assert meta["model_type"] == model_type and meta["task"] == "text-generation-with-past"
    assert meta["graph_check"]["ok"] and meta["graph_check"]["factorized"] == len(compressed)
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    inputs = {i.name for i in graph.graph.input}
    assert {"past_key_values.0.key", "past_key_values.1.value"} <= inputs, sorted(inputs)
    assert "present.1.key" in {o.name for o in graph.graph.output}

    # 64 tokens (four 16-token windows) then greedy decoding through the exported cache.
    report = verify(tmp_path / "ck", onnx_dir, ParityConfig(batch=2, seq_len=64, new_tokens=16, eps=(CPU,)))
    cpu = report.results[0]
    assert report.ok and cpu.status == "passed", report.to_json()
    assert report.inputs["input_ids_shape"][1] > 16
    assert cpu.generation == 1.0 and len(cpu.generated["onnx"]) == 16 and cpu.top1 >= 0.98


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
def test_streamed_compression_equals_the_whole_model_path(model_type, tiny_family_dir, whole):
    """Dense propagation gives each block the inputs the whole model gives it: the same factors, bit for bit."""
    streamed = compress_streamed(resolve_model(tiny_family_dir(model_type)), Whiten(keep=0.5), CALIB,
                                 propagate="dense", calib_precision="float32")
    whole = whole(model_type)
    sw, ss = whole.model.state_dict(), streamed.model.state_dict()
    assert sw.keys() == ss.keys(), sorted(set(sw) ^ set(ss))[:5]
    for k in sw:
        assert torch.equal(sw[k], ss[k]), k
    assert [(l.name, l.rank) for l in whole.record.layers] == [(l.name, l.rank) for l in streamed.record.layers]
    m = streamed.model
    if m.config.tie_word_embeddings:
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
def test_the_learned_method_streams_every_family(model_type, tiny_family_dir):
    """The streamed learned method finds each family's final norm and head by structure (Gemma 3's
    causal LM is its own base model), meets the budget and runs its end-to-end stage."""
    result = compress_streamed(resolve_model(tiny_family_dir(model_type)), Learned(keep=0.5, finetune_steps=2), CALIB)
    assert result.record.keep_actual <= 0.5 + 1e-9
    assert result.record.details["end_to_end"]["ran"]
    with torch.no_grad():
        logits = result.model(input_ids=torch.randint(3, 500, (1, 24))).logits
    assert torch.isfinite(logits).all()


def test_families_are_known_without_an_architectures_entry():
    """A config that names no *ForCausalLM class (built in code, or converted) is still a decoder by type;
    a multimodal Gemma 3 (vision tower, model_type gemma3) is refused in one line naming its type."""
    from transformers import AutoConfig, Gemma3Config

    for model_type in TINY_FAMILIES:
        config = AutoConfig.for_model(model_type)
        assert not getattr(config, "architectures", None) and family_of(config) is DECODER
    with pytest.raises(ModelLoadError, match="unsupported model type 'gemma3'.*gemma3_text"):
        family_of(Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]))
