"""Check on the ONNX graph that every compressed layer is still two MatMuls of the checkpoint's rank."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgesvd.checkpoint import CompressionRecord
from edgesvd.errors import ExportError, FactorizationError, first_line

# Ops that multiply an activation by a weight: plain, int8-dynamic-quantized and fused forms.
MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
              "MatMulNBits", "FusedMatMul"}
# Ops that read rows of an embedding table → (input holding the token ids, input holding the
# table): plain Gather, onnxruntime's block-quantized form, and its fused embedding + LayerNorm.
GATHER_OPS = {"Gather": (1, 0), "GatherBlockQuantized": (1, 0), "EmbedLayerNormalization": (0, 2),
              "QEmbedLayerNormalization": (0, 2)}
# Stored forms of an embedding table that count as quantized (8 or 4 bits per value).
QUANTIZED_STORAGE = ("int8", "uint8", "int4", "uint4")
# Ops between `input_ids` and the embedding Gather that keep the token ids (GPT-2 reshapes them).
_INDEX_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
# TensorProto.UINT4, INT4, FLOAT4E2M1: stored two values per byte.
_PACKED_4BIT = {21, 22, 23}
# Ops that may sit between a weight initializer and its MatMul without changing what it is.
_PASS_THROUGH = {"Cast", "DequantizeLinear", "Transpose", "Identity"}


@dataclass
class LayerCheck:
    """What the graph holds for one compressed layer."""

    name: str
    rank: int
    a_shape: tuple[int, ...] | None  # initializer of the first MatMul, expected (in, rank)
    b_shape: tuple[int, ...] | None  # initializer of the second MatMul, expected (rank, out) (pivoted: out − rank)
    ok: bool
    reason: str = ""


@dataclass
class GraphCheck:
    """Per-layer findings plus totals; `ok` only if every compressed layer is factorized."""

    layers: list[LayerCheck] = field(default_factory=list)
    initializer_bytes: int = 0  # all initializers of the graph (weights as stored: fp32/fp16/int8)
    factor_bytes: int = 0  # initializers of the factor MatMuls
    embedding: str | None = None  # how the word-embedding table is stored (embedding_storage)

    @property
    def expected(self) -> int:
        return len(self.layers)

    @property
    def factorized(self) -> int:
        return sum(l.ok for l in self.layers)

    @property
    def ok(self) -> bool:
        return self.factorized == self.expected

    def failures(self) -> list[LayerCheck]:
        return [l for l in self.layers if not l.ok]

    def summary(self) -> str:
        emb = f"; word embedding {self.embedding}" if self.embedding else ""
        return (f"{self.factorized}/{self.expected} compressed layers are two MatMuls of their rank; "
                f"initializers {self.initializer_bytes / 1e6:.2f} MB (factors {self.factor_bytes / 1e6:.2f} MB){emb}")

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(expected=self.expected, factorized=self.factorized, ok=self.ok)
        return d


def _dims_and_bytes(init) -> tuple[tuple[int, ...], int]:
    import onnx

    dims = tuple(int(d) for d in init.dims)
    n = 1
    for d in dims:
        n *= d
    if init.data_type in _PACKED_4BIT:  # two values per byte
        return dims, (n + 1) // 2
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return dims, n * itemsize


class GraphIndex:
    """Index of a loaded ONNX graph: initializer shapes, producers, weight MatMuls by normalized name."""

    def __init__(self, model) -> None:
        self.inits: dict[str, tuple[int, ...]] = {}
        self.init_bytes: dict[str, int] = {}
        self.init_proto = {init.name: init for init in model.graph.initializer}
        for init in model.graph.initializer:
            self.inits[init.name], self.init_bytes[init.name] = _dims_and_bytes(init)
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.nodes = list(model.graph.node)

    def weight_of(self, node, index: int = 1) -> str | None:
        """Name of the initializer feeding `node`'s input `index` (1: the B of MatMul, Gemm,
        MatMulInteger and the fused variants; 0: the table of a Gather), through casts and
        dequantization."""
        if len(node.input) <= index:
            return None
        name = node.input[index]
        for _ in range(4):
            if name in self.inits or name not in self.producer:
                break
            prod = self.producer[name]
            if prod.op_type not in _PASS_THROUGH:
                return None
            name = prod.input[0]
        return name if name in self.inits else None

    def weight_shape(self, node, weight: str) -> tuple[int, ...]:
        """Logical (in, out) of a MatMul's weight: MatMulNBits stores packed 4-bit blocks
        (out, blocks, bytes) and says its shape in attributes K and N."""
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            return (int(attrs["K"]), int(attrs["N"]))
        return self.inits[weight]

    def weight_matmuls(self):
        """(normalized node name, node, weight initializer name) for every MatMul fed by a weight."""
        for node in self.nodes:
            if node.op_type in MATMUL_OPS:
                w = self.weight_of(node)
                if w is not None:
                    yield "." + node.name.replace("/", ".").strip(".") + ".", node, w


    def embedding_table(self):
        """(Gather node, table initializer) of the word embedding: the Gather indexed by `input_ids`."""
        for node in self.nodes:
            if node.op_type not in GATHER_OPS:
                continue
            ids_at, table_at = GATHER_OPS[node.op_type]
            if len(node.input) <= max(ids_at, table_at):
                continue
            index = node.input[ids_at]
            while index in self.producer and self.producer[index].op_type in _INDEX_PASS_THROUGH:
                index = self.producer[index].input[0]
            table = self.weight_of(node, table_at)
            if index == "input_ids" and table is not None:
                return node, table
        return None, None


def embedding_storage(model) -> str | None:
    """How the word-embedding table is stored: 'float32', 'float16', 'uint8' (onnxruntime's
    int8 Gather: one scale per table), 'int4' (GatherBlockQuantized, blocks along the hidden axis),
    …; None when no Gather of a weight table reads `input_ids`."""
    import onnx

    graph = model if isinstance(model, GraphIndex) else GraphIndex(model)
    node, table = graph.embedding_table()
    if node is None:
        return None
    if node.op_type == "GatherBlockQuantized":
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        return f"int{bits}"
    init = graph.init_proto[table]
    return onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name


def _fused_a(graph: GraphIndex, matmuls: list, groups: list[dict]) -> dict[str, tuple[tuple[int, int], int]]:
    """Per member layer of a fused A group (exporters/fusions.py): its slice of the one MatMul,
    ((in, rank), its share of the weight's bytes), when the MatMul's weight is (in, Σ ranks) and
    the Split after it cuts exactly the members' ranks in order; members of a group that does not
    hold are left out (and so reported as not factorized)."""
    import onnx

    out = {}
    splits = {n.name: n for n in graph.nodes if n.op_type == "Split"}
    for g in groups:
        base = "." + g["node"].removesuffix("/MatMul").replace("/", ".").strip(".") + "."
        hit = next(((node, w) for norm, node, w in matmuls if base in norm), None)
        split = splits.get(g["split"])
        if hit is None or split is None or len(split.input) < 2 or split.input[1] not in graph.init_proto:
            continue
        sizes = [int(x) for x in onnx.numpy_helper.to_array(graph.init_proto[split.input[1]])]
        shape = graph.weight_shape(*hit)
        if sizes != list(g["ranks"]) or len(shape) != 2 or shape[1] != sum(sizes):
            continue
        for name, rank in zip(g["layers"], sizes):
            out[name] = ((shape[0], rank), graph.init_bytes[hit[1]] * rank // shape[1])
    return out


def check_graph(model, record: CompressionRecord, fused_groups: list[dict] | None = None) -> GraphCheck:
    """Compare a loaded ONNX ModelProto with the checkpoint's ranks (no exception on failure).
    `fused_groups`: the A factors fused into one MatMul, as the export recorded them."""
    graph = GraphIndex(model)
    matmuls = list(graph.weight_matmuls())
    fused = _fused_a(graph, matmuls, fused_groups or [])
    result = GraphCheck(initializer_bytes=sum(graph.init_bytes.values()), embedding=embedding_storage(graph))
    for layer in record.layers:
        if layer.rank is None:
            continue
        prefix = "." + layer.name + "."
        found = {}
        dense = None
        for norm, node, w in matmuls:
            if prefix + "a." in norm:
                found["a"] = (node, w)
            elif prefix + "b." in norm:
                found["b"] = (node, w)
            elif prefix in norm:
                dense = (node, w)
        a_shape = graph.weight_shape(*found["a"]) if "a" in found else None
        a_bytes = graph.init_bytes[found["a"][1]] if "a" in found else 0
        if a_shape is None and layer.name in fused:  # its columns of a fused A MatMul
            a_shape, a_bytes = fused[layer.name]
        b_shape = graph.weight_shape(*found["b"]) if "b" in found else None
        # the second factor of a pivoted layer computes the outputs other than the rank pivot ones
        expect_a, expect_b = (layer.in_features, layer.rank), (layer.rank, layer.out_features - layer.rank * layer.pivoted)
        if a_shape == expect_a and b_shape == expect_b:
            result.layers.append(LayerCheck(layer.name, layer.rank, a_shape, b_shape, True))
            result.factor_bytes += a_bytes + graph.init_bytes[found["b"][1]]
            continue
        if dense is not None:
            reason = f"folded back into one dense MatMul with weight {graph.weight_shape(*dense)}"
        elif a_shape is None or b_shape is None:
            reason = "no pair of factor MatMuls found in the graph"
        else:
            reason = f"factor shapes {a_shape}, {b_shape} differ from the expected {expect_a}, {expect_b}"
        result.layers.append(LayerCheck(layer.name, layer.rank, a_shape, b_shape, False, reason))
    return result


def load_graph(path: str | os.PathLike, external_data: bool = True):
    """An ONNX ModelProto from a file; ExportError (one line) when it is missing or not a readable graph
    (a truncated or foreign file makes protobuf raise DecodeError)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=external_data)
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist") from None
    except Exception as exc:  # google.protobuf DecodeError, onnx's ValidationError, OSError on external data
        raise ExportError(f"{path} is not a readable ONNX model: {first_line(exc)}") from None


def check_onnx_file(onnx_path: str | os.PathLike, record: CompressionRecord) -> GraphCheck:
    """Load an ONNX file's graph (initializer metadata only, no external data) and check it."""
    return check_graph(load_graph(onnx_path, external_data=False), record)


def require_factorized(check: GraphCheck, where: str | Path) -> GraphCheck:
    """Raise FactorizationError naming the first folded layers unless every layer is factorized."""
    if not check.ok:
        bad = check.failures()
        names = "; ".join(f"{l.name}: {l.reason}" for l in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise FactorizationError(f"{where}: {len(bad)}/{check.expected} compressed layers are not factorized "
                                 f"in the graph — {names}{more}")
    return check
