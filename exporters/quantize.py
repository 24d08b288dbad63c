"""Quantize an exported graph in place with onnxruntime's own tooling: dynamic int8 or 4-bit weight-only."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

from edgesvd.errors import ExportError, first_line
from edgesvd.weightgrid import GRIDS, INT4_BLOCK

# What `--quantize` accepts. int8: onnxruntime's dynamic quantization (weights int8 per output
# channel, activations uint8 per tensor at run time) of every MatMul and of the embedding Gathers,
# the speed format of x86 and ARM CPUs. int4: weight-only 4-bit blocks (MatMulNBits), the format
# onnxruntime-genai and Olive ship for LLMs, whose gain is memory traffic (decode).
QUANTIZATIONS = ("int8", "int4")
# int4: symmetric blocks of INT4_BLOCK weights along the input axis (the grid edgesvd.weightgrid
# trains for); accuracy level 4 lets the CPU kernel quantize activations to int8 and use integer dot
# products (what onnxruntime-genai uses).
INT4_ACCURACY_LEVEL = 4
# Quantizations that only the plain form survives. A pivoted layer computes its non-pivot outputs
# as C·(A'x): each is a combination of r pivot outputs whose large terms cancel, so independent
# rounding errors in A' and C add up instead of cancelling. With 4-bit blocks the relative error of
# the layer's weight is 0.50 pivoted against 0.14 for the plain factors of the same product and
# 0.10 dense (mean over SmolLM2-135M's 157 pivoted layers at learned keep 0.9, C rows of norm 5–150;
# samples/bench_int4_forms.py), and the model's perplexity went from 15.0 to 1e5. int8 rounds 16×
# finer: that model lost more than dense int8 did (25.2 against 15.0; dense 19.6 against 13.1) but
# did not collapse.
PLAIN_ONLY = ("int4",)


def form_for(kind: str | None) -> str | None:
    """The factor form a model that will be quantized to `kind` must be built in (None: any)."""
    return "plain" if kind in PLAIN_ONLY else None


def grid_for(kind: str | None) -> str | None:
    """The weight grid the learned method fine-tunes for when the model will be quantized to `kind`
    (Learned.quantize_aware; None: `kind` has no fixed weight grid, e.g. int8's scales follow each channel)."""
    return kind if kind in GRIDS else None


def form_refusal(kind: str | None, pivoted_layers: int) -> str | None:
    """Why a model with `pivoted_layers` layers in the pivoted form cannot be quantized to `kind`
    (None: it can)."""
    if kind not in PLAIN_ONLY or not pivoted_layers:
        return None
    return (f"{kind} weights break pivoted factors ({pivoted_layers} layers here): each non-pivot output "
            f"sums the rounding errors of r pivot rows; compress with --form plain to quantize to {kind}")


@contextmanager
def quiet_tooling():
    """onnxruntime's Python tooling (quantizers, optimizer) logs hints on the root logger; the caller reports."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_int8(src: Path, dst: Path, embeddings: bool = True, external_data: bool = False) -> None:
    """Dynamic int8: every MatMul by a weight (each factor is one) with per-channel int8 weights,
    and with `embeddings` every Gather from a weight table (uint8, one scale per table), as
    `quantize_dynamic` does for a dense model — the word embedding is half of a small encoder.
    (8-bit GatherBlockQuantized, a scale per 64 values, measured no better on MiniLM: README.)"""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Attention and EmbedLayerNormalization exist only after onnxruntime's transformer optimizer
    # (`--fuse ort` on a dense model); they become QAttention and QEmbedLayerNormalization.
    ops = ["MatMul", "Attention"] + (["Gather", "EmbedLayerNormalization"] if embeddings else [])
    with quiet_tooling():
        try:
            # Per-channel scales: a factor's columns (components, output channels) differ in range.
            # DefaultTensorType: contrib ops from fusions carry no type information for the quantizer.
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=ops, weight_type=QuantType.QInt8,
                             per_channel=True, use_external_data_format=external_data,
                             extra_options={"DefaultTensorType": TensorProto.FLOAT})
        except Exception as exc:  # the quantizer raises what its graph walk hits (KeyError, ValueError, …)
            raise ExportError(f"onnxruntime's int8 quantization failed: {first_line(exc)}") from exc


def fold_weight_transposes(model) -> int:
    """Materialise each Transpose of an initializer that feeds only MatMul weights as its own
    initializer; return how many. A tied LM head reads the embedding table through a Transpose
    (transformers keeps the tie when accelerate is installed), and MatMulNBits quantizes only MatMuls
    whose weight is an initializer: without this the head and a float copy of the table stay float."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        users = [n for n in graph.node if node.output[0] in n.input]
        if not users or any(n.op_type != "MatMul" or list(n.input).index(node.output[0]) != 1 for n in users):
            continue
        table = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None) or list(range(table.ndim))[::-1]
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.transpose(perm)), node.output[0]))
        graph.node.remove(node)
        folded += 1
    return folded


def quantize_int4(src: Path, dst: Path, embeddings: bool = True, external_data: bool = False,
                  block_size: int = INT4_BLOCK, accuracy_level: int = INT4_ACCURACY_LEVEL) -> None:
    """Weight-only 4-bit: every MatMul by a weight becomes MatMulNBits (symmetric blocks of
    `block_size` along the input axis) and, with `embeddings`, the embedding Gathers become
    GatherBlockQuantized (4-bit blocks along the hidden axis)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    axes = (("MatMul", 0), ("Gather", 1))
    with quiet_tooling():
        try:
            model = onnx.load(str(src), load_external_data=True)
            fold_weight_transposes(model)
            config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                                  accuracy_level=accuracy_level, op_types_to_quantize=ops,
                                                  quant_axes=axes, bits=4)
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level, op_types_to_quantize=ops,
                                             quant_axes=axes, algo_config=config)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), external_data)
        except Exception as exc:
            raise ExportError(f"onnxruntime's 4-bit quantization failed: {first_line(exc)}") from exc


def quantize_file(path: Path, kind: str, external_data: bool = False) -> None:
    """Replace the graph at `path` (and its external data) by its `kind` quantization."""
    if kind not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization '{kind}' (choose from {', '.join(QUANTIZATIONS)})")
    tmp = path.with_name(f"model.{kind}.onnx")
    (quantize_int8 if kind == "int8" else quantize_int4)(path, tmp, external_data=external_data)
    for p in list(path.parent.iterdir()):
        if p.name.startswith(path.name):
            p.unlink()
    # The graph refers to its external data file (if any) by the name it was saved with: keep it.
    tmp.rename(path)
