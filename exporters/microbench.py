"""onnxruntime micro-benchmark of dense versus factorized Linear layers at a model's shapes, cached per host/EP/version."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgesvd.costmodel import LayerShape, LayerTable, candidate_ranks
from edgesvd.reporting import SILENT, Reporter

from .calibrate_device import host_id, time_linear


def cache_dir() -> Path:
    """~/.cache/edgesvd/microbench (or $EDGESVD_CACHE_DIR/microbench)."""
    root = os.environ.get("EDGESVD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "edgesvd")
    return Path(root) / "microbench"


def cache_file(provider: str) -> Path:
    """One JSON file per host, execution provider and onnxruntime version."""
    import onnxruntime as ort

    return cache_dir() / f"{host_id()}-{provider}-ort{ort.__version__}.json"


def ranks_to_time(shape: LayerShape, multiple: int, max_points: int = 12) -> list[int]:
    """Candidate ranks to measure: all of them when few, else `max_points` spread evenly (the
    cost model interpolates between them)."""
    ranks = candidate_ranks(shape, multiple)
    if len(ranks) <= max_points:
        return ranks
    idx = np.unique(np.round(np.linspace(0, len(ranks) - 1, max_points)).astype(int))
    return [ranks[i] for i in idx]


def measure_layers(shapes: list[LayerShape], tokens: int, multiple: int, provider: str = "CPUExecutionProvider",
                   threads: int = 0, precision: str = "fp32", max_points: int = 12, runs: int = 30,
                   use_cache: bool = True, reporter: Reporter = SILENT) -> LayerTable:
    """Time every distinct layer shape dense and at its candidate ranks under onnxruntime.

    Returns (out, in, rank|None) → (p50 ms, p90 ms) at `tokens` input rows. Timings already in
    the cache for this host, provider, onnxruntime version, token count, threads and precision
    are reused, so a second plan on the same machine costs nothing.
    """
    path = cache_file(provider)
    cache: dict[str, list[float]] = {}
    if use_cache and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}  # a damaged cache is re-measured, not trusted
    table: LayerTable = {}
    fresh = 0
    seen = set()
    for shape in shapes:
        if (shape.key, shape.bias) in seen:
            continue
        seen.add((shape.key, shape.bias))
        for rank in [None, *ranks_to_time(shape, multiple, max_points)]:
            ck = f"{tokens}|{shape.out_features}|{shape.in_features}|{rank}|{int(shape.bias)}|{precision}|{threads}"
            if ck not in cache:
                cache[ck] = list(time_linear(tokens, shape.in_features, shape.out_features, rank, provider,
                                             threads, precision, shape.bias, runs))
                fresh += 1
            table[(shape.out_features, shape.in_features, rank)] = tuple(cache[ck])
    if fresh and use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, path)
    reporter.info(f"micro-benchmark: {len(table)} layer timings ({fresh} measured, {len(table) - fresh} from {path})")
    return table
