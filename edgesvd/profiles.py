"""Hardware profiles: load, validate and resolve the TOML files that describe a device and its budgets."""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ConfigError
from .families import Family
from .host import this_cpu, this_gpu
from .inputs import read_toml, require_finite, validate
from .units import BYTES_PER_PARAM, PRECISIONS, fmt_bytes

SCHEMA_VERSION = 1
BUDGET_KEYS = ("model_bytes", "peak_memory", "latency_p50", "latency_p90")
BUDGET_LABELS = {"model_bytes": "model bytes", "peak_memory": "peak memory", "latency_p50": "p50 latency",
                 "latency_p90": "p90 latency"}
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")

_NUM = {"type": "number", "exclusiveMinimum": 0}
_BUDGET = {"oneOf": [{"type": "number", "exclusiveMinimum": 0},
                     {"type": "string", "pattern": r"^\s*[0-9.]+\s*(%|[kKMG]i?B|B|ms|s)\s*$"}]}

# The documented schema: README's key table is generated from these descriptions.
SCHEMA: dict = {
    "type": "object",
    "additionalProperties": False,
    "required": ["schema_version", "name", "device", "runtime", "workload", "rank_multiple"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION, "description": "Version of this schema (1)."},
        "name": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]*$",
                 "description": "Short id used on the command line (`--profile NAME`)."},
        "description": {"type": "string", "description": "One line shown by `edgesvd profiles list`."},
        "rank_multiple": {"type": "integer", "minimum": 1,
                          "description": "Every rank is rounded to a multiple of this (8/16 CPU SIMD, 64 GPU tensor cores)."},
        "device": {
            "type": "object", "additionalProperties": False, "required": ["name", "kind", "source"],
            "properties": {
                "name": {"type": "string", "description": "Human name of the device."},
                "kind": {"enum": ["cpu", "gpu"], "description": "Processor that runs the model: cpu or gpu."},
                "measure": {"type": "boolean",
                            "description": "true: cores, memory, peak compute and bandwidth are measured on this machine at run time (the `host` profile)."},
                "cores": {"type": "integer", "minimum": 1, "description": "CPU cores (or GPU SMs) used."},
                "memory_gb": {**_NUM, "description": "Memory available to the model, GB (10^9 bytes)."},
                "peak_gflops": {**_NUM, "description": "Peak dense matrix throughput at the profile's precision, GFLOP/s."},
                "memory_bandwidth_gbs": {**_NUM, "description": "Peak memory bandwidth, GB/s."},
                "source": {"type": "string", "description": "The public specification the numbers come from (URL and what was read)."},
            },
            "if": {"not": {"properties": {"measure": {"const": True}}, "required": ["measure"]}},
            "then": {"required": ["cores", "memory_gb", "peak_gflops", "memory_bandwidth_gbs"]},
        },
        "runtime": {
            "type": "object", "additionalProperties": False, "required": ["execution_provider", "precision"],
            "properties": {
                "execution_provider": {"enum": list(PROVIDERS), "description": "onnxruntime execution provider."},
                "threads": {"type": "integer", "minimum": 0, "description": "Intra-op threads (0: all cores)."},
                "precision": {"enum": list(PRECISIONS), "description": "Weight precision: fp32, fp16, int8 or int4 (the export's; sets bytes per parameter)."},
                "efficiency": {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                               "description": "Fraction of peak compute and bandwidth a real kernel reaches (estimate only; default 0.5)."},
                "op_overhead_us": {"type": "number", "minimum": 0,
                                   "description": "Fixed cost of launching one operator, µs (estimate only; default 2 CPU, 8 GPU)."},
                "overhead_mb": {"type": "number", "minimum": 0,
                                "description": "Runtime memory beside weights and activations (session, arena, libraries), MB."},
            },
        },
        "workload": {
            "type": "object", "additionalProperties": False, "required": ["batch", "sequence_length"],
            "properties": {
                "batch": {"type": "integer", "minimum": 1, "description": "Sequences per forward pass."},
                "sequence_length": {"type": "integer", "minimum": 1, "description": "Tokens per sequence (encoders; decoders: the prompt when prompt_length is absent)."},
                "prompt_length": {"type": "integer", "minimum": 1, "description": "Decoders: prompt tokens (the timed prefill)."},
                "new_tokens": {"type": "integer", "minimum": 0, "description": "Decoders: generated tokens (sizes the KV cache)."},
            },
        },
        "budgets": {
            "type": "object", "additionalProperties": False,
            "description": "Limits the plan must meet; absolute ('48 MB', '20 ms', a number of bytes or ms) or relative to the dense model ('60%').",
            "properties": {
                "model_bytes": {**_BUDGET, "description": "Weights at the profile's precision (≈ bundle bytes)."},
                "peak_memory": {**_BUDGET, "description": "Weights + activations/KV cache at the workload + runtime overhead."},
                "latency_p50": {**_BUDGET, "description": "Median latency of one forward pass at the workload."},
                "latency_p90": {**_BUDGET, "description": "90th-percentile latency of one forward pass at the workload."},
            },
        },
        "measured": {
            "type": "object", "additionalProperties": False, "required": ["matmul"],
            "description": "Written by `edgesvd calibrate-device`: MatMul timings measured on the device.",
            "properties": {
                "host": {"type": "string", "description": "Machine the table was measured on."},
                "date": {"type": "string", "description": "When it was measured (ISO 8601)."},
                "onnxruntime": {"type": "string", "description": "onnxruntime version used."},
                "execution_provider": {"type": "string", "description": "Execution provider used."},
                "precision": {"enum": list(PRECISIONS), "description": "Precision of the timed MatMuls."},
                "matmul": {
                    "type": "array", "minItems": 1,
                    "description": "One row per timed MatMul (m×k)·(k×n): {m, k, n, p50_ms, p90_ms}.",
                    "items": {"type": "object", "additionalProperties": False,
                              "required": ["m", "k", "n", "p50_ms"],
                              "properties": {"m": {"type": "integer", "minimum": 1}, "k": {"type": "integer", "minimum": 1},
                                             "n": {"type": "integer", "minimum": 1}, "p50_ms": _NUM, "p90_ms": _NUM}},
                },
            },
        },
    },
}


