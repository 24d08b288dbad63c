"""Export to ONNX with optimum: a compressed checkpoint (each factor stays a MatMul) or the dense baseline."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from edgesvd.checkpoint import CompressionRecord, load_compressed, read_record
from edgesvd.errors import ConfigError, ExportError, first_line
from edgesvd.families import FAMILIES, Family, family_named
from edgesvd.inputs import read_json
from edgesvd.loading import load_model, load_tokenizer, resolve_model
from edgesvd.outputs import atomic_output_dir, check_output_dir
from edgesvd.units import PRECISIONS

from .fusions import FUSIONS, apply_fusions, fused_for
from .graphcheck import GraphCheck, check_graph, embedding_storage, load_graph, require_factorized
from .quantize import QUANTIZATIONS, form_refusal, quantize_file

MODEL_FILE = "model.onnx"
META_FILE = "edgesvd_export.json"
DTYPES = ("fp32", "fp16")
POOLED_OUTPUT = "sentence_embedding"
# Protobuf cannot serialize a message above 2 GB; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000

# edgesvd_export.json as `export` writes it and `verify`, `profile` and `pack` read it back.
META_SCHEMA: dict = {
    "type": "object", "required": ["kind", "source", "family", "task", "model_type", "precision", "opset"],
    "properties": {
        "kind": {"enum": ["dense", "compressed"]}, "source": {"type": "string"},
        "family": {"enum": sorted(FAMILIES)}, "task": {"type": "string"}, "model_type": {"type": "string"},
        "precision": {"enum": list(PRECISIONS)}, "opset": {"type": "integer"},
        "model_file": {"type": "string"}, "config": {"type": "object"},
        "graph_check": {"type": ["object", "null"]}, "seconds": {"type": "number"},
    },
}


@dataclass(frozen=True)
class ExportConfig:
    """How to export: opset (None: optimum's default), weight dtype, quantization (int8 or int4,
    exporters/quantize.py), pooled output, graph fusions (exporters/fusions.py; none by default:
    on the CPUs measured they are not faster, README "Fusions")."""

    opset: int | None = None
    dtype: str = "fp32"
    quantize: str | None = None
    pooled: bool = False  # encoders: add a mean-pooled `sentence_embedding` output
    fuse: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fuse = tuple(FUSIONS) if "all" in self.fuse else tuple(f for f in FUSIONS if f in self.fuse)
        unknown = set(self.fuse) - set(FUSIONS) - {"all"}
        if unknown:
            raise ConfigError(f"unknown fusion '{sorted(unknown)[0]}' (choose from {', '.join(FUSIONS)}, or all)")
        object.__setattr__(self, "fuse", fuse)  # canonical order, and a tuple when read back from JSON
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown export dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"unknown quantization '{self.quantize}' (choose from {', '.join(QUANTIZATIONS)})")
        if self.quantize and self.dtype != "fp32":
            raise ConfigError(f"{self.quantize} quantization starts from fp32 weights: use --dtype fp32 with "
                              f"--quantize {self.quantize}")
        if self.opset is not None and not 14 <= self.opset <= 21:
            raise ConfigError(f"opset must be between 14 and 21, got {self.opset}")

    @property
    def precision(self) -> str:
        """The name parity thresholds are keyed by: fp32, fp16, int8 or int4."""
        return self.quantize or self.dtype


@dataclass
class ExportResult:
    """Where the export went and what the graph check found (None for a dense export)."""

    out: Path
    task: str
    family: str
    precision: str
    opset: int
    check: GraphCheck | None
    onnx_bytes: int
    seconds: float

    @property
    def model_file(self) -> Path:
        return self.out / MODEL_FILE


@contextmanager
def _quiet():
    """Silence the tracer/optimum warnings that would bury the one-line results."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    loggers = [logging.getLogger(n) for n in ("", "optimum", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(old)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def onnx_files_bytes(folder: Path) -> int:
    """Bytes on disk of the ONNX graph and its external data files in `folder`."""
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx_data") or p.suffix == ".data"))


