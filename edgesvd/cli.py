"""The `edgesvd` command line: thin wrappers over the public functions, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .compress import ALL_METHODS, DEFAULT_METHOD
from .cli_options import calibration_options
from .errors import EdgesvdError
from .learned import LearnedConfig
from .units import fmt_bytes

# Wide when piped (rich would fall back to 80 columns and truncate layer names).
out_console = Console() if sys.stdout.isatty() else Console(width=200)


def _fail(exc: EdgesvdError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Turns every EdgesvdError raised by a command into `error: …` and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgesvdError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgesvd")
def main() -> None:
    """edgesvd: compress transformer models by learned low-rank factorization for edge devices."""


def model_options(f):
    """Options that choose the model and its targeted layers."""
    f = click.option("--include", multiple=True, metavar="GLOB",
                     help="Also compress Linear layers whose name matches (e.g. 'lm_head'). Repeatable.")(f)
    f = click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Do not compress layers whose name matches (e.g. '*.attention.*'). Repeatable.")(f)
    f = click.option("--trust-remote-code", is_flag=True, default=False,
                     help="Allow model code from the model folder/hub to run (off by default).")(f)
    f = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where compression runs: auto uses CUDA when torch sees a GPU.")(f)
    return f


@main.command()
@click.argument("model", default="minilm", required=False)
@click.option("--method", type=click.Choice(ALL_METHODS), default=DEFAULT_METHOD,
              show_default=True,
              help="plain: magnitude SVD; asvd: activation-scaled SVD; whiten: truncation-aware whitening; "
                   "learned: whitened candidates, learned component importance, global rank selection and "
                   "distillation fine-tuning (slower, best quality).")
@click.option("--keep", type=float, default=0.5, show_default=True,
              help="Parameters of the targeted Linear layers after ÷ before, in (0, 1].")
@click.option("--rank-multiple", type=int, default=8, show_default=True,
              help="Round every rank to a multiple of this (8/16 suits CPU SIMD, 64 GPU tensor cores).")
@calibration_options
@model_options
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per forward pass.")
@click.option("--steps", type=int, default=LearnedConfig.steps, show_default=True,
              help="learned: stage-2 steps that train the importance scores and prune gradually to the budget.")
@click.option("--finetune-steps", type=int, default=LearnedConfig.finetune_steps, show_default=True,
              help="learned: stage-3 steps that fine-tune the kept factors against the dense model (0: none).")
@click.option("--margin", type=float, default=LearnedConfig.margin, show_default=True,
              help="learned: stage-1 candidates per layer, as extra fraction over the budget (0.5: 1.5×keep).")
@click.option("--lr", type=float, default=LearnedConfig.lr, show_default=True, help="learned: learning rate of the scores.")
@click.option("--finetune-lr", type=float, default=LearnedConfig.finetune_lr, show_default=True,
              help="learned: learning rate of the factors in stage 3.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compress(model, method, keep, rank_multiple, calib, calib_samples, calib_len, seed, include, exclude,
             trust_remote_code, device, batch_size, steps, finetune_steps, margin, lr, finetune_lr, out, force, quiet):
    """Compress MODEL (alias 'minilm', a local folder, or a hub id) into a checkpoint folder."""
    from .calibration import CalibrationConfig
    from .checkpoint import check_output_dir, save_compressed
    from .compress import CompressConfig, compress as run_compress

    check_output_dir(out, force)
    learned = LearnedConfig(steps=steps, finetune_steps=finetune_steps, margin=margin, lr=lr, finetune_lr=finetune_lr)
    cfg = CompressConfig(model=model, method=method, keep=keep, rank_multiple=rank_multiple,
                         calibration=CalibrationConfig(tuple(calib), calib_samples, calib_len, seed),
                         include=tuple(include), exclude=tuple(exclude), device=device, batch_size=batch_size,
                         trust_remote_code=trust_remote_code, show_progress=not quiet, learned=learned)
    result = run_compress(cfg)
    save_compressed(result.model, result.tokenizer, result.record, out, result.spectra, force=force)
    r = result.record
    click.echo(f"wrote {out}: method={r.method} keep={r.keep_actual:.3f} (requested {r.keep_requested}) "
               f"layers={sum(l.rank is not None for l in r.layers)}/{len(r.layers)} factorized "
               f"in {r.details.get('wall_s', 0):.1f}s")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
def inspect(checkpoint):
    """Per-layer table of a compressed CHECKPOINT: shape, rank, break-even rank, parameters, bytes."""
    from .inspect import checkpoint_summary

    record, rows, weight_bytes = checkpoint_summary(checkpoint)
    table = Table(title=f"{checkpoint} — method {record.method}, keep {record.keep_actual:.3f} "
                        f"(requested {record.keep_requested})")
    energy = any(r.energy_kept is not None for r in rows)  # spectrum saved: show where the budget went
    scores = any(r.mean_score is not None for r in rows)
    cols = ["layer", "shape", "rank", "break-even", "params before", "params after", "bytes after"]
    cols += ["σ² kept"] * energy + ["mean score"] * scores
    for col in cols:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in rows:
        extra = [f"{row.energy_kept:.1%}" if row.energy_kept is not None else ""] * energy
        extra += [f"{row.mean_score:.2f}" if row.mean_score is not None else ""] * scores
        table.add_row(row.name, f"{row.shape[0]}×{row.shape[1]}", "dense" if row.rank is None else str(row.rank),
                      f"{row.break_even:.0f}", _fmt_int(row.params_before), _fmt_int(row.params_after),
                      fmt_bytes(row.bytes_after), *extra)
    before, after = sum(r.params_before for r in rows), sum(r.params_after for r in rows)
    table.add_row("[bold]total", "", f"{sum(r.rank is not None for r in rows)}/{len(rows)} low-rank", "",
                  _fmt_int(before), _fmt_int(after), fmt_bytes(4 * after), *([""] * (energy + scores)),
                  end_section=True)
    out_console.print(table)
    out_console.print(f"model.safetensors: {fmt_bytes(weight_bytes)}; targeted keep {after / before:.3f}")


from .profile_commands import calibrate_device, plan, profiles  # noqa: E402  (profiles, budgets)

main.add_command(profiles)
main.add_command(plan)
main.add_command(calibrate_device)


# ONNX export, parity, profiling, bundles and `run` live in exporters/ (onnx is imported lazily there).
from exporters.commands import register as _register_exporters  # noqa: E402

_register_exporters(main)


if __name__ == "__main__":  # pragma: no cover
    main()