@dataclass(frozen=True)
class Budget:
    """One limit: `absolute` (bytes or ms) or `relative` (fraction of the dense model's value)."""

    key: str
    absolute: float | None = None
    relative: float | None = None

    def limit(self, dense_value: float) -> float:
        """The limit in bytes or ms, given the dense model's value for this quantity."""
        return self.absolute if self.absolute is not None else self.relative * dense_value

    def __str__(self) -> str:
        if self.relative is not None:
            return f"{100 * self.relative:g}% of dense"
        return f"{self.absolute:g} ms" if self.key.startswith("latency") else fmt_bytes(self.absolute)


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    source: str
    cores: int | None = None
    memory_bytes: float | None = None
    peak_gflops: float | None = None
    bandwidth_gbs: float | None = None
    measure: bool = False


@dataclass(frozen=True)
class Runtime:
    execution_provider: str
    precision: str
    threads: int = 0
    efficiency: float = 0.5
    op_overhead_us: float = 2.0
    overhead_bytes: float = 50e6

    @property
    def bytes_per_param(self) -> float:
        """Bytes per weight-matrix parameter at this precision (units.BYTES_PER_PARAM)."""
        return BYTES_PER_PARAM[self.precision]


@dataclass(frozen=True)
class Workload:
    batch: int
    sequence_length: int
    prompt_length: int | None = None
    new_tokens: int = 0

    def seq_len(self, family: Family) -> int:
        """Tokens per sequence of the timed pass (decoders: the prompt's prefill)."""
        return family.timed_length(self.sequence_length, self.prompt_length)

    def tokens(self, family: Family) -> int:
        """Tokens in one timed forward pass."""
        return self.batch * self.seq_len(family)


@dataclass(frozen=True)
class MatmulTiming:
    m: int
    k: int
    n: int
    p50_ms: float
    p90_ms: float | None = None


@dataclass(frozen=True)
class MeasuredTable:
    matmul: tuple[MatmulTiming, ...]
    host: str = ""
    date: str = ""
    onnxruntime: str = ""
    execution_provider: str = ""
    precision: str = "fp32"