def save_onnx(model, path: Path) -> None:
    """Save a ModelProto, with external data when its weights approach protobuf's 2 GB limit."""
    import onnx

    data = path.with_name(path.name + "_data")
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if data.exists():
        data.unlink()
    if weights > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def opset_of(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def add_mean_pooling(model) -> None:
    """Append a `sentence_embedding` output: mean of last_hidden_state over unmasked tokens."""
    from onnx import TensorProto, helper

    outputs = [o.name for o in model.graph.output]
    inputs = [i.name for i in model.graph.input]
    if "last_hidden_state" not in outputs or "attention_mask" not in inputs:
        raise ExportError("pooling needs a last_hidden_state output and an attention_mask input")
    g = model.graph
    axes1 = helper.make_tensor("pool_axis_1", TensorProto.INT64, [1], [1])
    axesm1 = helper.make_tensor("pool_axis_m1", TensorProto.INT64, [1], [-1])
    eps = helper.make_tensor("pool_eps", TensorProto.FLOAT, [], [1e-9])
    g.initializer.extend([axes1, axesm1, eps])
    g.node.extend([
        helper.make_node("Unsqueeze", ["attention_mask", "pool_axis_m1"], ["pool_mask3"], name="/pool/Unsqueeze"),
        helper.make_node("Cast", ["pool_mask3"], ["pool_maskf"], to=TensorProto.FLOAT, name="/pool/Cast"),
        helper.make_node("Mul", ["last_hidden_state", "pool_maskf"], ["pool_masked"], name="/pool/Mul"),
        helper.make_node("ReduceSum", ["pool_masked", "pool_axis_1"], ["pool_sum"], keepdims=0, name="/pool/Sum"),
        helper.make_node("ReduceSum", ["pool_maskf", "pool_axis_1"], ["pool_count"], keepdims=0, name="/pool/Count"),
        helper.make_node("Max", ["pool_count", "pool_eps"], ["pool_count_safe"], name="/pool/Max"),
        helper.make_node("Div", ["pool_sum", "pool_count_safe"], [POOLED_OUTPUT], name="/pool/Div"),
    ])
    hidden = next(o for o in g.output if o.name == "last_hidden_state")
    dims = [d.dim_param or d.dim_value for d in hidden.type.tensor_type.shape.dim]
    g.output.append(helper.make_tensor_value_info(POOLED_OUTPUT, TensorProto.FLOAT, [dims[0], dims[-1]]))


def to_fp16(model):
    """Weights and compute in float16; inputs/outputs stay float32 so callers need no change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def _optimum_export(model: nn.Module, out: Path, task: str, opset: int | None) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    with _quiet():
        try:
            onnx_export_from_model(model, output=out, task=task, opset=opset, do_validation=False)
        except Exception as exc:  # optimum raises many types (ValueError, KeyError, RuntimeError)
            raise ExportError(f"optimum could not export {model.config.model_type} as {task}: "
                              f"{first_line(exc)}") from exc


def quantize_refusal(quantize: str | None, record: CompressionRecord | None) -> str | None:
    """Why `quantize` cannot take the record's factor forms (exporters/quantize.py); None: it can."""
    pivoted = sum(1 for l in record.layers if l.pivoted and l.rank is not None) if record else 0
    return form_refusal(quantize, pivoted)


def check_quantizable(cfg: ExportConfig, record: CompressionRecord | None) -> None:
    """ExportError if `cfg`'s quantization cannot take the record's factor forms."""
    refusal = quantize_refusal(cfg.quantize, record)
    if refusal:
        raise ExportError(refusal)


def export_model(model: nn.Module, tokenizer, family: Family, out: str | os.PathLike, cfg: ExportConfig,
                 record: CompressionRecord | None = None, source: str = "", force: bool = False) -> ExportResult:
    """Export an in-memory model to `out` (atomically; never onto or around the `source` folder);
    with a record, check the factorization."""
    start = time.perf_counter()
    out = Path(out)
    task = family.onnx_task
    if cfg.pooled and not family.pooled_output:
        raise ConfigError("--pooled adds a sentence embedding and applies to encoders only")
    check_quantizable(cfg, record)
    with atomic_output_dir(out, force, inputs=(source,) if source else ()) as tmp:
        _optimum_export(model, tmp, task, cfg.opset)
        path = tmp / MODEL_FILE
        if not path.is_file():
            raise ExportError(f"optimum wrote no {MODEL_FILE} (files: {sorted(p.name for p in tmp.iterdir())})")
        fusions = None
        if cfg.fuse or cfg.pooled or cfg.dtype == "fp16":
            proto = load_graph(path)
            if cfg.fuse:  # on the float32 graph as optimum wrote it, before any conversion
                proto, fusions = apply_fusions(proto, fused_for(cfg.fuse, family), record,
                                               model.config.num_attention_heads, model.config.hidden_size)
            if cfg.dtype == "fp16":
                proto = to_fp16(proto)
            if cfg.pooled:  # after fp16: the pooling reads the float32 output and stays float32
                add_mean_pooling(proto)
            save_onnx(proto, path)
        if cfg.quantize:
            quantize_file(path, cfg.quantize, external_data=onnx_files_bytes(tmp) > EXTERNAL_DATA_BYTES)
        graph = load_graph(path, external_data=False)
        check = None
        if record is not None:
            groups = [asdict(g) for g in fusions.groups] if fusions else []
            check = require_factorized(check_graph(graph, record, groups), path)
        tokenizer.save_pretrained(tmp)
        opset = opset_of(graph)
        meta = {"kind": "dense" if record is None else "compressed", "source": source, "family": family.name,
                "task": task, "model_type": model.config.model_type, "config": asdict(cfg),
                "precision": cfg.precision, "opset": opset, "model_file": MODEL_FILE,
                "embedding": embedding_storage(graph),
                "graph_check": check.to_json() if check else None,
                "fusions": fusions.to_json() if fusions else None,
                "seconds": round(time.perf_counter() - start, 2)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        onnx_bytes = onnx_files_bytes(tmp)
    return ExportResult(out, task, family.name, cfg.precision, opset, check, onnx_bytes, meta["seconds"])


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, cfg: ExportConfig = ExportConfig(),
                      force: bool = False) -> ExportResult:
    """Export a compressed checkpoint folder; fails if a factor was folded back into a dense weight."""
    checkpoint = Path(checkpoint)
    check_output_dir(Path(out), force, inputs=(checkpoint,))
    # one-line errors for a folder that is not a checkpoint or a form the quantization breaks, before loading
    check_quantizable(cfg, read_record(checkpoint)[1])
    tokenizer = load_tokenizer(checkpoint)
    model, record = load_compressed(checkpoint)
    return export_model(model, tokenizer, family_named(record.family), out, cfg, record, str(checkpoint.resolve()),
                        force)


def export_dense(model_ref: str, out: str | os.PathLike, cfg: ExportConfig = ExportConfig(),
                 force: bool = False) -> ExportResult:
    """Export the original (dense) model through the same path, as the baseline for profiling."""
    source = resolve_model(model_ref)
    check_output_dir(Path(out), force, inputs=(source.path,))
    model = load_model(source)
    tokenizer = load_tokenizer(source.path)
    return export_model(model, tokenizer, source.family, out, cfg, None, str(source.path), force)


def read_export(onnx_dir: str | os.PathLike) -> dict:
    """The metadata edgesvd wrote beside an exported model; ExportError if the folder is not one."""
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / MODEL_FILE).is_file():
        raise ExportError(f"no {MODEL_FILE} in {onnx_dir} (export it with `edgesvd export` first)")
    meta = onnx_dir / META_FILE
    if not os.path.lexists(meta):
        raise ExportError(f"no {META_FILE} in {onnx_dir}: not a folder written by `edgesvd export`")
    return read_json(meta, "export metadata", META_SCHEMA, error=ExportError)
