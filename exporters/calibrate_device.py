"""Measure a device's MatMul speed under onnxruntime and write a hardware profile (needs only onnxruntime + numpy).

Copy this one file to the target board and run

    python calibrate_device.py --out my-board.toml [--provider CUDAExecutionProvider] [--precision fp16]

It times dense MatMuls over a grid of shapes at the workload's token count and writes a profile
(schema version 1, see edgesvd's README) whose `[measured]` table edgesvd's cost model fits to
overhead + compute + memory traffic ("calibrated" latency). It is also `edgesvd calibrate-device`.
The ONNX graphs are encoded here directly (a few protobuf fields), so the `onnx` package is not needed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ONNX_FLOAT, ONNX_FLOAT16, ONNX_INT64 = 1, 10, 7
OPSET = 17


# -- a minimal protobuf writer for ModelProto (field numbers from onnx/onnx.proto) -------------
def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _key(field, 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray, elem: int) -> bytes:
    """TensorProto: dims=1, data_type=2, name=8, raw_data=9 (little-endian)."""
    body = b"".join(_int(1, d) for d in array.shape) + _int(2, elem) + _bytes(8, name)
    return body + _bytes(9, np.ascontiguousarray(array).astype("<" + array.dtype.str[1:]).tobytes())


def _value_info(name: str, elem: int, dims: list[int | str]) -> bytes:
    """ValueInfoProto{name=1, type=2: TypeProto{tensor_type=1: {elem_type=1, shape=2: {dim=1}}}}."""
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, elem) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _attribute(name: str, value: int | list[int]) -> bytes:
    """AttributeProto: name=1, i=3, ints=8, type=20 (INT=2, INTS=7)."""
    if isinstance(value, int):
        return _bytes(1, name) + _int(3, value) + _int(20, 2)
    return _bytes(1, name) + b"".join(_int(8, v) for v in value) + _int(20, 7)


def _node(op: str, inputs: list[str], outputs: list[str], name: str, **attributes: int | list[int]) -> bytes:
    """NodeProto: input=1, output=2, name=3, op_type=4, attribute=5."""
    return (b"".join(_bytes(1, i) for i in inputs) + b"".join(_bytes(2, o) for o in outputs) + _bytes(3, name)
            + _bytes(4, op) + b"".join(_bytes(5, _attribute(k, v)) for k, v in attributes.items()))


def linear_model(in_features: int, out_features: int, rank: int | None, precision: str = "fp32",
                 bias: bool = True, seed: int = 0, pivoted: bool = False) -> bytes:
    """Serialized ONNX model of one Linear on input x[m, in]: dense `x·W (+b)` or factorized
    `(x·A)·B (+b)` with A in×rank, B rank×out held as initializers (the factors are never multiplied);
    `pivoted`: the graph edgesvd exports for that form, h = x·A, Gather(Concat(h·s, h·C)) with C
    rank×(out−rank) and the Gather between two Transposes."""
    dtype, elem = (np.float16, ONNX_FLOAT16) if precision == "fp16" else (np.float32, ONNX_FLOAT)
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    if rank is None:
        inits.append(_tensor("w", (rng.standard_normal((in_features, out_features)) * 0.02).astype(dtype), elem))
        nodes.append(_node("MatMul", ["x", "w"], ["y0"], "matmul"))
    elif pivoted:
        inits.append(_tensor("a", (rng.standard_normal((in_features, rank)) * 0.05).astype(dtype), elem))
        inits.append(_tensor("c", (rng.standard_normal((rank, out_features - rank)) * 0.05).astype(dtype), elem))
        inits.append(_tensor("s", (1 + rng.random(rank)).astype(dtype), elem))
        inits.append(_tensor("rows", rng.permutation(out_features).astype(np.int64), ONNX_INT64))
        nodes += [_node("MatMul", ["x", "a"], ["h"], "matmul_a"), _node("Mul", ["h", "s"], ["hs"], "scale"),
                  _node("MatMul", ["h", "c"], ["hc"], "matmul_b"),
                  _node("Concat", ["hs", "hc"], ["cat"], "concat", axis=-1),
                  _node("Transpose", ["cat"], ["cat_t"], "transpose_in", perm=[1, 0]),
                  _node("Gather", ["cat_t", "rows"], ["y_t"], "gather", axis=0),
                  _node("Transpose", ["y_t"], ["y0"], "transpose_out", perm=[1, 0])]
    else:
        inits.append(_tensor("a", (rng.standard_normal((in_features, rank)) * 0.05).astype(dtype), elem))
        inits.append(_tensor("b", (rng.standard_normal((rank, out_features)) * 0.05).astype(dtype), elem))
        nodes.append(_node("MatMul", ["x", "a"], ["h"], "matmul_a"))
        nodes.append(_node("MatMul", ["h", "b"], ["y0"], "matmul_b"))
    last = "y0"
    if bias:
        inits.append(_tensor("bias", np.zeros(out_features, dtype=dtype), elem))
        nodes.append(_node("Add", ["y0", "bias"], ["y"], "add_bias"))
        last = "y"
    # GraphProto: node=1, name=2, initializer=5, input=11, output=12
    graph = (b"".join(_bytes(1, n) for n in nodes) + _bytes(2, "linear")
             + b"".join(_bytes(5, t) for t in inits)
             + _bytes(11, _value_info("x", elem, ["m", in_features]))
             + _bytes(12, _value_info(last, elem, ["m", out_features])))
    opset = _bytes(1, "") + _int(2, OPSET)
    # ModelProto: ir_version=1, producer_name=2, graph=7, opset_import=8
    return _int(1, 8) + _bytes(2, "edgesvd-calibrate") + _bytes(7, graph) + _bytes(8, opset)


# -- timing ---------------------------------------------------------------------------------
def make_session(model: bytes, provider: str = "CPUExecutionProvider", threads: int = 0):
    """An onnxruntime session for `model` on `provider`; fails if the provider is not available."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise RuntimeError(f"{provider} is not available in this onnxruntime "
                           f"(available: {', '.join(ort.get_available_providers())})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=[provider])


