"""Budget truth on a shared machine: consecutive `edgesvd run --profile host --budget …` runs, each
checked by an independent paired measurement of its bundle against a fresh dense export.

    python samples/bench_budgets.py --runs 10 --budget latency_p50=60% --out ../scratch/budgets/b60
    python samples/bench_budgets.py --runs 10 --budget latency_p50=75% --out ../scratch/budgets/b75
    python samples/bench_budgets.py --model ../shared/models/stories260K --runs 10 \\
        --budget latency_p50=100% --budget model_bytes=90% --out ../scratch/budgets/stories

Each run is a separate `edgesvd run` process (its own micro-benchmark cache under --out, so the
runs reuse and invalidate it as a user's would). After it, in other processes: the dense model is
exported afresh (the same export options as the bundle's), and a separate Python process times the
bundle's model.onnx and that dense export with onnxruntime alone -- two sessions, runs interleaved
pair by pair on the same inputs, the profile's thread settings -- written here without any edgesvd
code, so it shares nothing with what it checks. It reports the median of the per-pair ratios, an
order-statistic interval over blocks of 20 consecutive pairs, and the load average.

A run "meets independently" when the independent median ratio is within the budget; it
"contradicts" the claim when even the lower end of the independent interval is beyond it. A run
that ends with "cannot certify" claims nothing and is counted as such. Writes results.json and
results.md (the table the README shows) under --out, appending as runs finish.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

INDEPENDENT = r'''
import json, math, os, sys, time
import numpy as np
import onnxruntime as ort

dense, comp, seq, pairs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # two pools share the cores
    so.log_severity_level = 3
    return ort.InferenceSession(os.path.join(path, "model.onnx"), so, providers=["CPUExecutionProvider"])

def inputs(sess):
    ids = np.random.default_rng(7).integers(100, 400, size=(1, seq))
    feed = {}
    for i in sess.get_inputs():
        kind = np.int64 if "int64" in i.type else np.int32 if "int32" in i.type else np.float32
        if i.name == "input_ids":
            feed[i.name] = ids.astype(kind)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones((1, seq), kind)
        elif i.name == "token_type_ids":
            feed[i.name] = np.zeros((1, seq), kind)
        elif i.name == "position_ids":
            feed[i.name] = np.arange(seq, dtype=kind)[None]
        elif i.name.startswith("past_key_values"):  # prefill: an empty cache
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), kind)
        else:
            raise SystemExit("unknown input " + i.name)
    return feed

a, b = session(dense), session(comp)
fa, fb = inputs(a), inputs(b)
for _ in range(10):
    a.run(None, fa); b.run(None, fb)
load0 = os.getloadavg()[0]
d, c = [], []
for k in range(pairs):
    order = ((a, fa, d), (b, fb, c)) if k % 2 == 0 else ((b, fb, c), (a, fa, d))
    for sess, feed, out in order:
        t = time.perf_counter(); sess.run(None, feed); out.append((time.perf_counter() - t) * 1e3)
ratios = np.array(c) / np.array(d)
blocks = np.median(ratios[: len(ratios) // 20 * 20].reshape(-1, 20), axis=1)
n = len(blocks)
cdf = np.cumsum([math.comb(n, i) / 2 ** n for i in range(n + 1)])
lo = max([l for l in range(1, n + 1) if cdf[l - 1] <= 0.025] or [1])
hi = min([u for u in range(1, n + 1) if 1 - cdf[u - 1] <= 0.025] or [n])
s = np.sort(blocks)
print(json.dumps({"median": float(np.median(blocks)), "low": float(s[lo - 1]), "high": float(s[hi - 1]),
                  "all_pairs_median": float(np.median(ratios)), "pairs": pairs,
                  "dense_p50_ms": float(np.median(d)), "compressed_p50_ms": float(np.median(c)),
                  "load_average": [load0, os.getloadavg()[0]]}))
'''

DENSE = r'''
import json, sys
from pathlib import Path
from edgesvd.exporters.export import ExportConfig, export_dense
meta = json.loads((Path(sys.argv[2]) / "edgesvd_export.json").read_text())
export_dense(sys.argv[1], sys.argv[3], ExportConfig(**meta["config"]))
'''


def load() -> float:
    return os.getloadavg()[0]


def independent(model: str, bundle: Path, work: Path, seq: int, pairs: int, threads: int) -> dict:
    """A fresh dense export (its own process), then the independent paired measurement (another)."""
    dense = work / "dense"
    subprocess.run([sys.executable, "-c", DENSE, model, str(bundle), str(dense)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-c", INDEPENDENT, str(dense), str(bundle), str(seq), str(pairs),
                           str(threads)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def claimed(bundle: Path) -> dict:
    """What the run's manifest claims: the relative p50 verdict, the plans, the chosen keep."""
    info = json.loads((bundle / "manifest.json").read_text())["budgets"]
    plans = info["plans"]
    first = plans[0].get("latency", {})
    chosen = next(p for p in plans if p.get("chosen"))
    return {"verdicts": info["certified"], "plans": len(plans), "keep": chosen.get("keep"),
            "first_estimated_ratio": first.get("estimated_ratio"),
            "first_measured_ratio": (first.get("measured_ratio") or {}).get("estimate"),
            "first_estimate_error": first.get("estimate_error"),
            "estimates": [(p["latency"]["estimated_ratio"], p["latency"]["measured_ratio"]["estimate"])
                          for p in plans if p.get("latency")],
            "layer_share": (info.get("cost_model") or {}).get("layer_share"),
            "microbench": (info.get("cost_model") or {}).get("layer_table", {})}


