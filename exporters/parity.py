"""Parity: the exported ONNX model against the compressed PyTorch model on the same inputs."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgesvd.calibration import builtin_documents
from edgesvd.checkpoint import load_compressed, read_record
from edgesvd.errors import ConfigError, ParityError
from edgesvd.families import Family, family_named
from edgesvd.loading import load_tokenizer

from .export import MODEL_FILE, POOLED_OUTPUT, read_export
from .onnx_scores import mean_pool
from .providers import CPU, CUDA, SessionConfig, create_session, cuda_status, load_causal_lm


@dataclass(frozen=True)
class Thresholds:
    """Pass limits for one precision. max_rel = max |onnx − torch| ÷ max |torch| per output."""

    max_rel: float
    cosine: float  # per output, over all valid positions flattened
    top1: float  # decoders: fraction of positions whose arg-max token agrees
    generation: float  # decoders: matching prefix of greedy generations ÷ tokens generated
    embedding_cosine: float  # encoders: worst per-sentence cosine of mean-pooled embeddings


# fp32 differs only by kernel summation order; fp16 rounds weights and activations to 11 bits;
# int8 rounds weights per channel and activations per tensor at run time, so only direction and
# arg-max are held to account. int4 rounds weights to 16 levels per block of 32 and changes the
# function visibly (MiniLM keep 0.5: embedding cosine 0.95; stories260K, whose 64-wide layers
# suffer most: top-1 0.54): its gate catches a broken graph (a wrong scale or transposition gives
# cosines near 0); quality is the task score's job (`--eval`, `run --compare-quantized`).
THRESHOLDS = {
    "fp32": Thresholds(max_rel=1e-3, cosine=0.99999, top1=0.98, generation=1.0, embedding_cosine=0.99999),
    "fp16": Thresholds(max_rel=5e-2, cosine=0.999, top1=0.95, generation=0.5, embedding_cosine=0.999),
    "int8": Thresholds(max_rel=float("inf"), cosine=0.98, top1=0.80, generation=0.0, embedding_cosine=0.98),
    "int4": Thresholds(max_rel=float("inf"), cosine=0.90, top1=0.40, generation=0.0, embedding_cosine=0.90),
}


_NUMBER_OR_NULL = {"type": ["number", "null"]}
# The JSON of `verify --json` (ParityReport.to_json) as `pack --parity-report` reads it back.
REPORT_SCHEMA: dict = {
    "type": "object", "required": ["ok", "precision", "results"],
    "properties": {
        "ok": {"type": "boolean"}, "precision": {"type": "string"},
        "onnx_dir": {"type": "string"}, "checkpoint": {"type": "string"},
        "results": {"type": "array", "items": {
            "type": "object", "required": ["provider", "status", "reason", "failures", "outputs"],
            "properties": {
                "provider": {"type": "string"}, "status": {"enum": ["passed", "failed", "skipped"]},
                "reason": {"type": "string"}, "failures": {"type": "array", "items": {"type": "string"}},
                "outputs": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["cosine"], "properties": {"cosine": {"type": "number"}}}},
                "top1": _NUMBER_OR_NULL, "generation": _NUMBER_OR_NULL, "embedding_cosine": _NUMBER_OR_NULL}}},
    },
}


@dataclass(frozen=True)
class ParityConfig:
    """Inputs of the check: how many texts, how long, how many generated tokens; which EPs."""

    batch: int = 4
    seq_len: int = 64
    new_tokens: int = 16
    eps: tuple[str, ...] = (CPU, CUDA)  # CUDA is skipped (with the reason) when no GPU works
    session: SessionConfig = SessionConfig()

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq_len < 2 or self.new_tokens < 1:
            raise ConfigError("parity needs batch >= 1, seq_len >= 2 and new_tokens >= 1")


@dataclass
class OutputMetrics:
    max_abs: float
    max_rel: float
    cosine: float


@dataclass
class EPResult:
    """Parity on one execution provider."""

    provider: str
    status: str  # passed | failed | skipped
    reason: str = ""
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    top1: float | None = None
    generation: float | None = None
    generated: dict[str, list[int]] = field(default_factory=dict)
    embedding_cosine: float | None = None
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ParityReport:
    onnx_dir: str
    checkpoint: str
    family: str
    precision: str
    thresholds: Thresholds
    inputs: dict
    results: list[EPResult]

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results) and any(r.status == "passed" for r in self.results)

    def to_json(self) -> dict:
        d = asdict(self)
        d["thresholds"] = {k: (v if np.isfinite(v) else None) for k, v in d["thresholds"].items()}
        d["ok"] = self.ok
        return d


def _metrics(ref: np.ndarray, got: np.ndarray) -> OutputMetrics:
    ref, got = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    diff = np.abs(ref - got).max() if ref.size else 0.0
    scale = np.abs(ref).max() if ref.size else 1.0
    cos = float(ref @ got / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    return OutputMetrics(float(diff), float(diff / max(scale, 1e-30)), cos)


def sample_inputs(tokenizer, family: Family, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Deterministic token batch from the built-in corpus: padded sentences for encoders,
    equal-length windows (no padding) for decoders."""
    docs = builtin_documents()
    texts = [docs[(i * 37) % len(docs)] for i in range(batch)]
    if not family.causal:
        enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="longest", return_tensors="pt")
        return dict(enc)
    ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    length = max(2, min(seq_len, min(len(i) for i in ids)))
    input_ids = torch.tensor([i[:length] for i in ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def _check(res: EPResult, th: Thresholds) -> None:
    for name, m in res.outputs.items():
        if m.max_rel > th.max_rel:
            res.failures.append(f"{name}: max relative error {m.max_rel:.2e} > {th.max_rel:.0e}")
        if m.cosine < th.cosine:
            res.failures.append(f"{name}: cosine {m.cosine:.6f} < {th.cosine}")
    if res.top1 is not None and res.top1 < th.top1:
        res.failures.append(f"top-1 agreement {res.top1:.3f} < {th.top1}")
    if res.generation is not None and res.generation < th.generation:
        res.failures.append(f"greedy generation match {res.generation:.3f} < {th.generation}")
    if res.embedding_cosine is not None and res.embedding_cosine < th.embedding_cosine:
        res.failures.append(f"embedding cosine {res.embedding_cosine:.6f} < {th.embedding_cosine}")
    res.status = "failed" if res.failures else "passed"


def _encoder_parity(onnx_dir: Path, model, inputs, provider: str, cfg: ParityConfig) -> EPResult:
    res = EPResult(provider, "passed")
    sess = create_session(onnx_dir / MODEL_FILE, cfg.session, provider)
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    if "token_type_ids" in names and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    with torch.no_grad():
        ref_hidden = model(**{k: v for k, v in inputs.items()}).last_hidden_state.numpy()
    mask = inputs["attention_mask"].numpy().astype(bool)
    res.outputs["last_hidden_state"] = _metrics(ref_hidden[mask], outs["last_hidden_state"][mask])
    ref_pool = mean_pool(ref_hidden, mask)
    got_pool = outs[POOLED_OUTPUT] if POOLED_OUTPUT in outs else mean_pool(outs["last_hidden_state"], mask)
    if POOLED_OUTPUT in outs:
        res.outputs[POOLED_OUTPUT] = _metrics(ref_pool, got_pool)
    res.embedding_cosine = float(_row_cosines(ref_pool, got_pool.astype(np.float64)).min())
    return res


def _decoder_parity(onnx_dir: Path, model, tokenizer, inputs, provider: str, cfg: ParityConfig) -> EPResult:
    res = EPResult(provider, "passed")
    ort_model = load_causal_lm(onnx_dir / MODEL_FILE, provider, cfg.session)
    with torch.no_grad():
        ref = model(**inputs).logits.numpy()
        got = ort_model(**inputs).logits.detach().cpu().numpy()
    res.outputs["logits"] = _metrics(ref, got)
    res.top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    prompt = {k: v[:1, : min(8, v.shape[1])] for k, v in inputs.items()}
    gen_kwargs = dict(max_new_tokens=cfg.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ref_gen = model.generate(**prompt, **gen_kwargs)[0, prompt["input_ids"].shape[1]:].tolist()
        got_gen = ort_model.generate(**prompt, **gen_kwargs)[0, prompt["input_ids"].shape[1]:].cpu().tolist()
    same = 0
    for a, b in zip(ref_gen, got_gen):
        if a != b:
            break
        same += 1
    res.generation = same / max(len(ref_gen), len(got_gen), 1)
    res.generated = {"torch": ref_gen, "onnx": got_gen}
    return res


def verify(checkpoint: str | os.PathLike, onnx_dir: str | os.PathLike, cfg: ParityConfig = ParityConfig(),
           raise_on_failure: bool = True) -> ParityReport:
    """Compare ONNX outputs with the compressed PyTorch model on every EP in `cfg.eps`.

    Raises ParityError (exit code 1) when any EP fails and `raise_on_failure`; the report is
    attached to the exception as `.report`.
    """
    checkpoint, onnx_dir = Path(checkpoint), Path(onnx_dir)
    meta = read_export(onnx_dir)
    read_record(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    model, record = load_compressed(checkpoint)
    if meta["family"] != record.family:
        raise ConfigError(f"{onnx_dir} holds a {meta['family']} but {checkpoint} is a {record.family}")
    family = family_named(record.family)
    precision = meta["precision"]
    th = THRESHOLDS[precision]
    torch.manual_seed(0)
    inputs = sample_inputs(tokenizer, family, cfg.batch, cfg.seq_len)
    results = []
    for provider in cfg.eps:
        if provider == CUDA and not cuda_status()[0]:
            results.append(EPResult(provider, "skipped", reason=cuda_status()[1]))
            continue
        start = time.perf_counter()
        if family.causal:
            res = _decoder_parity(onnx_dir, model, tokenizer, inputs, provider, cfg)
        else:
            res = _encoder_parity(onnx_dir, model, inputs, provider, cfg)
        _check(res, th)
        res.seconds = round(time.perf_counter() - start, 2)
        results.append(res)
    shape = list(inputs["input_ids"].shape)
    report = ParityReport(str(onnx_dir), str(checkpoint), record.family, precision, th,
                          {"input_ids_shape": shape, "new_tokens": cfg.new_tokens if family.causal else 0,
                           "source": "built-in corpus"}, results)
    if raise_on_failure and not report.ok:
        failed = [f"{r.provider}: {'; '.join(r.failures)}" for r in results if r.status == "failed"]
        err = ParityError(f"parity failed ({precision}) — " + " | ".join(failed))
        err.report = report
        raise err
    return report
