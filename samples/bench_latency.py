"""ONNX Runtime CPU latency, dense vs compressed, beside the FLOP-ratio bound (the README's latency table).

MiniLM (real weights) at keep 0.8 / 0.6 / 0.5 / 0.4, batch 1 and 8, sequence 128; a random-init Llama of
realistic shape (hidden 1024, 8 layers) for prefill and per-token decode with the KV cache. Every keep is
measured with ranks rounded to multiples of 1, 8, 16 and 32 (rank rounding is the lever on CPU SIMD).
Checkpoints use `whiten` (latency does not depend on the method); statistics and spectra are computed
once per model and every (keep, multiple) variant is cut from them. Dense and compressed run in one
process with interleaved runs, so other load on the machine hits both alike.

The FLOP bound counts MatMul FLOPs only. With --split every pair is also profiled per node: the share
of the dense time spent in weight MatMuls (the only kernels factorization shrinks), their own speedup
against their FLOP ratio, and the time bound dense ÷ (rest + weight MatMuls × FLOP ratio): the
speedup a perfect factorized MatMul would give, with LayerNorm, GELU, softmax, adds and transposes
unchanged.

    python samples/bench_latency.py                       # full table (~10-15 min on 2 cores)
    python samples/bench_latency.py --runs 5 --skip-llama # quick look
    python samples/bench_latency.py --keeps 0.5 --multiples 8 32 64 --split   # where the time goes
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgesvd.calibration import CalibrationConfig
from edgesvd.checkpoint import CompressionRecord
from edgesvd.compression import prepare
from edgesvd.exporters.export import ExportConfig, export_model
from edgesvd.exporters.profiling import ProfileConfig, graph_flops, paired_latency, weight_matmul_split
from edgesvd.exporters.providers import CPU, SessionConfig
from edgesvd.factorize import apply_ranks
from edgesvd.planner import uniform_rank
from edgesvd.spectra import spectra_of

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def variants(model_ref: str, keeps: list[float], multiples: list[int], tmp: Path, calib: CalibrationConfig):
    """Export the dense model and every (keep, multiple) variant; yields (keep, multiple, keep_actual, dir)."""
    prep = prepare(model_ref, calib, device="cpu")
    spectra = spectra_of(prep.model, prep.targets, "whiten", prep.stats)
    prep.stats = None
    family = prep.source.family
    dense_dir = tmp / f"{prep.source.name}-dense"
    export_model(prep.model, prep.tokenizer, family, dense_dir, ExportConfig())
    yield None, None, 1.0, dense_dir
    for keep in keeps:
        for multiple in multiples:
            model = copy.deepcopy(prep.model)
            ranks = {n: uniform_rank(*model.get_submodule(n).weight.shape, keep, multiple) for n in prep.targets}
            layers, _, _ = apply_ranks(model, spectra, ranks)
            record = CompressionRecord("whiten", keep, family.name, model_ref, layers, rank_multiple=multiple)
            out = tmp / f"{prep.source.name}-k{keep}-m{multiple}"
            export_model(model, prep.tokenizer, family, out, ExportConfig(), record)  # checks the factorization
            del model
            yield keep, multiple, record.keep_actual, out


def random_llama(tmp: Path) -> Path:
    """A random-init Llama (hidden 1024, 8 layers, GQA 16/8, vocab 32000) with stories260K's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    path = tmp / "llama-1024x8"
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(path)
    return path


