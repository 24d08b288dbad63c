"""Pivot rows for the pivoted form: LU + maxvol (edgesvd's) against pivoted QR (geqp3, the former).

Time, and what the chosen rows do to the stored factors and, with --score, to a model's perplexity.

    OMP_NUM_THREADS=1 python samples/bench_pivot_rows.py                      # random tall bases
    OMP_NUM_THREADS=1 python samples/bench_pivot_rows.py --smollm2 --shapes '' # SmolLM2's own factors
    OMP_NUM_THREADS=1 python samples/bench_pivot_rows.py --shapes '' --score CK_OLD CK_NEW  # end to end

Random bases are orthonormal n×r with each row scaled by 1/U(0.05, 1.05), as output sizes weight
them in `pivot`. With --smollm2, SmolLM2-135M-Instruct (the PyPI GGUF) is compressed streamed with
whiten keep 0.9, the pivoted form, calibrated on ../shared's wiki.utf8, and every factor pair `pivot` receives is pivoted both ways:
the rows' time, the largest |C| entry and row norm, and the relative error of the weight the
stored layer applies when its A' and C are rounded as the exports round them (int8 per output
channel; MatMulNBits' 4-bit blocks of 32, `edgesvd.weightgrid.round_int4`). With --score, each
SmolLM2 checkpoint (e.g. `samples/bench_streamed.py --configs whiten:0.9:on --windows 0 --save DIR`,
run with the code before and after a change of row choice) is scored by bench_streamed's WikiText-2
protocol in fp32 and with every Linear's and factor's weights rounded to int8 per output channel
(weights only: what the row choice changes; activations stay fp32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("EDGESVD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
WIKI_CALIB = SHARED / "data/calibration/wiki.utf8"


def geqp3_rows(q: torch.Tensor) -> torch.Tensor:
    """The former choice: QR with column pivoting of qᵀ (Q-DEIM), pivots first."""
    import scipy.linalg

    _, order = scipy.linalg.qr(q.T.cpu().numpy(), mode="r", pivoting=True)
    return torch.from_numpy(order).long().to(q.device)


def largest_c(q: torch.Tensor, order: torch.Tensor) -> float:
    r = q.shape[1]
    return float(torch.linalg.solve(q[order[:r]], q, left=False).abs().max())


def random_shapes(shapes: list[tuple[int, int]]) -> None:
    from edgesvd.factorize import pivot_rows

    torch.manual_seed(0)
    for n, r in shapes:
        q = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64)).Q
        q = q / torch.rand(n, 1, dtype=torch.float64).add(0.05)
        cells = []
        for name, choose in (("geqp3", geqp3_rows), ("LU + maxvol", pivot_rows)):
            t = time.perf_counter()
            order = choose(q)
            cells.append(f"{name} {time.perf_counter() - t:.2f} s, max |C| {largest_c(q, order):.3f}")
        print(f"random {n} × {r}: " + "; ".join(cells), flush=True)


def round_int8(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale).round().clamp(-127, 127) * scale


def captured_factors(calib: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(A, B, output_rms) of every layer SmolLM2's whiten keep 0.9 compression pivots."""
    import edgesvd
    import edgesvd.factorize as factorize
    from edgesvd.calibration import CalibrationConfig
    from edgesvd.methods import method_config

    seen, original = [], factorize.pivot

    def recording(a, b, output_rms=None):
        seen.append((a.detach().double().cpu(), b.detach().double().cpu(),
                     None if output_rms is None else output_rms.detach().double().cpu()))
        return original(a, b, output_rms)

    factorize.pivot = recording
    try:
        edgesvd.compress("smollm2", method_config("whiten", keep=0.9, form="pivoted"), stream="on",
                         calib=CalibrationConfig(calib))
    finally:
        factorize.pivot = original
    return seen


def smollm2(calib: str) -> None:
    import edgesvd.factorize as factorize
    from edgesvd.weightgrid import round_int4

    layers = captured_factors(calib)
    ours = factorize.pivot_rows
    table: dict[str, dict[str, list[float]]] = {}
    for a, b, rms in layers:
        weight = b @ a
        for name, choose in (("geqp3", geqp3_rows), ("LU + maxvol", ours)):
            timed = []

            def timed_choice(q, choose=choose, timed=timed):
                t = time.perf_counter()
                order = choose(q)
                timed.append(time.perf_counter() - t)
                return order

            factorize.pivot_rows = timed_choice
            try:
                layer = factorize.PivotedLowRank.from_factors(a, b, None, rms)
            finally:
                factorize.pivot_rows = ours
            a_s, c_s = layer.a.weight.detach(), layer.b.weight.detach()
            scale, rows = layer.scale, layer.rows

            def applied(a_, c_):
                return torch.cat([a_ * scale[:, None], c_ @ a_]).index_select(0, rows)

            def error(w):
                return float((w - weight).norm() / weight.norm())

            c = c_s / scale[None, :]  # C = B_R·B_S⁻¹ itself, before the stored scale
            row = table.setdefault(name, {})
            for key, value in (("time", timed[0]), ("int8", error(applied(round_int8(a_s), round_int8(c_s)))),
                               ("int4", error(applied(round_int4(a_s), round_int4(c_s)))),
                               ("largest |C|", float(c.abs().max()) if c.numel() else 0.0),
                               ("largest row norm", float(c.norm(dim=1).max()) if c.numel() else 0.0)):
                row.setdefault(key, []).append(value)
    print(f"SmolLM2, whiten keep 0.9, {len(layers)} pivoted layers:")
    for name, row in table.items():
        print(f"  {name:12s} time {sum(row['time']):.2f} s in all; applied-weight error, mean: int8 "
              f"{statistics.mean(row['int8']):.4f}, int4 {statistics.mean(row['int4']):.3f}; largest |C| "
              f"median {statistics.median(row['largest |C|']):.2f} max {max(row['largest |C|']):.1f}; "
              f"largest row norm median {statistics.median(row['largest row norm']):.1f} "
              f"max {max(row['largest row norm']):.1f}")


def score(checkpoints: list[str]) -> None:
    import sys

    from edgesvd.checkpoint import load_compressed
    from edgesvd.loading import load_tokenizer, resolve_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_streamed import window_ppl, windows

    wins = windows(load_tokenizer(resolve_model("smollm2").path))
    for folder in checkpoints:
        model, _ = load_compressed(folder)
        fp32 = window_ppl(model.eval(), wins)
        with torch.no_grad():
            for module in model.modules():  # a factorized layer's A and B are Linears too
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(round_int8(module.weight))
        print(f"{folder}: perplexity fp32 {fp32:.3f}, int8 weights {window_ppl(model, wins):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192x1600,14336x3058", help="random n×r bases ('' for none)")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2's factors (compresses it first)")
    ap.add_argument("--calib", default=str(WIKI_CALIB), help="SmolLM2's calibration text ('builtin': the product default)")
    ap.add_argument("--score", nargs="*", default=[], help="SmolLM2 checkpoints to score in fp32 and int8 weights")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    random_shapes(shapes)
    if args.smollm2:
        smollm2(args.calib)
    score(args.score)


if __name__ == "__main__":
    main()
