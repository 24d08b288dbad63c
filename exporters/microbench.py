"""onnxruntime micro-benchmark of dense versus factorized Linear layers at a model's shapes, cached only while it stays true.

A timing table plans ranks only through its relative structure (the cost model ties it to the
whole model measured in the same session), but one taken during a burst of load elsewhere, or on
another CPU or onnxruntime, would still mislead every plan made from it. So:

- the cache is keyed by what changes timings: CPU model, cores, execution provider, threads,
  onnxruntime version, precision and token count (the shapes are the entries inside);
- every entry is timed in rounds interleaved with all the others, and an entry set is rejected
  when identical shapes timed in the first and the second half of the rounds disagree by more
  than TOLERANCE (for more than a tenth of its entries: the load changed while it was measured):
  it is re-timed, and if it never agrees it serves only the run that made it and is not cached;
- every run re-times a few probe entries first and drops the cache when they drifted by more than
  TOLERANCE since it was made (another load, a BIOS or governor change, a noisy neighbour gone);
- each entry records when and under what load average it was made;
- `edgesvd calibrate-device --refresh` rebuilds every cache of this machine.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgesvd.costmodel import LayerShape, LayerTable, candidate_ranks
from edgesvd.factorize import params_at
from edgesvd.reporting import SILENT, Reporter

from .calibrate_device import linear_model, make_session

TOLERANCE = 0.25      # largest relative disagreement of repeated timings of an identical shape that is trusted
TRUSTED = 0.90        # ... for at least this share of the entries of a set
ROUNDS = 8            # rounds per entry set: each times every entry RUNS times
RUNS = 5
ATTEMPTS = 3          # entry sets timed before giving up on a consistent one
PROBES = 3            # entries re-timed on every run to detect drift
GROUP_BYTES = 1 << 30  # weights held by the sessions of one interleaved group


@dataclass(frozen=True)
class Entry:
    """One timed layer: an out×in weight at `rank` (None: dense), in the pivoted form or not, no bias
    (factorization leaves the bias add alone, so it belongs to the untouched part of the model)."""

    out_features: int
    in_features: int
    rank: int | None
    pivoted: bool = False

    @property
    def key(self) -> str:
        return f"{self.out_features}|{self.in_features}|{self.rank}" + ("|pivoted" if self.pivoted else "")

    @classmethod
    def parse(cls, key: str) -> "Entry":
        out, inp, rank, *form = key.split("|")
        return cls(int(out), int(inp), None if rank == "None" else int(rank), form == ["pivoted"])

    @property
    def weight_bytes(self) -> int:
        return 4 * params_at(self.out_features, self.in_features, self.rank, self.pivoted)


# A timer runs one round: `runs` timed runs (ms) of every entry in turn. OrtTimer is the real one;
# tests inject timings through the same interface.
Timer = Callable[[list[Entry], int], list[list[float]]]


class OrtTimer:
    """Times Linear layers under onnxruntime at `tokens` input rows: one session per entry, made on
    first use (with one untimed run) and kept for the following rounds."""

    def __init__(self, tokens: int, provider: str = "CPUExecutionProvider", threads: int = 0,
                 precision: str = "fp32") -> None:
        self.tokens, self.provider, self.threads, self.precision = tokens, provider, threads, precision
        self._sessions: dict[Entry, tuple] = {}

    def _session(self, e: Entry):
        if e not in self._sessions:
            sess = make_session(linear_model(e.in_features, e.out_features, e.rank, self.precision, bias=False,
                                             pivoted=e.pivoted),
                                self.provider, self.threads)
            dtype = np.float16 if self.precision == "fp16" else np.float32
            feed = {"x": np.random.default_rng(1).standard_normal((self.tokens, e.in_features)).astype(dtype)}
            sess.run(None, feed)
            self._sessions[e] = (sess, feed)
        return self._sessions[e]

    def __call__(self, entries: list[Entry], runs: int) -> list[list[float]]:
        import time

        out = []
        for e in entries:
            sess, feed = self._session(e)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t) * 1e3)
            out.append(times)
        return out

    def close(self) -> None:
        self._sessions.clear()


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class EntrySet:
    """Entries timed together in interleaved rounds: per entry the fastest run of every round (one
    that no other process interrupted: on a loaded machine a preempted thread stalls a MatMul for a
    whole time slice, and the cost model needs the work, not the stalls), the p90 of all its runs,
    and the load average before and after."""

    rounds: dict[Entry, list[float]]
    p90: dict[Entry, float]
    load: tuple[float, float]
    made: str = field(default_factory=_now)

    def p50(self, e: Entry) -> float:
        """The entry's time: the median over rounds of each round's fastest run."""
        return float(np.median(self.rounds[e]))

    def disagreement(self, e: Entry) -> float:
        """Relative disagreement of the entry's timings in the first and second half of the rounds."""
        r = self.rounds[e]
        half = len(r) // 2
        if half == 0:
            return 0.0
        a, b = float(np.median(r[:half])), float(np.median(r[half:]))
        return abs(a - b) / min(a, b)

    def worst(self) -> tuple[Entry, float]:
        """The set's disagreement: the entry at the TRUSTED quantile of disagreement (one odd entry
        among forty does not condemn a set; a tenth of them does) and its value."""
        ranked = sorted(self.rounds, key=self.disagreement)
        e = ranked[min(int(np.ceil(TRUSTED * len(ranked))) - 1, len(ranked) - 1)]
        return e, self.disagreement(e)