def bench(name: str, model_ref: str, shapes: list[tuple[int, int]], keeps, multiples, calib, args, tmp, rows):
    """Every variant against the dense model, measured in pairs with interleaved runs (fair on a
    machine shared with other work), beside the FLOP-bound speedup of the two graphs."""
    dense_dir = None
    for keep, multiple, keep_actual, onnx_dir in variants(model_ref, keeps, multiples, tmp, calib):
        if keep is None:
            dense_dir = onnx_dir
            continue
        for batch, seq in shapes:
            cfg = ProfileConfig(batch=batch, seq_len=seq, warmup=args.warmup, runs=args.runs, eps=(CPU,),
                                session=SessionConfig(intra_op_threads=args.threads))
            pair = paired_latency(dense_dir, onnx_dir, cfg)
            fd, fc = graph_flops(dense_dir, seq), graph_flops(onnx_dir, seq)
            ratio = fc["total_per_token"] / fd["total_per_token"]
            split = {}
            if args.split:  # where the time goes: weight MatMuls (what factorization shrinks) vs the rest
                sd, sc = weight_matmul_split(dense_dir, cfg), weight_matmul_split(onnx_dir, cfg)
                lin = fc["linear_per_token"] / fd["linear_per_token"]
                rest = sd["total_ms"] - sd["weight_matmul_ms"]
                split = {"matmul_share": sd["weight_matmul_ms"] / sd["total_ms"],
                         "matmul_speedup": sd["weight_matmul_ms"] / sc["weight_matmul_ms"], "matmul_bound": 1 / lin,
                         "time_bound": sd["total_ms"] / (rest + sd["weight_matmul_ms"] * lin)}
            for mode, pl in pair.items():
                d, ms = float(np.median(pl.dense_ms)), float(np.median(pl.compressed_ms))
                row = {"model": name, "keep": keep, "keep_actual": keep_actual, "multiple": multiple, "batch": batch,
                       "seq": seq, "mode": mode, "dense_ms": d, "compressed_ms": ms, "speedup": d / ms,
                       "flop_bound": 1 / ratio, "of_bound": d / ms * ratio, **split}
                rows.append(row)
                extra = (f"; weight MatMuls {split['matmul_share']:.0%} of dense time, {split['matmul_speedup']:.2f}× "
                         f"of {split['matmul_bound']:.2f}×; time bound {split['time_bound']:.2f}×") if split else ""
                print(f"{name} keep {keep} ×{multiple} b{batch} s{seq} {mode}: {d:.2f} → {ms:.2f} ms "
                      f"speedup {d / ms:.2f}× (bound {1 / ratio:.2f}×, {row['of_bound']:.0%}{extra})", flush=True)
        shutil.rmtree(onnx_dir)  # disk: the Llama variants are ~0.3-0.6 GB each


def markdown(rows: list[dict]) -> str:
    split = any("time_bound" in r for r in rows)
    head = ("| model | keep (actual) | rank multiple | batch × seq | mode | dense p50 ms | compressed p50 ms "
            "| speedup | FLOP bound | of bound |")
    if split:
        head += " weight-MatMul share of dense | weight-MatMul speedup (bound) | time bound | of time bound |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['model']} | {r['keep']} ({r['keep_actual']:.3f}) | {r['multiple']} | {r['batch']}×{r['seq']} "
                f"| {r['mode']} | {r['dense_ms']:.2f} | {r['compressed_ms']:.2f} | {r['speedup']:.2f}× "
                f"| {r['flop_bound']:.2f}× | {r['of_bound']:.0%} |")
        if "time_bound" in r:
            line += (f" {r['matmul_share']:.0%} | {r['matmul_speedup']:.2f}× ({r['matmul_bound']:.2f}×) "
                     f"| {r['time_bound']:.2f}× | {r['speedup'] / r['time_bound']:.0%} |")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.6, 0.5, 0.4])
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--llama-keeps", type=float, nargs="+", default=[0.5])
    ap.add_argument("--llama-multiples", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--split", action="store_true",
                    help="also profile every pair per node: weight-MatMul share of the time and the time bound")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows: list[dict] = []
    start = dt.datetime.now()
    with tempfile.TemporaryDirectory(prefix="edgesvd-bench-") as tmp:
        tmp = Path(tmp)
        if not args.skip_minilm:
            bench("MiniLM", "minilm", [(b, args.seq) for b in args.batches], args.keeps, args.multiples,
                  CalibrationConfig(num_sequences=16, seq_len=128), args, tmp, rows)
        if not args.skip_llama:
            bench("Llama 1024×8", str(random_llama(tmp)), [(1, args.seq)], args.llama_keeps, args.llama_multiples,
                  CalibrationConfig(num_sequences=8, seq_len=64), args, tmp, rows)
    header = (f"{start:%Y-%m-%d}, {cpu_name()}, {torch.get_num_threads()} threads, onnxruntime CPU EP, "
              f"{args.runs} runs after {args.warmup} warm-up, p50; wall {(dt.datetime.now() - start).seconds}s")
    print("\n" + header + "\n\n" + markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
