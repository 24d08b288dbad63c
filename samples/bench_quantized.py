"""edgesvd stacked on quantization against what users already have (the README's comparison table).

Builds the dense baselines (optimum export; onnxruntime's transformer optimizer; int8 `quantize_dynamic`
of MatMuls and embedding Gathers, with and without the optimizer; 4-bit MatMulNBits for decoders) and
edgesvd's model at several keeps in fp32 and int8 (4-bit for decoders) plus fused variants at one keep,
scores every model through onnxruntime (--eval: STS-B Spearman for encoders, perplexity for decoders)
and times all of them interleaved in one process: every round runs each model once, in an order that
rotates (exporters/baselines.py, the code `edgesvd run --compare-quantized` runs). Each clock is
measured --repeats times; a cell is the median over repeats of the p50, a ratio the median over
repeats of the median paired per-round ratio [min–max over repeats]. The load average is recorded.

    python samples/bench_quantized.py minilm --calib ../shared/data/calibration/wiki.utf8 \\
        --eval ../shared/data/stsb/sts-dev.csv --keeps 0.8,0.6,0.5 --json mini.json      # ~40 min on 2 cores
    python samples/bench_quantized.py ../shared/models/stories260K --keeps 0.8 \\
        --eval ../shared/data/tinystories/valid-dev.txt --fused-keep none
    python samples/bench_quantized.py random-llama --keeps 0.5 --fused-keep none   # latency only

`random-llama` is a random-init Llama (hidden 1024, 8 layers, MLP 2816, GQA 16/8, vocab 32000) whose
targeted layers are factorized with `plain` SVD (latency does not depend on the weights' values).
Checkpoints and exports are cached under --work and reused when their configuration matches.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

import edgesvd
from edgesvd.calibration import CalibrationConfig, sample_calibration
from edgesvd.exporters.baselines import (
    CompareConfig,
    baseline_variants,
    edgesvd_variants,
    interleaved_latency,
    paired_speedup,
    score_variants,
)
from edgesvd.exporters.export import onnx_files_bytes
from edgesvd.exporters.profiling import graph_flops
from edgesvd.exporters.providers import SessionConfig
from edgesvd.loading import load_model, load_tokenizer, resolve_model
from edgesvd.methods import method_config

SHARED = Path(__file__).resolve().parents[2] / "shared"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def random_llama(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = work / "llama-1024x8"
    if not path.exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
        AutoTokenizer.from_pretrained(SHARED / "models" / "stories260K").save_pretrained(path)
    return path


def checkpoint(model: str, keep: float, args, work: Path, grid: str | None = None) -> Path:
    """The compressed checkpoint at `keep` (cached): the default method (learned) on --calib, or
    plain SVD on a random-init model; `grid`: the learned method fine-tuned through that weight grid."""
    out = work / f"ck-{args.method}-{keep}" if args.form is None else work / f"ck-{args.method}-{keep}-{args.form}"
    out = out.with_name(f"{out.name}-q{grid}") if grid else out
    if not out.exists():
        method = method_config(args.method, keep=keep, form=args.form, quantize_aware=grid)
        start = time.process_time()
        calib = CalibrationConfig(source=args.calib) if args.calib else CalibrationConfig()
        edgesvd.compress(model, method, calib=calib, device="cpu").save(out)
        print(f"compressed keep {keep} ({args.method}) in {time.process_time() - start:.0f} CPU s", flush=True)
    return out


def measure(variants, cfg: CompareConfig, repeats: int) -> dict:
    """Per shape and variant: p50 per repeat and median paired ratio to the first variant per repeat."""
    out: dict = {"repeats": [], "load": []}
    for r in range(repeats):
        t = interleaved_latency([v.onnx_dir for v in variants], cfg)
        out["load"].append(t["load_average"])
        out["repeats"].append({s: {"p50": [float(np.median(x)) for x in times],
                                   "ratio": [paired_speedup(times[0], x)[0] for x in times],
                                   "times": times}
                               for s, times in t["shapes"].items()})
        print(f"  {cfg.clock} repeat {r + 1}/{repeats}: load {t['load_average']}", flush=True)
    return out


def ratio_to(rep: dict, shape: str, i: int, j: int) -> float:
    """Median over rounds of model j's time ÷ model i's time in one repeat (i faster when > 1)."""
    a, b = np.asarray(rep[shape]["times"][i]), np.asarray(rep[shape]["times"][j])
    return float(np.median(b / a))


def table(variants, scores, own_fp32, timing: dict, ref_label: str, shapes: list[str]) -> list[str]:
    labels = [v.label for v in variants]
    ref = labels.index(ref_label) if ref_label in labels else None
    head = ["model", "MB on disk", "score", "Δ vs own fp32"]
    for s in shapes:
        head += [f"{s} p50 ms", f"{s} × dense [runs]"] + ([f"{s} × {ref_label}"] if ref is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reps = timing["repeats"]
    for i, v in enumerate(variants):
        fp32 = own_fp32.get(v.label)
        delta = f"{scores[v.label] - scores[fp32]:+.4f}" if fp32 and fp32 != v.label else ""
        row = [v.label, f"{onnx_files_bytes(v.onnx_dir) / 1e6:.1f}", f"{scores[v.label]:.4f}", delta]
        for s in shapes:
            p50 = np.median([r[s]["p50"][i] for r in reps])
            ratios = [r[s]["ratio"][i] for r in reps]
            row += [f"{p50:.2f}", f"{np.median(ratios):.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]"]
            if ref is not None:
                vs = [ratio_to(r, s, i, ref) for r in reps]
                row.append(f"{np.median(vs):.2f}× [{min(vs):.2f}–{max(vs):.2f}]")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def targets(variants, scores, own_fp32, results, shapes, flops, family, args) -> list[str]:
    """The issue's targets, per clock: (a) edgesvd points that strictly dominate each quantized
    baseline (faster at every shape in the median over repeats, no larger, score within 0.005 —
    1 % for perplexity); (b) the largest loss of a quantized point against its own fp32; (c) the
    fp32 speedup at --fused-keep over dense, with onnxruntime's session optimizer only and with
    both through the transformer optimizer, against 0.9 × the FLOP bound."""
    labels = [v.label for v in variants]
    size = {v.label: onnx_files_bytes(v.onnx_dir) for v in variants}
    lower = family.causal and args.eval
    worse = (lambda a, b: a > b * 1.01) if lower else (lambda a, b: a < b - 0.005)
    out = []
    for clock, res in results.items():
        def faster(i, j):  # median over repeats of model j's time ÷ model i's, every shape
            return {s: float(np.median([ratio_to(r, s, i, j) for r in res["repeats"]])) for s in shapes}
        for base in (v for v in variants if v.kind == "baseline" and v.precision != "fp32"):
            j = labels.index(base.label)
            wins = [f"{v.label} ({', '.join(f'{s} {x:.2f}×' for s, x in faster(i, j).items())})"
                    for i, v in enumerate(variants) if v.kind == "edgesvd" and size[v.label] <= size[base.label]
                    and not worse(scores[v.label], scores[base.label]) and min(faster(i, j).values()) > 1]
            out.append(f"(a, {clock}) strictly dominate {base.label}: {'; '.join(wins) or 'none'}")
    losses = {v.label: scores[own_fp32[v.label]] - scores[v.label] for v in variants
              if v.kind == "edgesvd" and v.precision != "fp32" and own_fp32.get(v.label) in scores}
    if losses:
        worst = max(losses, key=lambda k: losses[k] if not lower else -losses[k])
        out.append(f"(b) largest change of a quantized edgesvd point vs its own fp32: {worst} "
                   f"{-losses[worst]:+.4f}")
    keep = f"keep {args.fused_keep}"
    pairs = [("dense", f"{keep} fp32"), ("dense + ort-opt", f"{keep} fp32 + ort")]
    for clock, res in results.items():
        for d, c in pairs:
            if d in labels and c in labels:
                i, j = labels.index(c), labels.index(d)
                sp = {s: float(np.median([ratio_to(r, s, i, j) for r in res["repeats"]])) for s in shapes}
                bound = flops[d] / flops[c]
                out.append(f"(c, {clock}) {c} over {d}: " + ", ".join(
                    f"{s} {x:.2f}× = {x / bound:.2f} of the FLOP bound {bound:.2f}×" for s, x in sp.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="minilm, a local model folder, or random-llama")
    ap.add_argument("--keeps", default="0.8,0.6,0.5",
                    help="comma separated; a keep with '+qat' (0.9+qat) is fine-tuned through the int4 grid")
    ap.add_argument("--precisions", default=None,
                    help="edgesvd exports to compare, e.g. fp32,int4 (default: every precision the family takes)")
    ap.add_argument("--method", default=None, help="default: learned (plain for random-llama)")
    ap.add_argument("--form", default=None, choices=["plain", "pivoted"], help="factorized form (default: the family's)")
    ap.add_argument("--calib", default=None, help="calibration text (default: the built-in corpus)")
    ap.add_argument("--eval", default=None, help="STS-B file (encoders) or text (decoders); else the proxy")
    ap.add_argument("--fused-keep", default="0.5", help="keep that also gets fused variants, or 'none'")
    ap.add_argument("--clocks", default="cpu,wall")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the wall clock")
    ap.add_argument("--work", default="bench-quantized-work")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = str(random_llama(work)) if args.model == "random-llama" else args.model
    args.method = args.method or ("plain" if args.model == "random-llama" else "learned")
    source = resolve_model(model)
    family = source.family
    started = dt.datetime.now(dt.timezone.utc)
    # "0.9+qat": the learned method fine-tuned through the grid of the 4-bit export (--quantize-aware int4).
    keeps = [(float(k.split("+")[0]), "+qat" in k) for k in args.keeps.split(",")]
    cks = {k: checkpoint(model, k[0], args, work, "int4" if k[1] else None) for k in keeps}
    precisions = tuple(None if p == "fp32" else p for p in args.precisions.split(",")) if args.precisions else None
    dense = load_model(source)
    variants = baseline_variants(dense, load_tokenizer(source.path), family, str(source.path), work / "x",
                                 reuse=True)
    del dense
    own_fp32 = {v.label: "dense" for v in variants}
    for k in keeps:
        name = f"keep {k[0]}" + (" qat" if k[1] else "")
        ours = edgesvd_variants(cks[k], name, family, work / "x", precisions=precisions, reuse=True)
        if args.fused_keep != "none" and float(args.fused_keep) == k[0] and not k[1] and not family.causal:
            ours += edgesvd_variants(cks[k], name, family, work / "x", ("ort",), precisions=(None,), reuse=True)
            ours += edgesvd_variants(cks[k], name, family, work / "x", ("concat-a",), precisions=("int8",),
                                     reuse=True)
            ours += edgesvd_variants(cks[k], name, family, work / "x", ("all",), reuse=True)
        for v in ours:
            own_fp32[v.label] = next(o.label for o in ours if o.precision == "fp32" and o.fusions == v.fusions) \
                if any(o.precision == "fp32" and o.fusions == v.fusions for o in ours) else f"{name} fp32"
        variants += ours
    print(f"{len(variants)} models: " + ", ".join(v.label for v in variants), flush=True)
    start = time.process_time()
    eval_file = Path(args.eval) if args.eval else None
    held_out = None
    if eval_file is None:
        held_out = sample_calibration(load_tokenizer(source.path),
                                      CalibrationConfig(args.calib or "builtin", num_sequences=32, seed=1), family)
    score_name, score_source, scores = score_variants(variants, family, eval_file, held_out, SessionConfig())
    print(f"scored ({score_name}) in {time.process_time() - start:.0f} CPU s", flush=True)
    flops = {v.label: graph_flops(v.onnx_dir, 128)["total_per_token"] for v in variants}
    results = {}
    for clock in args.clocks.split(","):
        cfg = CompareConfig(runs=args.runs, clock=clock, session=SessionConfig(intra_op_threads=args.threads))
        results[clock] = measure(variants, cfg, args.repeats)
    shapes = list(results[next(iter(results))]["repeats"][0])
    ref = "dense + ort-opt + int8" if not family.causal else "dense int4"
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"\n{args.model} — {started:%Y-%m-%d %H:%M} UTC, {machine}; score: {score_name} ({score_source})")
    for clock, res in results.items():
        threads = 1 if clock == "cpu" else args.threads
        print(f"\nclock {clock} ({threads} intra-op thread{'s' if threads > 1 else ''}), {args.runs} rounds × "
              f"{args.repeats} repeats, load average per repeat (start, end): {res['load']}")
        print("\n".join(table(variants, scores, own_fp32, res, ref, shapes)))
    print("\nFLOP bound (dense ÷ model, weight MatMuls + attention at 128 tokens): "
          + ", ".join(f"{v.label} {flops['dense'] / flops[v.label]:.3f}×" for v in variants if v.kind == "edgesvd"))
    print("\n".join(targets(variants, scores, own_fp32, results, shapes, flops, family, args)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "started": started.isoformat(), "machine": machine, "score_name": score_name,
            "score_source": score_source, "scores": scores, "own_fp32": own_fp32,
            "bytes": {v.label: onnx_files_bytes(v.onnx_dir) for v in variants},
            "kinds": {v.label: v.kind for v in variants}, "flops_per_token": flops,
            "latency": {c: {"load": r["load"], "repeats": [{s: {k: x[s][k] for k in ("p50", "ratio")} for s in x}
                                                            for x in r["repeats"]]} for c, r in results.items()},
            "labels": [v.label for v in variants]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
