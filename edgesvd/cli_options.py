"""Click options shared by every command that calibrates (compress, run, plan)."""

from __future__ import annotations

import click


def calibration_options(f):
    """Options shared by every command that calibrates."""
    f = click.option("--calib", "calib", multiple=True, default=("builtin",), show_default=True,
                     help="Calibration text: a .txt/.jsonl file (JSONL needs a 'text' field), a folder of "
                          "them, or 'builtin' (English prose from Python's standard library). Repeatable.")(f)
    f = click.option("--calib-samples", type=int, default=None,
                     help="Calibration sequences sampled [default: 512 sentences for encoders, "
                          "128 windows of --calib-len tokens for decoders].")(f)
    f = click.option("--calib-len", type=int, default=128, show_default=True,
                     help="Tokens per calibration sequence.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Sampling (and training) seed.")(f)
    return f
