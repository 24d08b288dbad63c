"""Peak memory and time of one end-to-end distillation step of a decoder, at several KL chunk sizes.

    python samples/bench_distill_memory.py smollm2 --chunks 256,2048

The step is the streamed learned method's end-to-end step: every Linear inside the blocks trained,
the teacher given as final hidden states (finetune.HiddenTeacher) that the shared head turns into
logits. A chunk as large as the batch (16 × 128 = 2,048 tokens) computes the batch's logits at once,
as before chunking. Each chunk size runs in its own process (ru_maxrss is that process's peak),
from the same random token ids; the teacher is the model itself with its hidden states scaled by 1.01, so the loss is
small but not 0 and its gradient is comparable between runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(model_ref: str, chunk: int, batch: int, length: int) -> dict:
    import torch
    from torch import nn

    from edgesvd import finetune
    from edgesvd.families import DECODER
    from edgesvd.loading import find_blocks, load_model, resolve_model

    finetune.KL_CHUNK_TOKENS = chunk
    model = load_model(resolve_model(model_ref))
    for p in model.parameters():
        p.requires_grad_(False)
    blocks_name, _ = find_blocks(model)
    trained = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(blocks_name)]
    for p in trained:
        p.requires_grad_(True)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    mask = torch.ones_like(ids)
    body = model.get_submodule(blocks_name.rpartition(".")[0])
    with torch.no_grad():
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False)[0] * 1.01
    teacher = finetune.HiddenTeacher(ids, mask, hidden, nn.Identity(), finetune.logit_head(model), DECODER,
                                     torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = finetune.distill_loss(model, teacher.batch(torch.arange(batch)), DECODER)
    loss.backward()
    seconds = time.perf_counter() - start
    grad = sum(float(p.grad.double().norm() ** 2) for p in trained) ** 0.5
    return {"chunk": chunk, "loss": float(loss.detach()), "grad_norm": grad, "step_s": round(seconds, 1),
            "rss_before_step_gb": round(before / 2**20, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a decoder: folder, GGUF file or alias (smollm2)")
    ap.add_argument("--chunks", default="256,2048", help="KL chunk sizes in tokens, comma-separated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.model, args.one, args.batch, args.length)))
        return
    for chunk in (int(c) for c in args.chunks.split(",")):
        out = subprocess.run([sys.executable, __file__, args.model, "--one", str(chunk), "--batch", str(args.batch),
                              "--length", str(args.length)], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
