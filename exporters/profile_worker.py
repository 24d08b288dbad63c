"""Time one ONNX model on one execution provider in a fresh process (so peak memory is its own).

Run as `python profile_worker.py` (by path) with a JSON spec as the first line on stdin; prints a
JSON result. A spec with a `pair` serves paired timings on request instead (see serve_pairs).
Imports only onnxruntime and numpy, so the process's memory is the session's.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np
import onnxruntime as ort

_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    try:  # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak over fork+exec
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, bytes on macOS


def _options(spec: dict, profile: bool = False, spin: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if not spin:  # two sessions in one process: idle threads of one must not spin while the other runs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = spec["session"]["intra_op_threads"]
    so.inter_op_num_threads = spec["session"]["inter_op_threads"]
    so.graph_optimization_level = _LEVELS[spec["session"]["graph_optimization"]]
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = spec["profile_prefix"]
    return so


def feeds(sess: ort.InferenceSession, batch: int, seq: int, past: int, rng: np.random.Generator) -> dict:
    """Inputs for a forward over `seq` new tokens after `past` cached ones (values do not matter)."""
    out = {}
    for inp in sess.get_inputs():
        dtype = _NP.get(inp.type, np.float32)
        if inp.name == "input_ids":
            out[inp.name] = rng.integers(5, 200, size=(batch, seq)).astype(dtype)
        elif inp.name == "attention_mask":
            out[inp.name] = np.ones((batch, past + seq), dtype=dtype)
        elif inp.name == "token_type_ids":
            out[inp.name] = np.zeros((batch, seq), dtype=dtype)
        elif inp.name == "position_ids":
            out[inp.name] = np.tile(np.arange(past, past + seq, dtype=dtype), (batch, 1))
        elif inp.name.startswith("past_key_values"):
            # (batch, kv_heads, past, head_dim): the named axes are batch and sequence.
            dims = [d if isinstance(d, int) else None for d in inp.shape]
            shape = [batch, dims[1], past, dims[3]]
            out[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise SystemExit(f"profile: unknown model input '{inp.name}'")
    return out


def _time(run, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1000)
    return times


def _runner(sess: ort.InferenceSession, feed: dict, provider: str):
    """A no-argument callable running one forward; IOBinding on CUDA keeps copies out of the timing."""
    if provider != "CUDAExecutionProvider":
        return lambda: sess.run(None, feed)
    binding = sess.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run():
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def stats(times: list[float], items: int) -> dict:
    """p50/p90/p99/mean/min of run times (ms) and the p50 throughput (items per second)."""
    t = np.asarray(times)
    p50 = float(np.percentile(t, 50))
    return {"runs": len(times), "p50_ms": p50, "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean()), "min_ms": float(t.min()),
            "throughput_per_s": items * 1000.0 / p50}


def measure(spec: dict) -> dict:
    """Latency of every mode in the spec for one model on one provider, plus session time and memory."""
    rss0 = _rss_mb()
    provider = spec["provider"]
    t = time.perf_counter()
    sess = ort.InferenceSession(spec["path"], _options(spec), providers=[provider])
    create_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    b, seq = spec["batch"], spec["seq_len"]
    results = {}
    modes = _modes(sess, b, seq)
    for mode, new, past, items in modes:
        feed = feeds(sess, b, new, past, rng)
        results[mode] = stats(_time(_runner(sess, feed, provider), spec["warmup"], spec["runs"]), items)
    out = {"provider": sess.get_providers()[0], "profile_runs": _profile_runs(spec), "session_create_s": create_s, "modes": results,
           "peak_rss_mb": _rss_mb() - rss0}
    if spec.get("profile_prefix"):
        out["node_profile"] = _node_profile(spec, modes[0])
    return out


_PROFILE_RUNS = 5


def _profile_runs(spec: dict) -> int:
    """Runs recorded in the node-level trace: as many as were timed, at least _PROFILE_RUNS."""
    return max(_PROFILE_RUNS, spec["runs"])


def _modes(sess: ort.InferenceSession, batch: int, seq: int) -> list[tuple[str, int, int, int]]:
    """(mode, new tokens, cached tokens, items per run) timed for this model: decoders prefill and
    decode, encoders one forward."""
    if any(i.name.startswith("past_key_values") for i in sess.get_inputs()):
        return [("prefill", seq, 0, batch * seq), ("decode", 1, seq, batch)]
    return [("forward", seq, 0, batch)]


def serve_pairs(spec: dict, commands, reply) -> None:
    """Dense and compressed in one process, their runs interleaved pair by pair (A, B, then B, A),
    so load from other processes on a shared machine hits both alike.

    After warm-up it answers each command from `commands` ({"pairs": n}) with the times of n more
    pairs per mode ({mode: {"dense": [...], "compressed": [...]}, "load": 1-minute load average});
    the parent decides from them whether to ask for more, and ends with {"stop": true}."""
    provider = spec["provider"]
    a, b = (ort.InferenceSession(p, _options(spec, spin=False), providers=[provider]) for p in spec["pair"])
    modes = _modes(a, spec["batch"], spec["seq_len"])
    modes = [m for m in modes if m[0] in (spec.get("modes") or [m[0] for m in modes])]
    runs = {}
    for mode, new, past, _ in modes:
        feed = [feeds(sess, spec["batch"], new, past, np.random.default_rng(0)) for sess in (a, b)]
        runs[mode] = [_runner(sess, f, provider) for sess, f in zip((a, b), feed)]
    count = 0

    def pair(mode: str) -> tuple[float, float]:
        nonlocal count
        times = [0.0, 0.0]
        for k in (0, 1) if count % 2 == 0 else (1, 0):  # alternate which goes first
            t = time.perf_counter()
            runs[mode][k]()
            times[k] = (time.perf_counter() - t) * 1000
        count += 1
        return times[0], times[1]

    for mode, *_ in modes:
        for _ in range(spec["warmup"]):
            pair(mode)
    reply({"modes": [m[0] for m in modes]})
    for line in commands:
        command = json.loads(line)
        if command.get("stop"):
            return
        out = {}
        for mode, *_ in modes:
            timed = [pair(mode) for _ in range(int(command["pairs"]))]
            out[mode] = {"dense": [t[0] for t in timed], "compressed": [t[1] for t in timed]}
        reply({"times": out, "load": os.getloadavg()[0]})


def measure_many(spec: dict) -> dict:
    """Several models in one process, interleaved: every round times each model once, in an order
    that rotates from round to round, so load from other processes hits all of them alike. Per
    shape (encoders: batch × seq_len forward; decoders: prefill and decode at batch 1) it returns
    every model's times, in rounds, for paired ratios. clock "cpu" times the calling thread's CPU
    (with one intra-op thread onnxruntime runs every kernel on it): time that other processes'
    load does not inflate."""
    import os

    provider, cpu = spec["provider"], spec.get("clock") == "cpu"
    clock = time.thread_time if cpu else time.perf_counter
    load = [os.getloadavg()[0]]
    sessions = [ort.InferenceSession(p, _options(spec, spin=False), providers=[provider]) for p in spec["models"]]
    causal = any(i.name.startswith("past_key_values") for i in sessions[0].get_inputs())
    seq = spec["seq_len"]
    shapes = ([("prefill", 1, seq, 0), ("decode", 1, 1, seq)] if causal
              else [(f"b{b}", b, seq, 0) for b in spec["batches"]])
    out: dict[str, list[list[float]]] = {}
    for name, batch, new, past in shapes:
        runs = [_runner(s, feeds(s, batch, new, past, np.random.default_rng(0)), provider) for s in sessions]
        times: list[list[float]] = [[] for _ in runs]
        order = list(range(len(runs)))
        for i in range(spec["warmup"] + spec["runs"]):
            shift = i % len(order)
            for k in order[shift:] + order[:shift]:
                t = clock()
                runs[k]()
                if i >= spec["warmup"]:
                    times[k].append((clock() - t) * 1000)
        out[name] = times
    load.append(os.getloadavg()[0])
    return {"shapes": out, "load_average": load, "clock": "cpu" if cpu else "wall"}


def _node_profile(spec: dict, mode: tuple) -> str:
    """Run a separate profiling session (never the timed one) and return its trace file."""
    sess = ort.InferenceSession(spec["path"], _options(spec, profile=True), providers=[spec["provider"]])
    _, new, past, _ = mode
    feed = feeds(sess, spec["batch"], new, past, np.random.default_rng(0))
    sess.run(None, feed)  # the first run includes one-off allocations; it is dropped from the totals
    for _ in range(_profile_runs(spec)):
        sess.run(None, feed)
    return sess.end_profiling()


def _reply(message: dict) -> None:
    print(json.dumps(message), flush=True)


if __name__ == "__main__":
    try:
        spec = json.loads(sys.stdin.readline())
        if spec.get("pair"):
            serve_pairs(spec, sys.stdin, _reply)
        else:
            _reply(measure_many(spec) if spec.get("models") else measure(spec))
    except Exception as exc:  # reported by the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}))
        sys.exit(3)