def time_entries(entries: list[Entry], timer: Timer, rounds: int = ROUNDS, runs: int = RUNS) -> EntrySet:
    """Time `entries` in `rounds` interleaved rounds (each round starts one entry further on, so no
    entry always runs first), in groups of at most GROUP_BYTES of weights. Every group also times
    the first entry, so the set holds repeated timings of an identical shape across groups too."""
    load0 = _load()
    groups: list[list[Entry]] = [[]]
    for e in entries:
        if groups[-1] and sum(x.weight_bytes for x in groups[-1]) + e.weight_bytes > GROUP_BYTES:
            groups.append([entries[0]])
        groups[-1].append(e)
    per_round: dict[Entry, list[float]] = {e: [] for e in entries}
    samples: dict[Entry, list[float]] = {e: [] for e in entries}
    for group in groups:
        for r in range(rounds):
            order = group[r % len(group):] + group[:r % len(group)]
            for e, times in zip(order, timer(order, runs)):
                per_round[e].append(float(np.min(times)))
                samples[e] += times
    return EntrySet(per_round, {e: float(np.percentile(samples[e], 90)) for e in entries}, (load0, _load()))


def consistent_set(entries: list[Entry], timer: Timer, reporter: Reporter = SILENT, attempts: int = ATTEMPTS
                   ) -> tuple[EntrySet, bool]:
    """An entry set whose repeated timings agree within TOLERANCE, timed up to `attempts` times;
    (the most consistent set, whether it agrees)."""
    best = None
    for attempt in range(1, attempts + 1):
        s = time_entries(entries, timer)
        worst, by = s.worst()
        if by <= TOLERANCE:
            return s, True
        reporter.info(f"micro-benchmark: repeated timings of {worst.out_features}×{worst.in_features} "
                      f"{'dense' if worst.rank is None else f'rank {worst.rank}'} disagree by {100 * by:.0f}% "
                      f"(load average {s.load[1]:.2f}); set {attempt}/{attempts} rejected")
        if best is None or by < best.worst()[1]:
            best = s
    return best, False


# -- the cache ------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """~/.cache/edgesvd/microbench (or $EDGESVD_CACHE_DIR/microbench)."""
    root = os.environ.get("EDGESVD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "edgesvd")
    return Path(root) / "microbench"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(tokens: int, provider: str, threads: int, precision: str) -> dict:
    """Everything a cached timing depends on besides the shape itself."""
    import onnxruntime as ort

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"cpu": cpu_model(), "machine": platform.machine(), "cores": cores, "provider": provider,
            "threads": threads, "onnxruntime": ort.__version__, "precision": precision, "tokens": tokens}


