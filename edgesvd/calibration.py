"""Calibration text: the built-in corpus, files, folders or the decoder's own samples, cut into token sequences."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from .errors import CalibrationError
from .families import Family
from .inputs import read_text

# Named sources (anything else is a file or folder path).
# builtin: natural modern English prose shipped in the package (edgesvd/corpus/natural_en.txt, 940 kB:
# the World Factbook, OpenStax Principles of Economics, African Storybook stories; public domain and
# CC BY, attribution in edgesvd/corpus/ATTRIBUTION.md). On MiniLM it calibrates as well as Wikipedia
# sentences and far better than the docstrings (STS-B at keep 0.5, learned: 0.857 vs 0.851 vs 0.812).
BUILTIN = "builtin"
# docstrings: English prose from the Python standard library's docstrings (no file: read from the
# running Python). Technical text, for models that serve code or documentation; general models
# calibrate better on `builtin`.
DOCSTRINGS = "docstrings"
# self: a decoder samples its own calibration text (seeded), for teams without data at hand or whose
# data may not leave the device; on stories260K it beats every corpus tried (6.02 vs 6.99 perplexity
# with natural prose at the same recipe, keep 0.8).
SELF = "self"
NAMED_SOURCES = (BUILTIN, DOCSTRINGS, SELF)
_TEXT_SUFFIXES = {".txt", ".text", ".md", ".tokens", ".utf8", ".raw", ""}
_JSONL_SUFFIXES = {".jsonl", ".json"}
# At most this many bytes are read from each --calib source (a file, or a folder's files together,
# in name order): calibration uses about 100 kB of text, and a huge corpus must not fill memory.
MAX_SOURCE_BYTES = 64 << 20
# Characters of a text tokenized to find its first N tokens: N × this, more only when that is not
# enough; a token of real text rarely spans 16 characters, so a huge line is never tokenized whole.
_CHARS_PER_TOKEN = 16
# Time guard on the default number of sequences: sampling them (self) and the statistics pass cost
# about tokens × parameters; past this product the default count shrinks (never below
# MIN_DEFAULT_SEQUENCES). It does not bind on MiniLM (512 × 128 × 23 M = 1.5e12) nor stories260K;
# it keeps a 135 M LLM at about 230 self-sampled sequences instead of 2,048 (not measured for quality).
CALIBRATION_WORK_CAP = 4e12
MIN_DEFAULT_SEQUENCES = 128
# Self-sampling runs this many sequences at a time (with the KV cache).
_SAMPLE_BATCH = 64

_DOCSTRING_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections concurrent.futures configparser "
    "contextlib copy csv dataclasses datetime decimal difflib email enum fractions functools gettext "
    "glob gzip hashlib heapq hmac html http.client http.server imaplib inspect io ipaddress itertools "
    "json logging mailbox mimetypes multiprocessing numbers operator optparse os pathlib pickle pkgutil "
    "platform plistlib poplib pprint queue random re sched secrets selectors shelve shlex shutil signal "
    "smtplib socket socketserver sqlite3 ssl statistics string struct subprocess tarfile tempfile "
    "textwrap threading timeit tokenize traceback types typing unittest urllib.parse urllib.request "
    "uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zoneinfo"
).split()


@dataclass(frozen=True)
class CalibrationConfig:
    """How many sequences of how many tokens to sample, from where, with which seed.

    source: 'builtin', 'docstrings', 'self', a file or folder, or several of these (not 'self');
    None or () is the family's default ('builtin' for encoders, 'self' for decoders).
    num_sequences: None is the family's default (see `default_sequences`).
    temperature: of the decoder's own sampling (`self`); 1.0 samples the model's distribution.
    """

    source: str | Sequence[str] | None = None
    num_sequences: int | None = None
    seq_len: int = 128
    seed: int = 0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.num_sequences is not None and self.num_sequences < 1:
            raise CalibrationError(f"number of calibration sequences must be >= 1, got {self.num_sequences}")
        if self.seq_len < 4:
            raise CalibrationError(f"calibration sequence length must be >= 4, got {self.seq_len}")
        if not self.temperature > 0:
            raise CalibrationError(f"calibration sampling temperature must be > 0, got {self.temperature}")
        sources = self.sources()
        if SELF in sources and len(sources) > 1:
            raise CalibrationError("--calib self cannot be combined with other calibration sources")

    def sources(self) -> tuple[str, ...]:
        """The sources as given; () means the family's default."""
        if self.source is None:
            return ()
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)

    def paths(self) -> tuple[str, ...]:
        """The sources that are files or folders (what an output folder must not overlap)."""
        return tuple(s for s in self.sources() if s not in NAMED_SOURCES)