def time_session(session, feed: dict, warmup: int = 5, runs: int = 30, min_seconds: float = 0.05
                 ) -> tuple[float, float]:
    """(p50, p90) in ms of `session.run` on `feed` after warm-up; at least `runs` runs and
    `min_seconds` of timing. On CUDA the input is bound to the device once (IOBinding), so only
    the computation is timed."""
    provider = session.get_providers()[0]
    if provider == "CUDAExecutionProvider":
        import onnxruntime as ort

        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")
        run = lambda: session.run_with_iobinding(binding)
    else:
        run = lambda: session.run(None, feed)
    for _ in range(warmup):
        run()
    samples = []
    start = time.perf_counter()
    while len(samples) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 10 * runs:
            break
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 90))


def time_linear(tokens: int, in_features: int, out_features: int, rank: int | None, provider: str = "CPUExecutionProvider",
                threads: int = 0, precision: str = "fp32", bias: bool = True, runs: int = 30,
                pivoted: bool = False) -> tuple[float, float]:
    """(p50, p90) ms of one Linear (dense when `rank` is None; `pivoted`: in that form) on `tokens` input rows."""
    session = make_session(linear_model(in_features, out_features, rank, precision, bias, pivoted=pivoted),
                           provider, threads)
    dtype = np.float16 if precision == "fp16" else np.float32
    x = np.random.default_rng(1).standard_normal((tokens, in_features)).astype(dtype)
    return time_session(session, {"x": x}, runs=runs)


def host_id() -> str:
    """A short name of this machine for tables and caches."""
    return f"{platform.node()}-{platform.machine()}"


