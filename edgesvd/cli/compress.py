"""`edgesvd compress` and `edgesvd inspect`."""

from __future__ import annotations

import click

from edgesvd.compression import compress as compress_model
from edgesvd.device import PRECISIONS
from edgesvd.importance import CANDIDATE_SPECTRA
from edgesvd.inspect import checkpoint_summary
from edgesvd.loading import DEFAULT_MODEL
from edgesvd.methods import DEFAULT_METHOD, METHODS, Learned, method_config
from edgesvd.outputs import check_output_dir
from edgesvd.streaming import STREAM_CHOICES
from edgesvd.weightgrid import GRIDS

from .options import PATH, calibration, calibration_options, form_option, out_console, reporter
from .printing import print_checkpoint


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


@click.command()
@click.argument("model", default="minilm", required=False)
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help="plain: magnitude SVD; asvd: activation-scaled SVD; whiten: truncation-aware whitening; "
                   "learned: curvature-weighted candidates, learned component importance, "
                   "global rank selection and distillation fine-tuning (slower, best quality).")
@click.option("--keep", type=float, default=0.5, show_default=True,
              help="Parameters of the targeted Linear layers after ÷ before, in (0, 1].")
@click.option("--rank-multiple", type=int, default=8, show_default=True,
              help="Round every rank to a multiple of this (8/16 suits CPU SIMD, 64 GPU tensor cores).")
@form_option
@calibration_options
@model_options
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per forward pass.")
@click.option("--steps", type=int, default=None,
              help="learned: stage-2 steps that train the importance scores and prune gradually to the budget "
                   "[default: from the model family and size: 120 encoders, 200 decoders; see README; unused when "
                   "streamed].")
@click.option("--finetune-steps", type=int, default=None,
              help="learned: stage-3 steps that fine-tune the kept factors against the dense model (0: none) "
                   "[default: from the model family and size: 120 encoders, 1000 decoders; streamed: per block and "
                   "end to end].")
@click.option("--margin", type=float, default=None,
              help="learned: stage-1 candidates per layer, as extra fraction over the budget (0.5: 1.5×keep) "
                   "[default: from the model family: 1.0 encoders, 0.5 decoders].")
@click.option("--lr", type=float, default=Learned.lr, show_default=True, help="learned: learning rate of the scores.")
@click.option("--finetune-lr", type=float, default=None,
              help="learned: learning rate of stage 3 [default: 2e-4 encoders, 1e-3 decoders, times 384 or 64 / "
                   "hidden size above those widths; see README].")
@click.option("--candidates", type=click.Choice(list(CANDIDATE_SPECTRA)), default=None,
              help="learned: where stage-1 candidates come from. curvature: the SVD weighted by XᵀX and by the Gram "
                   "matrix of the loss gradients at each layer's output (K-FAC; decoders: next-token loss, encoders: "
                   "random projections of the pooled embedding; one more backward pass over the calibration set); "
                   "whiten: by XᵀX only (faster) [default: curvature].")
@click.option("--finetune-dense/--no-finetune-dense", default=Learned.finetune_dense, show_default=True,
              help="learned: stage 3 also trains the targeted layers the global selection left dense.")
@click.option("--stream", type=click.Choice(list(STREAM_CHOICES)), default="auto", show_default=True,
              help="Compress one transformer block at a time, reading its weights from the safetensors files "
                   "(memory: one block plus the calibration activations). auto: for decoders whose weights "
                   "exceed 256 MiB. The learned method then learns importance end to end in one reverse sweep "
                   "(--steps unused), fine-tunes each block against the dense one (--finetune-steps per block), "
                   "then the whole model when memory allows.")
@click.option("--calib-precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
              help="Streamed compression: precision of the passes over the calibration data that train nothing "
                   "(statistics, propagation, the learned method's importance sweep). bfloat16 runs them under bf16 "
                   "autocast, XᵀX a float32 product (needs a CPU with AMX or AVX512-BF16, or a GPU); auto: bfloat16 on "
                   "CPUs with AMX and CUDA GPUs, else float32. Factorization and the whole-model path compute in "
                   "float32/64; fine-tuning: --train-precision.")
@click.option("--train-precision", type=click.Choice(list(PRECISIONS)), default=Learned.train_precision,
              show_default=True,
              help="learned, streamed compression: precision of the fine-tuning steps' forward passes (per block and "
                   "end to end). bfloat16 runs them under bf16 autocast; weights, gradients, Adam states and the "
                   "loss's head stay float32. auto: bfloat16 on CPUs with AMX and CUDA GPUs, else float32. The "
                   "whole-model path trains in float32.")
@click.option("--quantize-aware", type=click.Choice(list(GRIDS)), default=None,
              help="learned: fine-tune (stage 3) through this weight grid, so the factors survive `export --quantize` "
                   "to it: int4 is onnxruntime's MatMulNBits (symmetric blocks of 32). Implies --form plain. "
                   "`run --quantize int4` turns it on.")
@click.option("--out", "out", type=PATH, required=True, help="Checkpoint folder to write.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compress(model, method, keep, rank_multiple, form, calib, calib_samples, calib_len, calib_temperature, seed, include,
             exclude, trust_remote_code, device, batch_size, steps, finetune_steps, margin, lr, finetune_lr,
             candidates, finetune_dense, stream, calib_precision, train_precision, quantize_aware, out, force, quiet):
    """Compress MODEL (alias 'minilm', a local folder, a .gguf file, the alias 'smollm2', or a hub id) into a
    checkpoint folder."""
    check_output_dir(out, force, inputs=[*calib] + ([] if model == DEFAULT_MODEL else [model]))
    config = method_config(method, keep=keep, rank_multiple=rank_multiple, form=form, steps=steps,
                           finetune_steps=finetune_steps,
                           margin=margin, lr=lr, finetune_lr=finetune_lr, finetune_dense=finetune_dense,
                           candidates=candidates, train_precision=train_precision, quantize_aware=quantize_aware)
    result = compress_model(model, config, calib=calibration(calib, calib_samples, calib_len, calib_temperature, seed),
                            include=include, exclude=exclude, device=device, batch_size=batch_size,
                            trust_remote_code=trust_remote_code, stream=stream, calib_precision=calib_precision,
                            reporter=reporter(quiet))
    if not result.writer:  # torchrun: rank 0 writes the checkpoint
        return
    result.save(out, force=force)
    r = result.record
    click.echo(f"wrote {out}: method={r.method} keep={r.keep_actual:.3f} (requested {r.keep_requested}) "
               f"layers={sum(l.rank is not None for l in r.layers)}/{len(r.layers)} factorized "
               f"in {r.details.get('wall_s', 0):.1f}s")


@click.command()
@click.argument("checkpoint", type=PATH)
def inspect(checkpoint):
    """Per-layer table of a compressed CHECKPOINT: shape, rank, break-even rank, parameters, bytes."""
    print_checkpoint(out_console(), checkpoint, checkpoint_summary(checkpoint))