def calibration_config(calib: "CalibrationConfig | str | os.PathLike | Sequence[str] | None") -> "CalibrationConfig":
    """A CalibrationConfig from what a caller passes: a config, None (the family's default), one
    source ('builtin', 'docstrings', 'self', a file or folder) or several sources (default sampling)."""
    if isinstance(calib, CalibrationConfig):
        return calib
    if calib is None:
        return CalibrationConfig()
    if isinstance(calib, (str, os.PathLike)):
        return CalibrationConfig(str(calib))
    return CalibrationConfig(tuple(str(c) for c in calib))


@dataclass
class CalibrationBatch:
    """Token ids and attention mask, shape (N, L); padding positions have mask 0."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    summary: dict

    def batches(self, batch_size: int, by_length: bool = False):
        """Yield (input_ids, attention_mask) of at most `batch_size` sequences each (`rows`).
        by_length: sequences of similar length together, for passes that sum over the whole set; else
        in order."""
        for index in self.index_batches(batch_size, by_length):
            yield self.rows(index)

    def index_batches(self, batch_size: int, by_length: bool = False) -> list[torch.Tensor]:
        """The sequences' indices cut into batches of at most `batch_size`, in order or by length.
        Sentences pad to the longest of 512 (MiniLM: 27 tokens on average, 119 at most): padded
        together, three quarters of a pass's compute would go to padding."""
        n = self.input_ids.shape[0]
        order = torch.argsort(self.attention_mask.sum(1), stable=True) if by_length else torch.arange(n)
        return list(order.split(batch_size))

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences `index` without the trailing columns that are padding in all of them: no token
        moves, so the outputs are the same (windows have no padding, left padding leaves none to drop)."""
        ids, mask = self.input_ids[index], self.attention_mask[index]
        used = mask.any(0).nonzero()
        width = int(used[-1]) + 1 if used.numel() else ids.shape[1]
        return ids[:, :width], mask[:, :width]


def builtin_documents() -> list[str]:
    """The built-in corpus: documents of natural English prose shipped with the package (file order)."""
    path = files("edgesvd") / "corpus" / "natural_en.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:  # an installation without its package data
        raise CalibrationError(f"the built-in calibration corpus is missing from this installation ({path})") from exc
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def docstring_documents() -> list[str]:
    """Paragraphs of English prose from the standard library's docstrings (deterministic order)."""
    docs: list[str] = []
    seen: set[str] = set()
    for mod_name in _DOCSTRING_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # a module missing from a slim Python build is simply skipped
            continue
        objects = [mod] + [obj for _, obj in sorted(vars(mod).items()) if inspect.isclass(obj) or inspect.isfunction(obj)]
        for obj in objects:
            with warnings.catch_warnings():  # deprecated aliases (typing.io) warn on attribute access
                warnings.simplefilter("ignore")
                doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                # Keep prose, skip signatures, code examples and one-word stubs.
                if len(para) >= 80 and ">>>" not in para and para not in seen:
                    seen.add(para)
                    docs.append(para)
    return docs


