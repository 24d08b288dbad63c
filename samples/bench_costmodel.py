"""How far the cost model's latency is from onnxruntime measurements on this host, per layer shape.

For every layer shape (MiniLM's three, plus two decoder-sized ones) and a few ranks, it times the
dense and factorized Linear under onnxruntime (CPU EP, fresh, no cache) and prints next to it
  - estimated:  roofline from this host's peak compute (cores × clock × vector width) and copy bandwidth,
  - calibrated: the fit of a `calibrate-device` MatMul table measured on this host just before,
with the relative error of each. `--pivoted`: the layers in the pivoted form (ranks up to its
break-even), where the model's estimate cannot see the Concat and Gather and the planner uses the
micro-benchmark table instead. Run:  python samples/bench_costmodel.py [--tokens 128] [--runs 50] [--pivoted]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgesvd.costmodel import CostModel, LayerShape, ModelFacts
from edgesvd.exporters.calibrate_device import calibrate, time_linear
from edgesvd.factorize import break_even_rank
from edgesvd.families import ENCODER
from edgesvd.profiles import load_profile

SHAPES = [LayerShape("minilm attention (q/k/v/o)", 384, 384), LayerShape("minilm ffn up", 1536, 384),
          LayerShape("minilm ffn down", 384, 1536), LayerShape("decoder 1024 attention", 1024, 1024),
          LayerShape("decoder 1024 mlp up", 2816, 1024)]
RANK_FRACTIONS = (0.125, 0.25, 0.5, 0.75)  # of break-even, rounded to 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="batch × sequence rows")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--pivoted", action="store_true", help="the layers in the pivoted form")
    args = parser.parse_args()
    shapes = [replace(s, pivoted=args.pivoted) for s in SHAPES]

    host = load_profile("host").with_workload(batch=1, sequence_length=args.tokens)
    facts = ModelFacts(ENCODER, 1, tuple(shapes), (), 384, 1536, 1, 12, 12, 32, 0)
    estimated = CostModel(host, facts)
    with tempfile.TemporaryDirectory() as tmp:
        table = calibrate(Path(tmp) / "host-cal.toml", "host-cal", batch=1, seq=args.tokens,
                          sizes=(32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072), runs=20, log=lambda *_: None)
        calibrated = CostModel(replace(host, measured=load_profile(table).measured), facts)

    print(f"# cost model vs onnxruntime, {datetime.date.today()}, {platform.node()} "
          f"({host.device.cores} cores, peak {host.device.peak_gflops:.0f} GFLOP/s from cpuinfo, "
          f"copy bandwidth {host.device.bandwidth_gbs:.1f} GB/s), {args.tokens} tokens, fp32, CPU EP"
          + (", pivoted form" if args.pivoted else ""))
    print(f"{'shape':32s} {'rank':>6s} {'measured ms':>12s} {'estimated':>10s} {'err':>7s} {'calibrated':>11s} {'err':>7s}")
    summary = []
    for shape in shapes:
        be = break_even_rank(shape.out_features, shape.in_features, shape.pivoted)
        ranks = [None] + sorted({max(8, int(round(f * be / 8)) * 8) for f in RANK_FRACTIONS})
        errs_e, errs_c = [], []
        for rank in ranks:
            measured, _ = time_linear(args.tokens, shape.in_features, shape.out_features, rank, runs=args.runs,
                                      pivoted=shape.pivoted)
            est, cal = estimated.layer_ms(shape, rank), calibrated.layer_ms(shape, rank)
            errs_e.append(est / measured - 1)
            errs_c.append(cal / measured - 1)
            print(f"{shape.name + f' {shape.out_features}×{shape.in_features}':32s} {str(rank or 'dense'):>6s} "
                  f"{measured:12.3f} {est:10.3f} {100 * errs_e[-1]:+6.0f}% {cal:11.3f} {100 * errs_c[-1]:+6.0f}%")
        summary.append((shape, np.mean(np.abs(errs_e)), np.mean(np.abs(errs_c))))
    print("\nmean |error| per shape:")
    for shape, e, c in summary:
        print(f"  {shape.out_features}×{shape.in_features:<5d} estimated {100 * e:5.0f}%   calibrated {100 * c:5.0f}%")


if __name__ == "__main__":
    main()
