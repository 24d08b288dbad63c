"""A model over protobuf's 2 GB limit through export → verify → profile → pack → pack --check.

Builds a random-init Llama (hidden 2048, MLP 5632, 12 layers, vocab 32000: 3.0 GB in fp32), replaces
every targeted Linear by random factors at the uniform rank of keep 0.8 (2.5 GB remain: still over
2 GB; weight values do not matter to this check), saves both, then runs the CLI on them the way a
user would (profile exports the dense model as its baseline) and prints each step's wall time and
the files it wrote. Peak memory about 6 GB, disk about 18 GB; ~5 min on 2 cores.

    python samples/check_large_export.py [--work DIR] [--keep-files]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgesvd.checkpoint import CompressionRecord, save_compressed
from edgesvd.factorize import LayerRecord, replace_with_factors
from edgesvd.loading import select_targets
from edgesvd.planner import uniform_rank

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def build_checkpoint(work: Path, keep: float) -> None:
    """Random-init Llama saved as `work/dense` (the baseline `profile` exports), then with random
    factors at `keep` as the edgesvd checkpoint `work/checkpoint`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model.save_pretrained(work / "dense", safe_serialization=True)
    tokenizer.save_pretrained(work / "dense")
    layers = []
    for name in select_targets(model, (), ()):
        linear = model.get_submodule(name)
        out_f, in_f = linear.weight.shape
        rank = uniform_rank(out_f, in_f, keep, 8)
        layers.append(LayerRecord(name, in_f, out_f, rank, linear.bias is not None))
        if rank is not None:  # scaled so activations stay O(1) through 12 layers
            replace_with_factors(model, name, torch.randn(rank, in_f) / in_f ** 0.5, torch.randn(out_f, rank) / rank ** 0.5 * 0.02)
    record = CompressionRecord("random-factors", keep, "decoder", str(work / "dense"), layers)
    save_compressed(model, tokenizer, record, work / "checkpoint")


def step(name: str, args: list[str]) -> None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgesvd", *args], capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
    print(f"== {name}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s\n   " + "\n   ".join(tail), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgesvd-large-"))
    try:
        start = time.perf_counter()
        build_checkpoint(work, 0.8)
        size = sum(p.stat().st_size for p in (work / "checkpoint").iterdir())
        print(f"== checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        step("export", ["export", str(work / "checkpoint"), "--out", str(work / "onnx")])
        for p in sorted((work / "onnx").iterdir()):
            if p.name.startswith("model"):
                print(f"   {p.name}: {p.stat().st_size / 1e9:.3f} GB")
        step("verify", ["verify", str(work / "checkpoint"), str(work / "onnx"), "--batch", "2", "--seq-len", "16",
                        "--new-tokens", "4", "--json", str(work / "parity.json")])
        step("profile", ["profile", str(work / "onnx"), "--runs", "3", "--seq-len", "32", "--json", str(work / "profile.json")])
        step("pack", ["pack", str(work / "onnx"), "--checkpoint", str(work / "checkpoint"), "--out", str(work / "bundle"),
                      "--parity-report", str(work / "parity.json"), "--profile-report", str(work / "profile.json")])
        step("pack --check", ["pack", "--check", str(work / "bundle")])
    finally:
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