@dataclass(frozen=True)
class Profile:
    """A validated hardware profile."""

    name: str
    description: str
    path: str
    device: Device
    runtime: Runtime
    workload: Workload
    rank_multiple: int
    budgets: dict[str, Budget] = field(default_factory=dict)
    measured: MeasuredTable | None = None

    def with_budgets(self, overrides: dict[str, str]) -> "Profile":
        """A copy whose budgets are replaced by `overrides` (key → '60%', '40 MB', '20 ms'; 'none' drops one)."""
        budgets = dict(self.budgets)
        for key, text in overrides.items():
            if key not in BUDGET_KEYS:
                raise ConfigError(f"unknown budget '{key}' (choose from {', '.join(BUDGET_KEYS)})")
            if str(text).strip().lower() == "none":
                budgets.pop(key, None)
            else:
                budgets[key] = parse_budget(key, text, f"--budget {key}")
        return replace(self, budgets=budgets)

    def with_workload(self, **changes) -> "Profile":
        """A copy with some workload fields replaced (batch, sequence_length, ...)."""
        return replace(self, workload=replace(self.workload, **{k: v for k, v in changes.items() if v is not None}))


_UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "kiB": 2**10, "MiB": 2**20, "GiB": 2**30,
          "ms": 1.0, "s": 1000.0}


def parse_budget(key: str, value, where: str) -> Budget:
    """'60%' → relative 0.6; '48 MB' → 48e6 bytes; '20 ms' → 20 ms; a number is bytes or ms."""
    is_latency = key.startswith("latency")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: budget '{key}' must be a number or a string like '60%', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: budget '{key}' must be > 0, got {value}")
        return Budget(key, absolute=float(value))
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[kKMG]i?B|B|ms|s)?\s*", value)
    if not m:
        raise ConfigError(f"{where}: budget '{key}' = {value!r} is not like '60%', '48 MB' or '20 ms'")
    number, unit = float(m.group(1)), m.group(2)
    if number <= 0:
        raise ConfigError(f"{where}: budget '{key}' must be > 0, got {value!r}")
    if unit == "%":
        return Budget(key, relative=number / 100)
    if unit is None:
        return Budget(key, absolute=number)
    if is_latency != (unit in ("ms", "s")):
        raise ConfigError(f"{where}: budget '{key}' = {value!r} has the wrong unit "
                          f"({'ms or s' if is_latency else 'B, KB, MB, GB'} or %)")
    return Budget(key, absolute=number * _UNITS[unit])


