"""Why 4-bit weights break pivoted factors: the error of each layer's applied weight, rounded the way
MatMulNBits rounds, with the checkpoint's rank-r products stored pivoted, plain, or dense.

    python samples/bench_int4_forms.py CHECKPOINT [--refit-every 7]

CHECKPOINT holds pivoted layers (a decoder compressed with the default form, e.g. made by
`samples/bench_streamed.py --save DIR`). Rounding is symmetric, 16 levels, one scale (absmax ÷ 7)
per block of 32 weights along the input axis, in float64. The printed error is ‖Ŵ − W‖ ÷ ‖W‖ of the
weight the layer applies. `--refit-every N` also refits C by least squares after rounding A' (the
GPTQ idea) on every N-th layer (a pseudo-inverse per layer: slow on big layers).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from edgesvd.checkpoint import read_weights

BLOCK = 32
REFIT = "pivoted, A' rounded, C refit and rounded"


def round_4bit(w: torch.Tensor) -> torch.Tensor:
    """`w` (out×in, applied as w·x) rounded to symmetric 4-bit blocks of BLOCK along the input axis."""
    out_f, in_f = w.shape
    blocks = torch.nn.functional.pad(w, (0, (-in_f) % BLOCK)).reshape(out_f, -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 7
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((blocks / scale).round().clamp(-8, 7) * scale).reshape(out_f, -1)[:, :in_f]


def layer_errors(a: torch.Tensor, c: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor,
                 refit: bool) -> dict[str, float]:
    """The 4-bit error of one pivoted layer (A' r×in, C (out−r)×r) in each storage."""
    def applied(a_, c_):
        return torch.cat([a_ * scale[:, None], c_ @ a_], 0).index_select(0, rows)

    w = applied(a, c)

    def err(x):
        return float((x - w).norm() / w.norm())

    r = a.shape[0]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    plain_a, plain_b = s[:r].sqrt()[:, None] * vh[:r], u[:, :r] * s[:r].sqrt()
    qa = round_4bit(a)
    errors = {"pivoted, A' rounded": err(applied(qa, c)), "pivoted, C rounded": err(applied(a, round_4bit(c))),
              "pivoted, both rounded": err(applied(qa, round_4bit(c))),
              "plain, both rounded": err(round_4bit(plain_b) @ round_4bit(plain_a)), "dense, rounded": err(round_4bit(w))}
    if refit:
        c_refit = (c @ a) @ torch.linalg.pinv(qa)
        errors[REFIT] = err(applied(qa, round_4bit(c_refit)))
    errors["largest row norm of C"] = float(c.norm(dim=1).max())
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--refit-every", type=int, default=0, help="refit C on every N-th layer (0: never)")
    args = ap.parse_args()
    weights = read_weights(args.checkpoint)
    names = sorted(k[: -len(".rows")] for k in weights if k.endswith(".rows"))
    if not names:
        raise SystemExit(f"error: {args.checkpoint} holds no pivoted layer")
    table: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        a, c = weights[name + ".a.weight"].double(), weights[name + ".b.weight"].double()
        refit = args.refit_every > 0 and i % args.refit_every == 0
        errors = layer_errors(a, c, weights[name + ".rows"], weights[name + ".scale"].double(), refit)
        print(f"{name} r={a.shape[0]} " + "  ".join(f"{k}: {v:.3f}" for k, v in errors.items()), flush=True)
        for k, v in errors.items():
            table.setdefault(k, []).append(v)
    print(f"\nmean over {len(names)} layers (refit on {len(table.get(REFIT, []))}):")
    for k, v in table.items():
        print(f"  {k:45s} {statistics.mean(v):.3f}  (min {min(v):.3f}, max {max(v):.3f})")


if __name__ == "__main__":
    main()