# -- the profile ----------------------------------------------------------------------------
DEFAULT_SIZES = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def measure_grid(tokens: int, sizes: tuple[int, ...], provider: str, threads: int, precision: str,
                 runs: int = 20, log=print) -> list[dict]:
    """Time MatMuls x[tokens×k]·W[k×n] for k, n over `sizes` (every pair), one row per shape."""
    rows = []
    for k in sizes:
        for n in sizes:
            p50, p90 = time_linear(tokens, k, n, None, provider, threads, precision, bias=False, runs=runs)
            rows.append({"m": tokens, "k": k, "n": n, "p50_ms": round(p50, 5), "p90_ms": round(p90, 5)})
            log(f"  {tokens}×{k}·{k}×{n}: p50 {p50:.3f} ms  ({2 * tokens * k * n / p50 / 1e6:.1f} GFLOP/s)")
    return rows


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def profile_toml(name: str, device_name: str, kind: str, cores: int, memory_gb: float, peak_gflops: float,
                 bandwidth_gbs: float, provider: str, threads: int, precision: str, batch: int, seq: int,
                 rank_multiple: int, rows: list[dict], ort_version: str) -> str:
    """A schema-1 profile with the measured table; peak and bandwidth come from the measurements."""
    today = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = [
        "# Written by edgesvd calibrate-device: peak_gflops and memory_bandwidth_gbs are the best",
        "# rates seen in the timed MatMuls; latency comes from the [measured] table.",
        "schema_version = 1", f"name = {_toml_value(name)}",
        f"description = {_toml_value(f'{device_name}, {provider}, {precision}, calibrated {today[:10]}')}",
        f"rank_multiple = {rank_multiple}", "", "[device]",
        f"name = {_toml_value(device_name)}", f"kind = {_toml_value(kind)}", f"cores = {cores}",
        f"memory_gb = {memory_gb:.2f}", f"peak_gflops = {peak_gflops:.1f}", f"memory_bandwidth_gbs = {bandwidth_gbs:.1f}",
        f"source = {_toml_value(f'measured by calibrate-device on {host_id()} on {today}')}", "", "[runtime]",
        f"execution_provider = {_toml_value(provider)}", f"threads = {threads}", f"precision = {_toml_value(precision)}",
        "", "[workload]", f"batch = {batch}", f"sequence_length = {seq}", "", "[budgets]",
        'latency_p50 = "60%"', "", "[measured]", f"host = {_toml_value(host_id())}", f"date = {_toml_value(today)}",
        f"onnxruntime = {_toml_value(ort_version)}", f"execution_provider = {_toml_value(provider)}",
        f"precision = {_toml_value(precision)}",
    ]
    for r in rows:
        out += ["", "[[measured.matmul]]"] + [f"{k} = {_toml_value(v)}" for k, v in r.items()]
    return "\n".join(out) + "\n"


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 1.0


def calibrate(out: Path, name: str, provider: str = "CPUExecutionProvider", threads: int = 0,
              precision: str = "fp32", batch: int = 1, seq: int = 128, sizes: tuple[int, ...] = DEFAULT_SIZES,
              rank_multiple: int | None = None, runs: int = 20, log=print) -> Path:
    """Measure the grid and write the profile to `out` (written whole or not at all)."""
    import onnxruntime as ort

    kind = "gpu" if provider == "CUDAExecutionProvider" else "cpu"
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "device"
    log(f"calibrating {provider} ({precision}) on {host_id()}, {len(sizes) ** 2} MatMul shapes at {batch * seq} tokens")
    rows = measure_grid(batch * seq, sizes, provider, threads, precision, runs, log)
    gflops = max(2 * r["m"] * r["k"] * r["n"] / r["p50_ms"] / 1e6 for r in rows)
    act = 2 if precision == "fp16" else 4
    gbs = max(act * (r["m"] * r["k"] + r["k"] * r["n"] + r["m"] * r["n"]) / r["p50_ms"] / 1e6 for r in rows)
    cores = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    text = profile_toml(name, f"{platform.node()} ({platform.processor() or platform.machine()})", kind, cores,
                        _memory_gb(), gflops, gbs, provider, threads, precision, batch, seq,
                        rank_multiple or (64 if kind == "gpu" else 8), rows, ort.__version__)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    log(f"wrote {out}: best {gflops:.1f} GFLOP/s, best traffic {gbs:.1f} GB/s over {len(rows)} shapes")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="profile file to write (.toml)")
    parser.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    parser.add_argument("--provider", default="CPUExecutionProvider",
                        choices=["CPUExecutionProvider", "CUDAExecutionProvider"])
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated matrix sizes timed as k and n (every pair)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per shape")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --sizes must be positive integers separated by commas, got {args.sizes!r}", file=sys.stderr)
        return 2
    name = args.name or args.out.stem.lower().replace(" ", "-")
    try:
        calibrate(args.out, name, args.provider, args.threads, args.precision, args.batch, args.seq, sizes, runs=args.runs)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
