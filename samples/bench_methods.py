"""Quality, wall time and peak memory of each compression method on real weights, side by side.

Every (model, method, keep) runs in its own subprocess so peak RSS is per configuration;
all share the same calibration sample (same source, size and seed). Usage:

    python samples/bench_methods.py                       # the README table (several minutes)
    python samples/bench_methods.py --methods plain,whiten --minilm-keeps 0.5 --stories-keeps 0.8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SHARED = Path(os.environ.get("EDGESVD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
STSB = SHARED / "data/stsb/sts-dev.csv"
TINYSTORIES = SHARED / "data/tinystories/valid-dev.txt"
STORIES = SHARED / "models/stories260K"
CALIB = {"minilm": SHARED / "data/calibration/wiki.utf8", "stories260K": SHARED / "data/calibration/wiki.utf8"}


def run_one(model: str, method: str, keep: float, extra: dict) -> dict:
    """Compress (unless method is 'dense') and score; runs inside the child process."""
    import torch

    from edgesvd import CalibrationConfig, CompressConfig, compress
    from edgesvd.evaluate import perplexity, stsb_spearman
    from edgesvd.loading import load_model, load_tokenizer, resolve_model

    torch.manual_seed(0)
    ref = "minilm" if model == "minilm" else str(STORIES)
    start = time.perf_counter()
    if method == "dense":
        source = resolve_model(ref)
        net, tok, keep_actual = load_model(source), load_tokenizer(source.path), 1.0
    else:
        cfg = CompressConfig(model=ref, method=method, keep=keep, show_progress=False,
                             calibration=CalibrationConfig(str(CALIB[model]), 128, 128, seed=0), **extra)
        result = compress(cfg)
        net, tok, keep_actual = result.model, result.tokenizer, result.record.keep_actual
    wall = time.perf_counter() - start
    score = stsb_spearman(net, tok, STSB) if model == "minilm" else perplexity(net, tok, TINYSTORIES, max_chunks=300)
    return {"model": model, "method": method, "keep": keep, "keep_actual": round(keep_actual, 4),
            "score": round(score, 4), "compress_s": round(wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="plain,asvd,whiten")
    p.add_argument("--minilm-keeps", default="0.8,0.6,0.5,0.3")
    p.add_argument("--stories-keeps", default="0.9,0.8")
    p.add_argument("--extra", default="{}", help="JSON of extra CompressConfig fields for every run")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "KEEP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    extra = json.loads(args.extra)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], float(args.one[2]), extra)))
        return
    for f in (STSB, TINYSTORIES, STORIES):
        if not f.exists():
            sys.exit(f"error: {f} is absent (this benchmark needs ../shared)")
    methods = args.methods.split(",")
    plan = [("minilm", "dense", 1.0)] + [("minilm", m, float(k)) for k in args.minilm_keeps.split(",") if k for m in methods]
    plan += [("stories260K", "dense", 1.0)] + [("stories260K", m, float(k)) for k in args.stories_keeps.split(",") if k for m in methods]
    rows = []
    for model, method, keep in plan:
        out = subprocess.run([sys.executable, __file__, "--one", model, method, str(keep), "--extra", args.extra],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{model} {method} {keep}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{model:12s} {method:8s} keep {keep:<4} actual {r['keep_actual']:.3f}  score {r['score']:.4f}  "
              f"{r['compress_s']:6.1f}s  {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"\nMeasured {date.today()} on {cpu}, {os.cpu_count()} cores, torch threads default.\n")
    print("| model | metric | method | keep (requested → actual) | score | compress wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        metric = "STS-B dev Spearman ↑" if r["model"] == "minilm" else "TinyStories dev ppl ↓"
        print(f"| {r['model']} | {metric} | {r['method']} | {r['keep']} → {r['keep_actual']:.3f} | {r['score']:.4f} "
              f"| {r['compress_s']} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
