"""Click options shared by several commands, and the consoles and reporter every command uses."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
from rich.console import Console

from edgesvd.calibration import CalibrationConfig
from edgesvd.factorize import FORMS
from edgesvd.reporting import ConsoleReporter

PATH = click.Path(path_type=Path)


def out_console() -> Console:
    """Results on stdout; wide when piped (rich would fall back to 80 columns and cut layer names)."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def reporter(quiet: bool = False) -> ConsoleReporter:
    """Progress and stage lines on stderr; `quiet` drops the bars."""
    return ConsoleReporter(Console(stderr=True), bars=not quiet)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM becomes SystemExit, so atomic output folders remove their temporary copy."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def calibration_options(f):
    """Options shared by every command that calibrates."""
    f = click.option("--calib", "calib", multiple=True, default=(),
                     help="Calibration text: 'builtin' (natural English prose shipped with edgesvd), 'self' "
                          "(decoders: text the model samples itself, seeded), 'docstrings' (Python's "
                          "docstrings: technical prose), a .txt/.jsonl file (JSONL needs a 'text' field) or a "
                          "folder of them. Repeatable ('self' alone). [default: builtin for encoders, self for "
                          "decoders]")(f)
    f = click.option("--calib-samples", type=int, default=None,
                     help="Calibration sequences sampled [default: 512 sentences for encoders, 2048 windows "
                          "of --calib-len tokens for decoders; fewer for models too large to sample that many "
                          "in minutes].")(f)
    f = click.option("--calib-len", type=int, default=128, show_default=True,
                     help="Tokens per calibration sequence.")(f)
    f = click.option("--calib-temperature", type=float, default=1.0, show_default=True,
                     help="--calib self: sampling temperature (1.0: the model's own distribution).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Sampling (and training) seed.")(f)
    return f


def calibration(calib, calib_samples, calib_len, calib_temperature, seed) -> CalibrationConfig:
    return CalibrationConfig(tuple(calib) or None, calib_samples, calib_len, seed, calib_temperature)


def ep_options(f):
    f = click.option("--allow-cpu-fallback", is_flag=True,
                     help="If the CUDA EP is asked for and no GPU works, use the CPU EP instead of failing.")(f)
    f = click.option("--ep", "eps", multiple=True, default=("auto",), show_default=True,
                     type=click.Choice(["auto", "cpu", "cuda"]),
                     help="Execution provider(s): auto = CPU, plus CUDA when a GPU works. Repeatable.")(f)
    return f


def session_options(f):
    f = click.option("--opt-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
                     show_default=True, help="onnxruntime graph optimization level.")(f)
    f = click.option("--inter-threads", type=int, default=1, show_default=True,
                     help="onnxruntime inter-op threads.")(f)
    f = click.option("--threads", type=int, default=0, show_default=True,
                     help="onnxruntime intra-op threads (0: one per physical core).")(f)
    return f


def budget_option(f):
    return click.option("--budget", "budget_items", multiple=True, metavar="KEY=VALUE",
                        help="Override a budget of every profile: model_bytes, peak_memory, latency_p50, "
                             "latency_p90 = '60%', '40 MB', '20 ms' or 'none'. Repeatable.")(f)


def fuse_option(f):
    from edgesvd.exporters.fusions import FUSIONS

    return click.option("--fuse", multiple=True, type=click.Choice([*FUSIONS, "all"]),
                        help="Graph fusions that keep the factorization (off by default: not faster on the CPUs "
                             "measured): concat-a = one MatMul for A factors sharing an input; attention = "
                             "MultiHeadAttention with separate Q/K/V (encoders); ort = onnxruntime's transformer "
                             "optimizer (encoders). Repeatable.")(f)


def form_option(f):
    return click.option("--form", type=click.Choice(list(FORMS)), default=None,
                        help="How a factorized layer is stored: plain = two MatMuls, r·(out+in) parameters (fastest "
                             "at a given rank); pivoted = r pivot rows and the rest as their combinations, "
                             "r·(out+in−r) parameters (more components at a given size, better quality, plus a "
                             "Concat and a Gather per layer: slower on CPUs) [default: plain for encoders, pivoted for "
                             "decoders; see README].")(f)
