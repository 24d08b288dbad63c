"""Quantization stacked on the factorization, on real MiniLM weights: int8 loses at most a stated
bound against its own fp32, and the same measurement catches a factorization whose singular values
all sit on one factor (the split that made int8 on factors lose 0.02–0.03 STS-B)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_export_helpers import checkpoint, exported, work_root

from edgesvd.checkpoint import load_compressed, read_record
from edgesvd.costmodel import CostModel, model_facts
from edgesvd.errors import BudgetError
from edgesvd.evaluate import spearman
from edgesvd.exporters.export import ExportConfig, export_model, read_export
from edgesvd.exporters.graphcheck import QUANTIZED_STORAGE
from edgesvd.exporters.onnx_scores import stsb_cosines_onnx
from edgesvd.factorize import LowRankLinear
from edgesvd.families import ENCODER
from edgesvd.importance import component_importance, layer_shape
from edgesvd.loading import load_model, load_tokenizer, resolve_model, select_targets
from edgesvd.planner import LayerImportance, plan_ranks
from edgesvd.profiles import load_profile

# STS-B dev pairs scored (of 1,500): enough to separate the two splits below, ~10 CPU s per model.
PAIRS = 500
# The bound int8 must meet against its own fp32 export. Spearman loss is the quantity users see;
# the pair-cosine noise, std(cos_int8 − cos_fp32) ÷ std(cos_fp32), is its load-free cause.
# Measured with this checkpoint: balanced (√σ on each side) +0.002 and 0.062; all of σ on A
# −0.013 and 0.140 (on all 1,500 pairs −0.002 / 0.062 against −0.010 / 0.140).
MAX_LOSS = 0.005
MAX_NOISE = 0.09


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


def _damage(fp32_dir, int8_dir, stsb_file) -> tuple[float, float]:
    """(Spearman loss, pair-cosine noise ÷ spread) of an int8 export against its fp32 export."""
    ref, gold = stsb_cosines_onnx(fp32_dir, stsb_file, PAIRS)
    got, _ = stsb_cosines_onnx(int8_dir, stsb_file, PAIRS)
    return spearman(ref, gold) - spearman(got, gold), float(np.std(got - ref) / np.std(ref))


def _sigma_on_a(model) -> None:
    """Move every factor pair's scale onto A (unit-norm columns of B), as a plain U·(ΣVᵀ) split
    would: the product B·A, so the fp32 model, is unchanged."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                norms = module.b.weight.norm(dim=0)
                module.b.weight /= norms
                module.a.weight *= norms[:, None]


def test_int8_on_minilm_factors_loses_at_most_the_bound_and_an_unbalanced_split_is_caught(minilm_dir, root,
                                                                                          stsb_file, tmp_path):
    ck = checkpoint(minilm_dir, root)
    fp32, int8 = exported(ck, root, pooled=True), exported(ck, root, quantize="int8", pooled=True)
    assert read_export(int8)["embedding"] in QUANTIZED_STORAGE
    loss, noise = _damage(fp32, int8, stsb_file)
    assert loss <= MAX_LOSS and noise <= MAX_NOISE, f"int8 lost {loss:.4f} STS-B (noise {noise:.3f})"

    model, record = load_compressed(ck)
    _sigma_on_a(model)
    unbalanced = export_model(model, load_tokenizer(ck), ENCODER, tmp_path / "sigma-on-a",
                              ExportConfig(quantize="int8", pooled=True), record).out
    loss_u, noise_u = _damage(fp32, unbalanced, stsb_file)
    assert loss_u > MAX_LOSS and noise_u > MAX_NOISE, "the bound must reject an unbalanced split"


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_the_planner_counts_bytes_as_the_export_stores_them(tiny_bert_dir, root, quantize):
    """The cost model's weight bytes at the export precision (quantized matrices and embedding
    tables, per-channel scales, float32 biases and norms) against the initializers of the export."""
    ck = checkpoint(tiny_bert_dir, root)
    _, record = read_record(ck)
    model = load_model(resolve_model(str(tiny_bert_dir)))
    facts = model_facts(model, [l.name for l in record.layers], ENCODER)
    host = load_profile("host")
    profile = replace(host, runtime=replace(host.runtime, precision=quantize or "fp32"))
    estimate = CostModel(profile, facts).totals({l.name: l.rank for l in record.layers})["model_bytes"]
    stored = read_export(exported(ck, root, quantize=quantize))["graph_check"]["initializer_bytes"]
    # The export adds a few small constants (shape tensors, position ids); the pooler is not exported.
    pooler = sum(p.numel() for n, p in model.named_parameters() if n.startswith("pooler")) * 4
    assert abs(stored - (estimate - pooler)) <= 0.03 * stored, (stored, estimate - pooler)


def test_a_size_budget_infeasible_in_fp32_is_planned_at_int8(minilm_dir):
    """MiniLM's word embedding is half its bytes: 36 MB (40 % of the fp32 model) cannot be met by
    factorizing the blocks in fp32, and is met at int8 once the planner counts int8 bytes."""
    source = resolve_model(str(minilm_dir))
    model = load_model(source)
    targets = select_targets(model)
    facts = model_facts(model, targets, source.family)
    # The planner's input from the weights' own singular values (σ² = eigenvalues of the smaller Gram
    # matrix: a symmetric eigensolve, far cheaper than an SVD on a loaded 2-core machine).
    def sigma(w):
        gram = w @ w.T if w.shape[0] < w.shape[1] else w.T @ w
        return torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt().flip(0)

    layers = [LayerImportance(layer_shape(model.get_submodule(n), n),
                              component_importance(sigma(model.get_submodule(n).weight.detach()))[0]) for n in targets]
    # A device not at hand (no micro-benchmark runs); only the size budget binds.
    laptop = load_profile("laptop-4core-x86").with_budgets({"model_bytes": "36MB", "latency_p50": "none"})
    with pytest.raises(BudgetError, match="infeasible"):
        plan_ranks(layers, CostModel(laptop, facts))
    int8 = replace(laptop, runtime=replace(laptop.runtime, precision="int8"))
    receipt = plan_ranks(layers, CostModel(int8, facts))
    assert receipt.totals["model_bytes"] <= 36e6 and receipt.budgets[0].key == "model_bytes"


def test_the_grid_fine_tuning_trains_through_is_the_one_onnxruntime_stores(tmp_path):
    """edgesvd.weightgrid.round_int4 (what `--quantize-aware int4` trains through) gives the weights
    onnxruntime's MatMulNBits computes with after the export's own int4 quantizer: an identity input
    reads the stored weight back row by row. The input width is not a multiple of the block, one
    block holds an outlier and one is all zeros."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgesvd.exporters.quantize import quantize_int4
    from edgesvd.weightgrid import round_int4

    n_in, n_out = 80, 24
    w = torch.randn(n_in, n_out, generator=torch.Generator().manual_seed(0))  # ONNX MatMul's B: in × out
    w[5, 3], w[64:, 0] = 9.0, 0.0
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n_out])],
                              [numpy_helper.from_array(w.numpy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "dense.onnx")
    quantize_int4(tmp_path / "dense.onnx", tmp_path / "int4.onnx")
    assert [n.op_type for n in onnx.load(tmp_path / "int4.onnx").graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(str(tmp_path / "int4.onnx"), providers=["CPUExecutionProvider"])
    stored = session.run(None, {"x": np.eye(n_in, dtype=np.float32)})[0]
    np.testing.assert_allclose(stored, round_int4(w.T).T.numpy(), rtol=0, atol=1e-6)
    assert np.abs(stored - w.numpy()).max() > 0.05  # a real rounding, not the float weight
