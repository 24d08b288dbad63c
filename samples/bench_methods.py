"""Quality, wall time and peak memory of each compression method on real weights, side by side.

Every (model, method, keep) runs in its own subprocess so peak RSS is per configuration;
all methods of a model share the same calibration sample (same source, size and seed):
MiniLM calibrates on ../shared/data/calibration/wiki.utf8; stories260K on text sampled from the
dense stories260K itself (seeded, written once; the TinyStories dev text is used only to score).
Ablations of `learned` run at MiniLM keep 0.5 and stories260K keep 0.8:
`learned-noft` (no stage-3 fine-tuning), `learned-cap1` (scores capped at 1, no amplification),
`learned-uniform` (uniform ranks instead of global selection). Usage:

    python samples/bench_methods.py --json bench.json      # the README table (about an hour on 2 busy cores)
    python samples/bench_methods.py --methods plain,whiten --minilm-keeps 0.5 --stories-keeps 0.8 --ablations ""
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
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

SHARED = Path(os.environ.get("EDGESVD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
STSB = SHARED / "data/stsb/sts-dev.csv"
TINYSTORIES = SHARED / "data/tinystories/valid-dev.txt"
STORIES = SHARED / "models/stories260K"
WIKI = SHARED / "data/calibration/wiki.utf8"
# Learned-method settings per model (defaults for MiniLM; stories260K's tiny steps are cheap, so
# it gets more of them: its layers are not low-rank and need the fine-tuning).
LEARNED = {"minilm": {}, "stories260K": {"steps": 200, "finetune_steps": 400, "finetune_lr": 1e-3}}
# Calibration sequences per model (same for every method): MiniLM uses the encoder default
# (512 sentences); stories260K is tiny, so more of its own text is cheap, and the fine-tuning
# overfits the decoder default of 128 windows.
SEQUENCES = {"minilm": None, "stories260K": 512}
ABLATIONS = {"learned-noft": {"finetune_steps": 0}, "learned-cap1": {"max_score": 1.0},
             "learned-uniform": {"selection": "uniform"}}


def stories_calibration(path: Path, sequences: int = 256, tokens: int = 255, seed: int = 1234) -> Path:
    """Text sampled from the dense stories260K (temperature 1 from BOS), written once to `path`.

    A model trained on TinyStories only has no other in-domain text at hand, and calibrating on
    the evaluation text would be cheating; its own samples are in-domain and independent of it.
    """
    if path.is_file():
        return path
    import torch

    from edgesvd.loading import load_model, load_tokenizer, resolve_model

    source = resolve_model(str(STORIES))
    model, tok = load_model(source), load_tokenizer(source.path)
    torch.manual_seed(seed)
    ids = torch.full((sequences, 1), tok.bos_token_id)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                         max_new_tokens=tokens, pad_token_id=tok.pad_token_id, eos_token_id=None)
    texts = [tok.decode(o[1:], skip_special_tokens=True).strip().replace("\n\n", "\n") for o in out]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(texts) + "\n")
    return path


def run_one(model: str, method: str, keep: float, calib: str, threads: int) -> dict:
    """Compress (unless method is 'dense') and score; runs inside the child process."""
    import torch

    torch.set_num_threads(threads)
    from edgesvd import CalibrationConfig, compress
    from edgesvd.evaluate import perplexity, stsb_spearman
    from edgesvd.loading import load_model, load_tokenizer, resolve_model
    from edgesvd.methods import method_config

    torch.manual_seed(0)
    ref = "minilm" if model == "minilm" else str(STORIES)
    start = time.perf_counter()
    details = {}
    if method == "dense":
        source = resolve_model(ref)
        net, tok, keep_actual = load_model(source), load_tokenizer(source.path), 1.0
    else:
        base = "learned" if method.startswith("learned") else method
        config = method_config(base, keep=keep, **LEARNED[model], **ABLATIONS.get(method, {}))
        result = compress(ref, config, calib=CalibrationConfig(calib, SEQUENCES[model], 128, seed=0), device="cpu")
        net, tok, keep_actual = result.model, result.tokenizer, result.record.keep_actual
        details = {k: result.record.details[k] for k in ("losses", "timings") if k in result.record.details}
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime  # load-independent: what the run costs on idle cores
    score = stsb_spearman(net, tok, STSB) if model == "minilm" else perplexity(net, tok, TINYSTORIES, max_chunks=300)
    return {"model": model, "method": method, "keep": keep, "keep_actual": round(keep_actual, 4),
            "score": round(score, 4), "compress_s": round(wall, 1), "compress_cpu_s": round(cpu, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0), **details}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="plain,asvd,whiten,learned")
    p.add_argument("--minilm-keeps", default="0.8,0.5,0.3")
    p.add_argument("--stories-keeps", default="0.9,0.8")
    p.add_argument("--models", default="minilm,stories260K", help="which models' rows to run")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help="learned ablations (comma list, '' for none)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per configuration (1: robust when the cores are shared)")
    p.add_argument("--jobs", type=int, default=1, help="configurations run at once (wall times then contend)")
    p.add_argument("--stories-calib", type=Path, default=Path("/tmp/edgesvd-bench/stories260K-samples.txt"))
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--one", nargs="+", metavar="MODEL METHOD KEEP [CALIB]", help=argparse.SUPPRESS)
    p.add_argument("--extra", help=argparse.SUPPRESS)  # accepted (and ignored) from older parents
    args = p.parse_args()
    if args.one:
        model, method, keep = args.one[:3]
        calib = args.one[3] if len(args.one) > 3 else str(WIKI if model == "minilm" else stories_calibration(args.stories_calib))
        print(json.dumps(run_one(model, method, float(keep), calib, args.threads)))
        return
    for f in (STSB, TINYSTORIES, STORIES, WIKI):
        if not f.exists():
            sys.exit(f"error: {f} is absent (this benchmark needs ../shared)")
    calib = {"minilm": str(WIKI), "stories260K": str(stories_calibration(args.stories_calib))}
    methods = [m for m in args.methods.split(",") if m]
    ablations = [a for a in args.ablations.split(",") if a]
    plan = [("minilm", "dense", 1.0)] + [("minilm", m, float(k)) for k in args.minilm_keeps.split(",") if k for m in methods]
    plan += [("minilm", a, 0.5) for a in ablations]
    plan += [("stories260K", "dense", 1.0)] + [("stories260K", m, float(k)) for k in args.stories_keeps.split(",") if k for m in methods]
    plan += [("stories260K", a, 0.8) for a in ablations]
    plan = [item for item in plan if item[0] in args.models.split(",")]

    def launch(item):
        model, method, keep = item
        out = subprocess.run([sys.executable, __file__, "--one", model, method, str(keep), calib[model],
                              "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{model} {method} {keep}: FAILED\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
            return None
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{model:12s} {method:16s} keep {keep:<4} actual {r['keep_actual']:.3f}  score {r['score']:.4f}  "
              f"{r['compress_s']:6.1f}s  {r['peak_rss_mb']:.0f} MB  {r.get('losses', '')}", file=sys.stderr, flush=True)
        return r

    # Longest first (learned, MiniLM) so parallel jobs finish together; rows are printed in plan order.
    order = sorted(plan, key=lambda item: (not item[1].startswith("learned"), item[0] != "minilm"))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(order, pool.map(launch, order)))
    rows = [done[item] for item in plan if done[item] is not None]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"\nMeasured {date.today()} on {cpu}, {os.cpu_count()} cores (shared), torch threads {args.threads}, "
          f"{args.jobs} configuration(s) at a time.\n")
    print("| model | metric | method | keep (requested → actual) | score | compress wall s | compress CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        metric = "STS-B dev Spearman ↑" if r["model"] == "minilm" else "TinyStories dev ppl ↓"
        print(f"| {r['model']} | {metric} | {r['method']} | {r['keep']} → {r['keep_actual']:.3f} | {r['score']:.4f} "
              f"| {r['compress_s']} | {r['compress_cpu_s']} | {r['peak_rss_mb']:.0f} |")
    learned = [r for r in rows if r["method"].startswith("learned") and "losses" in r]
    if learned:
        print("\nLearned: distillation loss on fixed calibration batches at each stage boundary.\n")
        print("| model | method | keep | stage 1 | before switch | after switch | after fine-tune |")
        print("|---|---|---|---|---|---|---|")
        for r in learned:
            l = r["losses"]
            print(f"| {r['model']} | {r['method']} | {r['keep']} | {l['stage1']:.4f} | {l['before_switch']:.4f} "
                  f"| {l['after_switch']:.4f} | {l['after_finetune']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