def profile_from_dict(data: dict, where: str) -> Profile:
    """Validate a parsed profile against SCHEMA and build the Profile; errors name `where` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a profile must be a TOML table")
    if "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
        raise ConfigError(f"{where}: key 'schema_version' is {data['schema_version']!r}; "
                          f"this edgesvd reads schema version {SCHEMA_VERSION}")
    require_finite(data, where, ConfigError)  # NaN and inf pass every numeric bound of the schema
    validate(data, SCHEMA, where, ConfigError)
    d, r, w = data["device"], data["runtime"], data["workload"]
    gpu = d["kind"] == "gpu"
    device = Device(name=d["name"], kind=d["kind"], source=d["source"], cores=d.get("cores"),
                    memory_bytes=d["memory_gb"] * 1e9 if "memory_gb" in d else None,
                    peak_gflops=d.get("peak_gflops"), bandwidth_gbs=d.get("memory_bandwidth_gbs"),
                    measure=d.get("measure", False))
    runtime = Runtime(execution_provider=r["execution_provider"], precision=r["precision"], threads=r.get("threads", 0),
                      efficiency=r.get("efficiency", 0.5), op_overhead_us=r.get("op_overhead_us", 8.0 if gpu else 2.0),
                      overhead_bytes=r.get("overhead_mb", 50.0) * 1e6)
    if gpu != (runtime.execution_provider == "CUDAExecutionProvider"):
        raise ConfigError(f"{where}: key 'runtime.execution_provider': {runtime.execution_provider} "
                          f"does not run on a device of kind '{d['kind']}'")
    workload = Workload(batch=w["batch"], sequence_length=w["sequence_length"],
                        prompt_length=w.get("prompt_length"), new_tokens=w.get("new_tokens", 0))
    budgets = {k: parse_budget(k, v, where) for k, v in data.get("budgets", {}).items()}
    measured = None
    if "measured" in data:
        m = data["measured"]
        measured = MeasuredTable(matmul=tuple(MatmulTiming(**row) for row in m["matmul"]), host=m.get("host", ""),
                                 date=m.get("date", ""), onnxruntime=m.get("onnxruntime", ""),
                                 execution_provider=m.get("execution_provider", ""),
                                 precision=m.get("precision", "fp32"))
    return Profile(name=data["name"], description=data.get("description", ""), path=where, device=device,
                   runtime=runtime, workload=workload, rank_multiple=data["rank_multiple"], budgets=budgets,
                   measured=measured)


def builtin_dir() -> Path:
    """The folder of built-in profile files, shipped as package data (`edgesvd.builtin_profiles`)."""
    from importlib.resources import files

    folder = Path(str(files("edgesvd.builtin_profiles")))
    if not any(folder.glob("*.toml")):
        raise ConfigError("the built-in profiles are missing from this installation (package edgesvd.builtin_profiles)")
    return folder


def builtin_names() -> list[str]:
    """Names of the built-in profiles, `host` first."""
    names = sorted(p.stem for p in builtin_dir().glob("*.toml"))
    return sorted(names, key=lambda n: (n != "host", n))


def read_profile_file(path: Path) -> Profile:
    """Parse and validate one TOML profile file (no host measurement)."""
    return profile_from_dict(read_toml(path, "profile", ConfigError), str(path))


def load_profile(name_or_path: str | os.PathLike, measure_host: bool = True) -> Profile:
    """A built-in profile by name, or a user's profile file by path; `measure: true` devices are
    filled in from this machine (cores, memory, peak compute, bandwidth) unless `measure_host` is False."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or os.sep in text or path.is_file()):
        path = builtin_dir() / f"{text}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown profile '{text}' (built-in: {', '.join(builtin_names())}; or give a .toml path)")
    elif not path.is_file():
        raise ConfigError(f"profile file not found: {path}")
    profile = read_profile_file(path)
    if profile.device.measure and measure_host:
        profile = replace(profile, device=measure_host_device(profile.device))
    return profile


def measure_host_device(device: Device) -> Device:
    """The profile's device filled in from this machine (see edgesvd.host): its CPU, or for a `gpu`
    device its first CUDA GPU; without one the file's fields stay and the source says so (a run
    that must measure it then fails with that reason)."""
    today = datetime.date.today().isoformat()
    found = this_gpu() if device.kind == "gpu" else this_cpu()
    if found is None:
        return replace(device, source=f"{device.source}; no CUDA GPU on this machine")
    return replace(device, name=f"{device.name} ({found.name})", cores=found.cores, memory_bytes=found.memory_bytes,
                   peak_gflops=found.peak_gflops, bandwidth_gbs=found.bandwidth_gbs,
                   source=f"{device.source}; measured {today}")


def parse_budget_overrides(items: Sequence[str]) -> dict[str, str]:
    """`--budget latency_p50=60%` options → {key: value} (values are parsed by Profile.with_budgets)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise ConfigError(f"--budget wants KEY=VALUE (e.g. latency_p50=60%), got {item!r}")
        if key.strip() not in BUDGET_KEYS:
            raise ConfigError(f"--budget: unknown key '{key.strip()}' (choose from {', '.join(BUDGET_KEYS)})")
        out[key.strip()] = value.strip()
    return out


def load_profiles(refs: Sequence["str | os.PathLike | Profile"], budgets: dict[str, str] | None = None) -> list[Profile]:
    """Profiles by name, path or object, each with `budgets` overriding its own (see
    Profile.with_budgets); the same profile twice is an error."""
    profiles = [(r if isinstance(r, Profile) else load_profile(r)).with_budgets(budgets or {}) for r in refs]
    if len({p.name for p in profiles}) != len(profiles):
        raise ConfigError("the same profile was given twice")
    return profiles