def _read_file(path: Path, limit: int) -> tuple[list[str], int]:
    """The documents of one file and the bytes read: a regular file, UTF-8 (anything else is refused,
    not decoded with replacement characters that would calibrate on noise), at most `limit` bytes."""
    raw = read_text(path, "calibration file", limit=limit, error=CalibrationError)
    used = len(raw.encode("utf-8"))
    if used >= limit and path.suffix.lower() in _JSONL_SUFFIXES:
        raw = raw[: raw.rfind("\n") + 1]  # cut at the cap: the last record is incomplete
    if path.suffix.lower() in _JSONL_SUFFIXES:
        docs = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CalibrationError(f"{path}:{lineno}: JSONL record has no string 'text' field")
            docs.append(text)
        return docs, used
    # Plain text: blank-line separated paragraphs are documents.
    return [p.strip() for p in raw.split("\n\n") if p.strip()], used


def read_documents(source: str | Sequence[str]) -> list[str]:
    """Documents from the built-in or docstring corpus, or from text/JSONL files and folders of them."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise CalibrationError("no calibration source given")
    docs: list[str] = []
    for src in sources:
        if src == BUILTIN:
            docs.extend(builtin_documents())
            continue
        if src == DOCSTRINGS:
            docs.extend(docstring_documents())
            continue
        if src == SELF:
            raise CalibrationError("--calib self is sampled from the model, not read")
        path = Path(src).expanduser()
        if not path.exists():
            raise CalibrationError(f"calibration source does not exist: {path}")
        if path.is_dir():  # every entry named like text is read: a pipe or device there is refused
            files = sorted(p for p in path.rglob("*") if not p.is_dir()
                           and p.suffix.lower() in _TEXT_SUFFIXES | _JSONL_SUFFIXES)
            if not files:
                raise CalibrationError(f"no .txt or .jsonl files in calibration folder {path}")
        else:
            files = [path]
        budget = MAX_SOURCE_BYTES
        for f in files:
            if budget <= 0:
                break
            found, used = _read_file(f, budget)
            docs.extend(found)
            budget -= used
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"calibration source {', '.join(map(str, sources))} contains no text")
    return docs


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(docs: list[str], min_words: int = 4) -> list[str]:
    """Lines of the documents split after '.', '!' or '?'; markup lines and fragments under
    `min_words` words (titles) are dropped unless nothing else is left."""
    pieces = [p.strip() for d in docs for line in d.splitlines() for p in _SENTENCE_END.split(line) if p.strip()]
    pieces = [p for p in pieces if not (p.startswith("<") and p.endswith(">"))]  # <doc …> markup lines
    long_enough = [p for p in pieces if len(p.split()) >= min_words]
    return long_enough or pieces


def _head(tokenizer, text: str, tokens: int) -> str:
    """The start of `text` that holds more than `tokens` tokens (all of it when shorter): only what
    is used is tokenized, so one 17 MB line costs a few kB of tokenizer work, not gigabytes."""
    limit = max(tokens, 1) * _CHARS_PER_TOKEN
    while len(text) > limit:
        head = text[:limit]
        # max_length: counting needs no more, and keeps transformers from warning about long input
        if len(tokenizer(head, add_special_tokens=False, truncation=True, max_length=tokens + 1)["input_ids"]) > tokens:
            return head
        limit *= 4
    return text


def _windows(tokenizer, docs: list[str], count: int, seq_len: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of `seq_len` tokens cut at random from the concatenated token stream (documents
    in random order, BOS before and EOS after each): what a decoder sees in training."""
    stream: list[int] = []
    order = list(range(len(docs)))
    rng.shuffle(order)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    needed = count * seq_len * 2
    for i in order:
        text = _head(tokenizer, docs[i], needed - len(stream))
        stream.extend(bos + tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
        if len(stream) >= needed:
            break
    if len(stream) < 2:
        raise CalibrationError("calibration text tokenizes to fewer than 2 tokens")
    length = min(seq_len, len(stream))
    starts = [rng.randrange(0, len(stream) - length + 1) for _ in range(count)]
    ids = torch.tensor([stream[s : s + length] for s in starts], dtype=torch.long)
    return ids, torch.ones_like(ids)


def _sentences(tokenizer, docs: list[str], count: int, seq_len: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Single sentences, truncated and padded: what a sentence encoder sees (on MiniLM, whitening
    calibrated on sentences scores 0.838 on STS-B at keep 0.5, against 0.813 when calibrated on
    the first 128 tokens of whole paragraphs)."""
    units = sentences(docs)
    picks = [_head(tokenizer, units[rng.randrange(len(units))], seq_len) for _ in range(count)]
    enc = tokenizer(picks, truncation=True, max_length=seq_len, padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ids.masked_fill(mask == 0, pad_id), mask


_SAMPLERS = {"window": _windows, "sentence": _sentences}


@torch.no_grad()
def self_sample(model, tokenizer, count: int, seq_len: int, seed: int, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` sequences of `seq_len` tokens sampled by the decoder itself: each starts at BOS (EOS
    when the tokenizer has no BOS) and continues by plain sampling at `temperature` (no top-k or
    top-p; past an end-of-text token it goes on, as a window of a token stream would). Sampled on
    the CPU from a generator seeded with `seed`, `_SAMPLE_BATCH` sequences at a time with the KV
    cache: the same seed gives the same tokens."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("--calib self needs a tokenizer with a BOS or EOS token to start sampling from")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for first in range(0, count, _SAMPLE_BATCH):
        n = min(_SAMPLE_BATCH, count - first)
        tokens = [torch.full((n, 1), start, dtype=torch.long)]
        past, step_in = None, tokens[0]
        for _ in range(seq_len - 1):
            out = model(input_ids=step_in.to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float().cpu() / temperature, dim=-1)
            step_in = torch.multinomial(probs, 1, generator=gen)
            tokens.append(step_in)
        chunks.append(torch.cat(tokens, dim=1))
    model.train(was_training)
    ids = torch.cat(chunks)
    return ids, torch.ones_like(ids)


def default_sequences(family: Family, params: int, seq_len: int) -> int:
    """The number of calibration sequences when none is asked for: the family's (what its recipe
    was measured with), fewer for models so large that sampling and statistics would take too long
    (CALIBRATION_WORK_CAP), never below MIN_DEFAULT_SEQUENCES."""
    affordable = int(CALIBRATION_WORK_CAP // max(1, seq_len * params))
    return min(family.default_calibration, max(MIN_DEFAULT_SEQUENCES, affordable))


def sample_calibration(tokenizer, config: CalibrationConfig, family: Family, model=None,
                       params: int | None = None) -> CalibrationBatch:
    """Sample `num_sequences` sequences of at most `seq_len` tokens, in the family's unit, from the
    configured source (or the family's default); `self` samples them from `model` (a decoder).
    `params`: the model's size when `model` is not given (it sets the default number of sequences)."""
    sources = config.sources() or (family.default_calibration_source,)
    source = sources[0] if len(sources) == 1 else list(sources)
    if params is None:
        params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    count = config.num_sequences or default_sequences(family, params, config.seq_len)
    rng = random.Random(config.seed)
    if source == SELF:
        if not family.causal:
            raise CalibrationError(f"--calib self samples text from a decoder; {family.name} models calibrate on "
                                   f"text (--calib builtin, or a file or folder of your own)")
        if model is None:
            raise CalibrationError("--calib self needs the model to sample from")
        ids, mask = self_sample(model, tokenizer, count, config.seq_len, config.seed, config.temperature)
        summary = {"source": SELF, "temperature": config.temperature}
    else:
        docs = read_documents(source)
        ids, mask = _SAMPLERS[family.calibration_unit](tokenizer, docs, count, config.seq_len, rng)
        summary = {"source": source, "documents": len(docs)}
    summary.update({
        "num_sequences": int(ids.shape[0]),
        "seq_len": config.seq_len,
        "tokens": int(mask.sum()),
        "seed": config.seed,
    })
    return CalibrationBatch(ids, mask, summary)