def cache_file(fp: dict) -> Path:
    """One JSON file per fingerprint."""
    digest = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    cpu = re.sub(r"[^a-z0-9]+", "-", fp["cpu"].lower()).strip("-")[:40]
    return cache_dir() / f"{cpu}-{fp['provider'].replace('ExecutionProvider', '').lower()}-{digest}.json"


def _read_cache(path: Path, fp: dict) -> dict:
    """The cache at `path` if it is readable and made for `fp`, else an empty one (a damaged or
    foreign cache is re-measured, not trusted)."""
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") == fp and isinstance(data.get("entries"), dict):
            return data
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return {"fingerprint": fp, "entries": {}, "probes": []}


def _write_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _record(s: EntrySet, entries: list[Entry]) -> dict:
    return {e.key: {"p50_ms": s.p50(e), "p90_ms": s.p90[e], "made": s.made, "load_average": round(s.load[1], 2)}
            for e in entries}


def choose_probes(entries: list[Entry], count: int = PROBES) -> list[Entry]:
    """Probe entries: the dense layer of the largest and smallest shapes and a factorized one in
    between, so drift in big and small MatMuls both show."""
    dense = sorted((e for e in entries if e.rank is None), key=lambda e: e.weight_bytes)
    factorized = sorted((e for e in entries if e.rank is not None), key=lambda e: e.weight_bytes)
    chosen = [dense[-1]] if dense else []
    if factorized:
        chosen.append(factorized[len(factorized) // 2])
    if len(dense) > 1:
        chosen.append(dense[0])
    return chosen[:count]


def drift(data: dict, timer: Timer) -> tuple[Entry, float] | None:
    """Re-time the cache's probes now; (probe, relative drift) of the one that moved most."""
    probes = [Entry.parse(k) for k in data.get("probes", []) if k in data["entries"]]
    if not probes:
        return None
    now = time_entries(probes, timer)
    moved = {p: now.p50(p) / data["entries"][p.key]["p50_ms"] - 1 for p in probes}
    worst = max(moved, key=lambda p: abs(moved[p]))
    return worst, moved[worst]


# -- what the planner asks for ----------------------------------------------------------------------
def ranks_to_time(shape: LayerShape, multiple: int, max_points: int = 12) -> list[int]:
    """Candidate ranks to measure: all of them when few, else `max_points` spread evenly (the
    cost model interpolates between them)."""
    ranks = candidate_ranks(shape, multiple)
    if len(ranks) <= max_points:
        return ranks
    idx = np.unique(np.round(np.linspace(0, len(ranks) - 1, max_points)).astype(int))
    return [ranks[i] for i in idx]


@dataclass
class Bench:
    """A layer table and where it came from (recorded in the bundle's manifest)."""

    table: LayerTable
    info: dict


def measure_layers(shapes: list[LayerShape], tokens: int, multiple: int, provider: str = "CPUExecutionProvider",
                   threads: int = 0, precision: str = "fp32", max_points: int = 12, use_cache: bool = True,
                   timer: Timer | None = None, reporter: Reporter = SILENT) -> Bench:
    """Time every distinct layer shape dense and at its candidate ranks (rank None: dense), in the
    shape's form.

    Returns (out, in, rank|None, pivoted) → (p50 ms, p90 ms) at `tokens` input rows, and its provenance.
    Cached timings are reused only after the probes, re-timed now, agree with them.
    """
    fp = fingerprint(tokens, provider, threads, precision)
    own_timer = timer is None
    timer = timer or OrtTimer(tokens, provider, threads, precision)
    needed = list(dict.fromkeys(Entry(s.out_features, s.in_features, r, s.pivoted and r is not None) for s in shapes
                                for r in [None, *ranks_to_time(s, multiple, max_points)]))
    path = cache_file(fp)
    data = _read_cache(path, fp) if use_cache else {"fingerprint": fp, "entries": {}, "probes": []}
    info = {"cache": str(path), "fingerprint": fp, "tolerance": TOLERANCE}
    try:
        if data["entries"]:
            moved = drift(data, timer)
            if moved is not None and abs(moved[1]) > TOLERANCE:
                probe, by = moved
                made = data["entries"][probe.key]
                reporter.info(f"micro-benchmark cache dropped: probe {probe.out_features}×{probe.in_features} "
                              f"{'dense' if probe.rank is None else f'rank {probe.rank}'} is {100 * by:+.0f}% "
                              f"since {made['made']} (load average then {made['load_average']}, now {_load():.2f})")
                info["invalidated"] = {"probe": probe.key, "drift": by, "made": made["made"]}
                data = {"fingerprint": fp, "entries": {}, "probes": []}
            elif moved is not None:
                info["probe_drift"] = moved[1]
        missing = [e for e in needed if e.key not in data["entries"]]
        fresh: dict = {}
        if missing:
            s, agrees = consistent_set(missing, timer, reporter)
            fresh = _record(s, missing)
            info["measured"] = {"entries": len(missing), "made": s.made, "load_average": [round(x, 2) for x in s.load],
                                "disagreement": s.worst()[1], "cached": agrees and use_cache}
            if agrees and use_cache:
                data["entries"].update(fresh)
                if not data["probes"]:
                    data["probes"] = [p.key for p in choose_probes(needed)]
                _write_cache(path, data)
    finally:
        if own_timer:
            timer.close()
    rows = {**data["entries"], **fresh}
    table: LayerTable = {(e.out_features, e.in_features, e.rank, e.pivoted): (rows[e.key]["p50_ms"], rows[e.key]["p90_ms"])
                         for e in needed}
    cached = len(needed) - len(missing)
    info.update(entries=len(needed), from_cache=cached)
    made = sorted({rows[e.key]["made"] for e in needed})
    reporter.info(f"micro-benchmark: {len(needed)} layer timings ({len(missing)} measured now, {cached} from the cache"
                  + (f" made {made[0]}" if cached else "") + ")"
                  + ("" if not missing or info["measured"]["cached"] else
                     f"; not cached: repeated timings disagree by {100 * info['measured']['disagreement']:.0f}%"
                     f" (load average {info['measured']['load_average'][1]})"))
    return Bench(table, info)


def refresh_caches(reporter: Reporter = SILENT) -> list[dict]:
    """`edgesvd calibrate-device --refresh`: re-time every entry of every cache made on this
    machine (same CPU and onnxruntime) as one fresh set; a set whose timings never agree is
    removed rather than kept. One summary per cache file."""
    import onnxruntime as ort

    out = []
    for path in sorted(cache_dir().glob("*.json")) if cache_dir().is_dir() else []:
        try:
            fp = json.loads(path.read_text())["fingerprint"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
        if fp.get("cpu") != cpu_model() or fp.get("onnxruntime") != ort.__version__:
            continue
        data = _read_cache(path, fp)
        entries = [Entry.parse(k) for k in sorted(data["entries"])]
        if not entries:
            continue
        reporter.step(f"re-timing {len(entries)} entries of {path.name} ({fp['tokens']} tokens, {fp['precision']}, "
                      f"{fp['threads'] or 'all'} threads)")
        timer = OrtTimer(fp["tokens"], fp["provider"], fp["threads"], fp["precision"])
        try:
            s, agrees = consistent_set(entries, timer, reporter)
        finally:
            timer.close()
        summary = {"cache": str(path), "entries": len(entries), "made": s.made, "load_average": s.load[1],
                   "disagreement": s.worst()[1], "kept": agrees}
        if agrees:
            _write_cache(path, {"fingerprint": fp, "entries": _record(s, entries),
                                "probes": data["probes"] or [p.key for p in choose_probes(entries)]})
        else:
            path.unlink()
        out.append(summary)
    return out
