"""Graph fusions that keep the factorization: one MatMul for the A factors sharing an input, attention as one op, onnxruntime's transformer fusions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from edgesvd.checkpoint import CompressionRecord
from edgesvd.errors import ConfigError, ExportError, first_line
from edgesvd.families import Family

# What `--fuse` accepts, applied in this order:
# concat-a   the A factors of factorized layers that read the same tensor (q/k/v, gate/up) become
#            one MatMul (in × Σr) and a Split; each B factor keeps its own MatMul. Only a
#            factorized model has this fusion: dense q/k/v weights are fused by onnxruntime's
#            Attention instead.
# attention  scaled dot-product attention (reshape, transpose, QKᵀ, softmax, ·V) becomes one
#            com.microsoft MultiHeadAttention fed by separate Q, K and V (encoders), so it applies
#            to factorized and dense projections alike.
# ort        onnxruntime's transformer optimizer (SkipLayerNormalization, BiasGelu, …; encoders).
FUSIONS = ("concat-a", "attention", "ort")
MS_DOMAIN = "com.microsoft"


@dataclass
class FusedGroup:
    """Factorized layers whose A factors are one MatMul: its node, the Split after it, member ranks."""

    node: str
    split: str
    layers: list[str]
    ranks: list[int]


@dataclass
class FusionReport:
    """What the fusions did to the graph: fused A groups, attention blocks, onnxruntime's op counts."""

    applied: list[str] = field(default_factory=list)
    groups: list[FusedGroup] = field(default_factory=list)
    attention_blocks: int = 0
    ort_ops: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


# Fusions that apply to decoders (attention with a KV cache and rotary positions is another
# pattern, and onnxruntime's optimizer is run here with its BERT fusions).
DECODER_FUSIONS = ("concat-a",)


def fused_for(names: tuple[str, ...], family: Family) -> tuple[str, ...]:
    """The fusions of `names` that `family` has; ConfigError when one was asked for that it lacks
    (`--fuse all` asks for whatever applies)."""
    if family.causal:
        extra = [n for n in names if n not in DECODER_FUSIONS]
        if extra and set(names) != set(FUSIONS):
            raise ConfigError(f"--fuse {extra[0]} applies to encoders; decoders take --fuse "
                              f"{', '.join(DECODER_FUSIONS)}")
        return tuple(n for n in names if n in DECODER_FUSIONS)
    return names


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph) -> dict:
    return {o: node for node in graph.node for o in node.output}


def _norm(node_name: str) -> str:
    return "." + node_name.replace("/", ".").strip(".") + "."