def row_markdown(i: int, r: dict, limit: float | None) -> str:
    if r.get("error"):
        return (f"| {i} | {r['started'][11:16]} | {r['load_before']:.1f} | {r['wall_s']:.0f} | – | – | – | – | – | "
                f"{r['error']} |")
    v = r["claim"]["verdicts"].get("latency_p50", {})
    ci = v.get("interval", {})
    ind = r["independent"]
    est, meas = r["claim"]["first_estimated_ratio"], r["claim"]["first_measured_ratio"]
    first = f"{est:.3f} / {meas:.3f} ({100 * (est / meas - 1):+.1f}%)" if est and meas else "–"
    verdict = "meets" if ind["median"] <= (limit or math.inf) else "misses"
    if ind["low"] > (limit or math.inf):
        verdict = "CONTRADICTS"
    return (f"| {i} | {r['started'][11:16]} | {r['load_before']:.1f} | {r['wall_s']:.0f} | {r['claim']['plans']} | "
            f"{r['claim']['keep']:.3f} | {ci.get('estimate', float('nan')):.3f} [{ci.get('low') or float('nan'):.3f}, "
            f"{ci.get('high') or float('nan'):.3f}] ({v.get('pairs')} pairs, load {v.get('load_average', 0):.1f}) | "
            f"{ind['median']:.3f} [{ind['low']:.3f}, {ind['high']:.3f}] (load {max(ind['load_average']):.1f}) | "
            f"{first} | certified; independent {verdict} |")


def markdown(rows: list[dict], args) -> str:
    head = ("| run | start (UTC) | load before | wall s | plans | keep | claimed p50 ratio [95% interval] "
            "(pairs, load) | independent ratio [95% interval] (load) | first plan: estimated / measured ratio "
            "(error) | outcome |")
    lines = [f"`{' '.join(args.command)}` — {len(rows)} runs", "", head, "|" + "---|" * 10]
    limit = relative_limit(args.budget)
    lines += [row_markdown(i + 1, r, limit) for i, r in enumerate(rows)]
    return "\n".join(lines) + "\n"


def relative_limit(budgets: list[str]) -> float | None:
    for b in budgets:
        key, _, value = b.partition("=")
        if key == "latency_p50" and value.endswith("%"):
            return float(value[:-1]) / 100
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--budget", action="append", default=[], help="as for edgesvd run (repeatable)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=400, help="pairs of the independent measurement")
    parser.add_argument("--seq", type=int, default=128, help="the host profile's timed tokens")
    parser.add_argument("--threads", type=int, default=0, help="the host profile's intra-op threads")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("extra", nargs="*", help="more `edgesvd run` options, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    edgesvd = Path(sys.executable).with_name("edgesvd")
    args.command = [str(edgesvd.name), "run", args.model, "--profile", "host",
                    *[x for b in args.budget for x in ("--budget", b)], *args.extra]
    env = {**os.environ, "EDGESVD_CACHE_DIR": str(args.out / "cache")}
    results_file = args.out / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    for i in range(len(rows), args.runs):
        work = args.out / f"run{i + 1}"
        row = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "load_before": load()}
        t = time.perf_counter()
        proc = subprocess.run([str(edgesvd), *args.command[1:], "--out-root", str(work), "--force", "--quiet"],
                              capture_output=True, text=True, env=env)
        row.update(wall_s=time.perf_counter() - t, load_after=load(), rc=proc.returncode)
        (work / "log.txt").parent.mkdir(parents=True, exist_ok=True)
        (work / "log.txt").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        else:
            bundle = next(work.glob("*/host/bundle"))
            row["claim"] = claimed(bundle)
            row["independent"] = independent(args.model, bundle, work, args.seq, args.pairs, args.threads)
        rows.append(row)
        results_file.write_text(json.dumps(rows, indent=1))
        (args.out / "results.md").write_text(markdown(rows, args))
        print(row_markdown(i + 1, row, relative_limit(args.budget)), flush=True)
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
