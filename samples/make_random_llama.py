"""A random-init Llama of a given shape, for timing and memory runs (not quality): tied 128k-token
embedding, 64-wide heads, a quarter as many KV heads, saved in safetensors parts with stories260K's
tokenizer (any tokenizer whose ids fit the vocabulary will do).

    python samples/make_random_llama.py --hidden 2048 --mlp 8192 --blocks 16 --out ../scratch/rand-1.3b
    OMP_NUM_THREADS=1 python samples/bench_streamed.py --model ../scratch/rand-1.3b --samples 32 --windows 0 \\
        --configs whiten:0.8:on
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--mlp", type=int, required=True)
    ap.add_argument("--blocks", type=int, required=True)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "models/stories260K")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = args.hidden // 64
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.blocks,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=args.vocab,
                         tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="2GB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(args.tokenizer / name, args.out / name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