def _remove_unused(graph) -> None:
    """Drop nodes whose outputs nothing reads (and the initializers they alone read)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _topological_sort(graph) -> None:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"fusion left a graph with a cycle or a missing input at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _common_scope(names: list[str]) -> str:
    """The node-name scope the members share ('/encoder/layer.0/attention/self/')."""
    import os

    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind("/") + 1]


def concat_a(model, record: CompressionRecord) -> list[FusedGroup]:
    """One MatMul for the A factors of the factorized layers that read the same tensor, then a
    Split whose outputs keep the names the B MatMuls read. Bit-identical outputs (the columns
    of one GEMM are the GEMMs of its column blocks)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_input: dict[str, list[tuple[str, object]]] = {}
    for layer in record.layers:
        if layer.rank is None:
            continue
        key = "." + layer.name + ".a."
        node = next((n for n in graph.node if n.op_type == "MatMul" and key in _norm(n.name)
                     and n.input[1] in inits), None)
        if node is not None:
            by_input.setdefault(node.input[0], []).append((layer.name, node))
    groups, drop = [], set()
    for source, members in by_input.items():
        if len(members) < 2:
            continue
        weights = [numpy_helper.to_array(inits[node.input[1]]) for _, node in members]
        ranks = [int(w.shape[1]) for w in weights]
        scope = _common_scope([node.name for _, node in members])
        short = "+".join(node.name[len(scope):].split("/")[0] for _, node in members)
        base = f"{scope}{short}/a"
        weight = f"{base.strip('/').replace('/', '.')}.weight"
        sizes = weight + ".split"
        fused_out = f"{base}/MatMul_output_0"
        graph.initializer.extend([numpy_helper.from_array(np.concatenate(weights, axis=1), weight),
                                  numpy_helper.from_array(np.asarray(ranks, dtype=np.int64), sizes)])
        graph.node.extend([
            helper.make_node("MatMul", [source, weight], [fused_out], name=f"{base}/MatMul"),
            helper.make_node("Split", [fused_out, sizes], [node.output[0] for _, node in members],
                             name=f"{base}/Split", axis=-1)])
        drop.update(node.name for _, node in members)
        groups.append(FusedGroup(f"{base}/MatMul", f"{base}/Split", [name for name, _ in members], ranks))
    kept = [n for n in graph.node if n.name not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    _remove_unused(graph)
    _topological_sort(graph)
    return groups


def _single(nodes: list, op: str | None = None):
    if len(nodes) != 1 or (op is not None and nodes[0].op_type != op):
        return None
    return nodes[0]


def _projection(producers, inits, name: str):
    """(pre-bias projection output, bias initializer) of `name` = Add(MatMul(...), bias), or None."""
    add = producers.get(name)
    if add is None or add.op_type != "Add":
        return None
    bias = [_initializer(producers, inits, i) for i in add.input]
    if sum(b is not None for b in bias) != 1:
        return None
    return add.input[bias.index(None)], next(b for b in bias if b is not None)


def _initializer(producers, inits, name: str) -> str | None:
    """The initializer `name` is, directly or through Identity (the exporter shares equal tensors)."""
    while name not in inits and name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return name if name in inits else None


def _heads_of(producers, inits, name: str, scaled: bool):
    """Follow [Mul(scale)] ← Transpose ← Reshape ← Add(bias) from one side of a score MatMul."""
    node = producers.get(name)
    if scaled and node is not None and node.op_type in ("Mul", "Div"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Transpose":
        return None
    reshape = producers.get(node.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    return _projection(producers, inits, reshape.input[0])


def fuse_attention(model, num_heads: int) -> int:
    """Rewrite every scaled dot-product attention block of an encoder into MultiHeadAttention
    with separate Q, K, V (the projections' outputs before their bias), the three biases packed
    in its `bias` input and the padding mask from `attention_mask`. Returns the blocks fused."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if "attention_mask" not in {i.name for i in graph.input}:
        raise ExportError("--fuse attention needs an attention_mask input")
    inits = {i.name: i for i in graph.initializer}
    producers, consumers = _producers(graph), _consumers(graph)
    mask = "attention_mask_int32"
    fused = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        pv = _single(consumers.get(softmax.output[0], []), "MatMul")
        masked = producers.get(softmax.input[0])
        if pv is None or pv.input[0] != softmax.output[0] or masked is None or masked.op_type != "Add":
            continue
        scores = next((producers[i] for i in masked.input if i in producers and producers[i].op_type == "MatMul"),
                      None)
        v_t = producers.get(pv.input[1])
        v_reshape = producers.get(v_t.input[0]) if v_t is not None and v_t.op_type == "Transpose" else None
        out_t = _single(consumers.get(pv.output[0], []), "Transpose")
        out_reshape = _single(consumers.get(out_t.output[0], []), "Reshape") if out_t is not None else None
        if scores is None or v_reshape is None or v_reshape.op_type != "Reshape" or out_reshape is None:
            continue
        q = _heads_of(producers, inits, scores.input[0], scaled=True)
        k = _heads_of(producers, inits, scores.input[1], scaled=True)
        v = _projection(producers, inits, v_reshape.input[0])
        if q is None or k is None or v is None:
            continue
        scope = _common_scope([softmax.name, pv.name])
        bias = f"{scope.strip('/').replace('/', '.')}.qkv_bias"
        packed = np.concatenate([numpy_helper.to_array(inits[b]) for _, b in (q, k, v)])
        graph.initializer.append(numpy_helper.from_array(packed, bias))
        out = f"{scope}MultiHeadAttention_output_0"
        graph.node.append(helper.make_node("MultiHeadAttention", [q[0], k[0], v[0], bias, mask], [out],
                                           name=f"{scope}MultiHeadAttention", domain=MS_DOMAIN,
                                           num_heads=num_heads))
        for consumer in consumers.get(out_reshape.output[0], []):
            for i, name in enumerate(consumer.input):
                if name == out_reshape.output[0]:
                    consumer.input[i] = out
        for o in graph.output:
            if o.name == out_reshape.output[0]:
                raise ExportError("--fuse attention: an attention block's output is a graph output")
        fused += 1
    if not fused:
        raise ExportError("--fuse attention found no attention block of the form "
                          "softmax(Q·Kᵀ + mask)·V over reshaped, transposed projections")
    graph.node.append(helper.make_node("Cast", ["attention_mask"], [mask], name="/attention_mask/CastInt32",
                                       to=TensorProto.INT32))
    _remove_unused(graph)
    _topological_sort(graph)
    _import_ms_domain(model)
    return fused


def ort_optimize(model, num_heads: int, hidden_size: int):
    """onnxruntime's transformer optimizer (model type bert, the fusions alone: opt_level 0);
    returns (optimized model, fused operator counts)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from .quantize import quiet_tooling

    with quiet_tooling():
        try:
            opt = optimize_model(model, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                 opt_level=0)
        except Exception as exc:
            raise ExportError(f"onnxruntime's transformer optimizer failed: {first_line(exc)}") from exc
    counts = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    _import_ms_domain(opt.model)
    return opt.model, counts


def _import_ms_domain(model) -> None:
    """Declare the com.microsoft domain when contrib ops are in the graph (the optimizer adds the
    ops without it, and onnx's shape inference, which the quantizers run, requires it)."""
    from onnx import helper

    used = any(n.domain == MS_DOMAIN for n in model.graph.node)
    if used and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def apply_fusions(model, names: tuple[str, ...], record: CompressionRecord | None, num_heads: int,
                  hidden_size: int):
    """Apply `names` (in FUSIONS order) to a loaded fp32 ModelProto; returns (model, FusionReport).
    concat-a needs the checkpoint's record (a dense export has no A factors and is left as is)."""
    report = FusionReport()
    if "concat-a" in names and record is not None:
        report.groups = concat_a(model, record)
        report.applied.append("concat-a")
    if "attention" in names:
        report.attention_blocks = fuse_attention(model, num_heads)
        report.applied.append("attention")
    if "ort" in names:
        model, report.ort_ops = ort_optimize(model, num_heads, hidden_size)
        report.applied.append("ort")
    return model, report
