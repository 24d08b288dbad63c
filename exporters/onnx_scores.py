"""Task scores of an exported ONNX model under onnxruntime: what a quantized variant, which exists only as ONNX, scores."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from edgesvd.errors import CalibrationError
from edgesvd.evaluate import read_chunks, read_stsb, spearman
from edgesvd.families import Family

from .export import MODEL_FILE, read_export
from .providers import CPU, SessionConfig, create_session

# Sentences per onnxruntime call when embedding; sorted by length first so padding stays short.
EMBED_BATCH = 64
# Logits held at once while scoring perplexity (float32): bounds memory for large vocabularies.
LOGITS_BYTES = 256 * 2**20


def _tokenizer(onnx_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(onnx_dir)


def _session(onnx_dir: Path, session: SessionConfig, provider: str):
    return create_session(Path(onnx_dir) / MODEL_FILE, session, provider)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An encoder session's sentence embedding, float64: `hidden` averaged over the tokens `mask` marks
    (the numpy twin of edgesvd.evaluate.mean_pool, for onnxruntime outputs)."""
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def embed_onnx(sess, tokenizer, sentences: list[str], batch_size: int = EMBED_BATCH,
               max_length: int = 128) -> np.ndarray:
    """Mean-pooled (over non-padding tokens) `last_hidden_state` of an encoder session, float64,
    in the order of `sentences` (computed in length-sorted batches)."""
    names = {i.name for i in sess.get_inputs()}
    order = np.argsort([len(s) for s in sentences], kind="stable")
    out = np.zeros((len(sentences), 0))
    for start in range(0, len(sentences), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
        feed = {"input_ids": enc["input_ids"].astype(np.int64),
                "attention_mask": enc["attention_mask"].astype(np.int64)}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        hidden = sess.run(["last_hidden_state"], {k: v for k, v in feed.items() if k in names})[0]
        pooled = mean_pool(hidden, feed["attention_mask"])
        if out.shape[1] == 0:
            out = np.zeros((len(sentences), pooled.shape[1]))
        out[idx] = pooled
    return out


def stsb_cosines_onnx(onnx_dir: str | os.PathLike, csv_path: str | os.PathLike, limit: int | None = None,
                      session: SessionConfig = SessionConfig(), provider: str = CPU) -> tuple[np.ndarray, np.ndarray]:
    """(cosine of each STS-B pair's mean-pooled embeddings, gold scores)."""
    s1, s2, gold = read_stsb(csv_path, limit)
    sess, tok = _session(Path(onnx_dir), session, provider), _tokenizer(Path(onnx_dir))
    e = embed_onnx(sess, tok, s1 + s2)
    e1, e2 = e[: len(s1)], e[len(s1):]
    cos = (e1 * e2).sum(1) / np.maximum(np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1), 1e-30)
    return cos, gold


def stsb_spearman_onnx(onnx_dir: str | os.PathLike, csv_path: str | os.PathLike, limit: int | None = None,
                       session: SessionConfig = SessionConfig(), provider: str = CPU) -> float:
    """STS-B Spearman of an encoder export, computed as edgesvd.evaluate.stsb_spearman does in PyTorch."""
    cos, gold = stsb_cosines_onnx(onnx_dir, csv_path, limit, session, provider)
    return spearman(cos, gold)


def _past_inputs(sess, batch: int) -> dict[str, np.ndarray]:
    """Empty KV-cache inputs (past length 0) of a `text-generation-with-past` export."""
    out = {}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            out[inp.name] = np.zeros((batch, inp.shape[1], 0, inp.shape[3]), dtype=dtype)
    return out


def perplexity_onnx(onnx_dir: str | os.PathLike, text_path: str | os.PathLike, max_chunks: int | None = 300,
                    session: SessionConfig = SessionConfig(), provider: str = CPU) -> float:
    """Perplexity of a decoder export over blank-line chunks, each scored on its own with BOS
    prepended and an empty KV cache, as edgesvd.evaluate.perplexity does in PyTorch."""
    onnx_dir = Path(onnx_dir)
    sess, tok = _session(onnx_dir, session, provider), _tokenizer(onnx_dir)
    cfg = json.loads((onnx_dir / "config.json").read_text())
    max_length = cfg.get("max_position_embeddings") or 512
    vocab = cfg.get("vocab_size") or 32000
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    seqs = [(bos + tok(c, add_special_tokens=False)["input_ids"])[:max_length] for c in read_chunks(text_path, max_chunks)]
    seqs = sorted((s for s in seqs if len(s) >= 2), key=len)
    if not seqs:
        raise CalibrationError(f"no text to score in {text_path}")
    names = {i.name for i in sess.get_inputs()}
    total_nll, total_tokens, start = 0.0, 0, 0
    while start < len(seqs):  # sorted by length: the last of a batch is its longest
        longest = len(seqs[min(start + 15, len(seqs) - 1)])
        batch = seqs[start:start + max(1, min(16, LOGITS_BYTES // (4 * vocab * longest)))]
        start += len(batch)
        width = len(batch[-1])
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for j, s in enumerate(batch):
            ids[j, : len(s)], mask[j, : len(s)] = s, 1
        feed = {"input_ids": ids, "attention_mask": mask, **_past_inputs(sess, len(batch))}
        if "position_ids" in names:
            feed["position_ids"] = np.tile(np.arange(width, dtype=np.int64), (len(batch), 1))
        logits = sess.run(["logits"], {k: v for k, v in feed.items() if k in names})[0][:, :-1].astype(np.float32)
        top = logits.max(-1, keepdims=True)
        log_norm = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
        nll = log_norm - np.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        valid = mask[:, 1:].astype(bool)
        total_nll += float(nll[valid].astype(np.float64).sum())
        total_tokens += int(valid.sum())
    return math.exp(total_nll / total_tokens)


def task_score_onnx(onnx_dir: str | os.PathLike, path: str | os.PathLike, family: Family | None = None,
                    session: SessionConfig = SessionConfig()) -> tuple[str, float]:
    """(name, value) of the family's task score of an export, as evaluate.task_score names it."""
    if family is None:
        from edgesvd.families import family_named

        family = family_named(read_export(onnx_dir)["family"])
    score = perplexity_onnx(onnx_dir, path, session=session) if family.causal else \
        stsb_spearman_onnx(onnx_dir, path, session=session)
    return family.task_score, round(score, 4)
