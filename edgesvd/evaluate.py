"""Quality: task scores (STS-B Spearman for encoders, perplexity for causal LMs) and agreement with the dense model."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CalibrationError, ConfigError
from .families import Family
from .inputs import open_regular, read_text


def read_stsb(path: str | os.PathLike, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Sentence pairs and gold scores from an STS-B tab-separated file (extra trailing fields ignored)."""
    s1, s2, gold = [], [], []
    text = read_text(path, "--eval file", error=CalibrationError)
    for row in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE):
        if len(row) < 7:
            continue
        try:
            score = float(row[4])
        except ValueError:  # a header line
            continue
        s1.append(row[5])
        s2.append(row[6])
        gold.append(score)
        if limit is not None and len(gold) >= limit:
            break
    if not gold:
        raise CalibrationError(f"no scored sentence pairs in {path} (an STS-B file has tab-separated "
                               "columns with the score in the 5th and the two sentences in the 6th and 7th)")
    return s1, s2, np.asarray(gold)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's rho requires)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays."""
    ra, rb = _average_ranks(np.asarray(a, float)), _average_ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding: `hidden` (batch × tokens × width) averaged over the tokens `mask` marks."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens) last hidden states, float32 on the CPU, in the order of
    `sentences`; batched by length (characters), so that little of a batch is padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer([sentences[j] for j in order[i : i + batch_size]], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        chunks.append(mean_pool(hidden, enc["attention_mask"]).float().cpu())
    if not chunks:
        return torch.empty(0)
    return torch.cat(chunks)[torch.argsort(torch.tensor(order))]


def stsb_spearman(model: nn.Module, tokenizer, csv_path: str | os.PathLike, limit: int | None = None,
                  batch_size: int = 64) -> float:
    """STS-B Spearman of cosine similarity between mean-pooled embeddings and gold scores."""
    s1, s2, gold = read_stsb(csv_path, limit)
    e1, e2 = embed(model, tokenizer, s1, batch_size), embed(model, tokenizer, s2, batch_size)
    cos = torch.nn.functional.cosine_similarity(e1, e2).numpy()
    return spearman(cos, gold)


def read_chunks(path: str | os.PathLike, max_chunks: int | None = None) -> list[str]:
    """Blank-line separated chunks of a text file."""
    text = read_text(path, "--eval file", error=CalibrationError)
    chunks = [c.strip() for c in text.split("\n\n") if c.strip()]
    return chunks[:max_chunks] if max_chunks else chunks


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text_path: str | os.PathLike, max_chunks: int | None = 300,
               batch_size: int = 16, max_length: int | None = None) -> float:
    """Perplexity over blank-line chunks, each scored on its own with BOS prepended."""
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config, "max_position_embeddings", 512) or 512
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = [(bos + tokenizer(c, add_special_tokens=False)["input_ids"])[:max_length]
            for c in read_chunks(text_path, max_chunks)]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise CalibrationError(f"no text to score in {text_path}")
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, s in enumerate(batch):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        valid = mask[:, 1:].bool()
        total_nll += float(nll[valid].sum())
        total_tokens += int(valid.sum())
    return math.exp(total_nll / total_tokens)


def check_eval_file(path: str | os.PathLike) -> Path:
    """`--eval` input: an existing file (STS-B .tsv/.csv for encoders, plain text for decoders)."""
    path = Path(path)
    open_regular(path, "--eval file", error=ConfigError).close()  # exists, and is a regular file
    return path


def check_eval_data(path: str | os.PathLike, family: Family) -> None:
    """Read `--eval` data once before any work, so a wrong file fails in a second, not after
    compression: encoders need scored STS-B pairs, decoders non-empty text."""
    if family.causal:
        if not read_chunks(path, 1):
            raise CalibrationError(f"no text to score in {path}")
    else:
        read_stsb(path)


def task_score(model: nn.Module, tokenizer, family: Family, path: str | os.PathLike) -> tuple[str, float]:
    """(name, value) of the family's task score of `model` on `path`: STS-B Spearman of mean-pooled
    embeddings for encoders (an STS-B tab-separated file), perplexity for decoders (plain text,
    blank-line separated chunks)."""
    model = model.eval()
    score = perplexity(model, tokenizer, path) if family.causal else stsb_spearman(model, tokenizer, path)
    return family.task_score, round(score, 4)


@torch.no_grad()
def agreement_with_dense(dense: nn.Module, model: nn.Module, batch, family: Family) -> dict[str, float]:
    """Quality proxy on held-out calibration text, named by the family's `quality_proxy`. Encoders:
    Spearman correlation between the dense and the compressed model's pairwise cosine similarities
    of mean-pooled embeddings (what an embedding model is used for; raw embedding cosine is
    dominated by a shared direction). Decoders: agreement of the next-token argmax with the dense model."""
    ids, mask = batch.input_ids, batch.attention_mask
    if family.causal:
        a = dense(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        b = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        return {family.quality_proxy: round(float((a == b)[mask.bool()].float().mean()), 4)}

    def similarities(m):
        e = torch.nn.functional.normalize(mean_pool(m(input_ids=ids, attention_mask=mask).last_hidden_state, mask),
                                          dim=-1)
        iu = torch.triu_indices(len(e), len(e), offset=1)
        return (e @ e.T)[iu[0], iu[1]].double().numpy()

    return {family.quality_proxy: round(float(spearman(similarities(dense), similarities(model))), 4)}
