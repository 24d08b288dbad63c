"""Compression methods as small configs: Plain, Asvd, Whiten and Learned (the default), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar

from .device import PRECISIONS
from .errors import ConfigError
from .factorize import FORMS
from .families import Family
from .importance import CANDIDATE_SPECTRA, SELECTIONS
from .weightgrid import check_grid

# Stages 2 and 3 each make at most this many passes over the calibration set by default: more
# learns the sample rather than the model (on stories260K a held-back probe stopped improving long
# before the training loss), and a small --calib-samples then means a short run.
MAX_DEFAULT_EPOCHS = 16
# Time guard on the default steps: stages 2 + 3 together train at most this many
# (targeted parameters × tokens); past it both step counts shrink in proportion, never below
# MIN_DEFAULT_STEPS. MiniLM (240 steps × 16 × 128 tokens × 10.6 M) and stories260K stay below it; a
# 135 M LLM would get about 90 steps instead of 1,200 on the whole-model path (a time bound), and 23
# per block and end to end on the streamed path (measured as good as 46: README).
TRAIN_WORK_CAP = 1e13
MIN_DEFAULT_STEPS = 20


@dataclass(frozen=True)
class Method:
    """What every method shares. keep: parameters of the targeted Linear layers after ÷ before,
    in (0, 1]. rank_multiple: every rank is rounded to a multiple of this. form: how a factorized
    layer is stored, 'plain' or 'pivoted' (edgesvd.factorize); None: the family's (`Family.form`)."""

    keep: float = 0.5
    rank_multiple: int = 8
    form: str | None = None
    name: ClassVar[str] = ""
    needs_statistics: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not (0.0 < self.keep <= 1.0):
            raise ConfigError(f"keep must be in (0, 1], got {self.keep}")
        if self.rank_multiple < 1:
            raise ConfigError(f"rank multiple must be >= 1, got {self.rank_multiple}")
        if self.form is not None and self.form not in FORMS:
            raise ConfigError(f"unknown form '{self.form}' (choose from {', '.join(FORMS)})")

    def pivoted(self, family: Family) -> bool:
        """Whether this method factorizes `family`'s layers in the pivoted form."""
        return (self.form or family.form) == "pivoted"


@dataclass(frozen=True)
class Plain(Method):
    """Magnitude SVD of each weight: ignores the data."""

    name: ClassVar[str] = "plain"
    needs_statistics: ClassVar[bool] = False


@dataclass(frozen=True)
class Asvd(Method):
    """Activation-aware SVD: input channels scaled by (RMS activation)^0.5 before the SVD."""

    name: ClassVar[str] = "asvd"


@dataclass(frozen=True)
class Whiten(Method):
    """Truncation-aware whitening (SVD-LLM): SVD of W·L with XᵀX/n + λI = L·Lᵀ."""

    name: ClassVar[str] = "whiten"


@dataclass(frozen=True)
class Learned(Method):
    """Learned importance of every singular component (the default method), in three stages.

    steps / finetune_steps: optimizer steps of stage 2 (scores) and stage 3 (factors).
    margin: stage 1 keeps candidates up to keep·(1+margin) of each layer (capped at dense).
    lr / finetune_lr: Adam learning rates of the scores and of the factors.
    steps, finetune_steps, finetune_lr, margin and batch_size left None come from the model's family and size
    (`resolved`: the family's measured recipe, at most MAX_DEFAULT_EPOCHS passes over the
    calibration set, within TRAIN_WORK_CAP).
    finetune_dense: stage 3 also trains the targeted layers the global selection left dense
    (frozen otherwise, at weights the rest of the network has moved away from).
    batch_size: calibration sequences per training step (and per batch of stage 1's loss-gradient pass).
    budget_weight: weight of (expected kept params / scheduled target − 1)² in stage 2.
    max_score: cap on the scores (None: amplification allowed; 1.0 is the no-amplification ablation).
    selection: 'global' (importance per unit cost across layers) or 'uniform' (ablation: every layer
    gets the uniform rank and keeps its most important candidates).
    candidates: the spectrum stage 1 takes its candidates from: 'curvature' (K-FAC: the Gram matrix
    of the loss gradients at each layer's output as well as XᵀX, spectra.curvature_spectrum; one more
    backward pass over the calibration set; statistics.collect_output_gradients says which loss) or
    'whiten' (XᵀX only); None: the family's (LearnedRecipe.candidates: curvature for both).
    train_precision: of the streamed path's fine-tuning forward passes (per block and end to end;
    edgesvd.device.PRECISIONS): 'bfloat16' runs them under bfloat16 autocast, the weights, gradients,
    optimizer states and the loss's head stay float32; 'auto': bfloat16 on CPUs with AMX and on CUDA
    GPUs with bf16, float32 elsewhere. The whole-model path (small models) trains in float32.
    quantize_aware: a weight grid (edgesvd.weightgrid.GRIDS; 'int4': onnxruntime's MatMulNBits) that
    stage 3 trains the factors and the targets left dense through, so that the weights the export's
    quantizer rounds are ones the network learned to work with; None: fine-tuning in full precision.
    It implies form 'plain': pivoting the factors afterwards would replace the trained weights.
    """

    steps: int | None = None
    finetune_steps: int | None = None
    margin: float | None = None
    lr: float = 0.05
    finetune_lr: float | None = None
    finetune_dense: bool = True
    batch_size: int | None = None
    budget_weight: float = 10.0
    max_score: float | None = None
    selection: str = "global"
    candidates: str | None = None
    train_precision: str = "auto"
    quantize_aware: str | None = None
    name: ClassVar[str] = "learned"

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(s is not None and s < 0 for s in (self.steps, self.finetune_steps)):
            raise ConfigError(f"steps must be >= 0, got {self.steps} and {self.finetune_steps}")
        if self.margin is not None and self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        if self.lr <= 0 or (self.finetune_lr is not None and self.finetune_lr <= 0):
            raise ConfigError("learning rates must be > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"learned batch size must be >= 1, got {self.batch_size}")
        if self.budget_weight < 0:
            raise ConfigError(f"budget weight must be >= 0, got {self.budget_weight}")
        if self.max_score is not None and self.max_score <= 0:
            raise ConfigError(f"max score must be > 0, got {self.max_score}")
        if self.train_precision not in PRECISIONS:
            raise ConfigError(f"unknown train precision '{self.train_precision}' (choose from {', '.join(PRECISIONS)})")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection '{self.selection}' (choose from {', '.join(SELECTIONS)})")
        if self.candidates is not None and self.candidates not in CANDIDATE_SPECTRA:
            raise ConfigError(f"unknown candidates '{self.candidates}' (choose from {', '.join(CANDIDATE_SPECTRA)})")
        if self.quantize_aware is not None:
            check_grid(self.quantize_aware)
            if self.form == "pivoted":
                raise ConfigError("quantization-aware fine-tuning trains plain factors (pivoting afterwards would "
                                  "replace the trained weights): use --form plain")
            object.__setattr__(self, "form", "plain")


    def resolved(self, family: Family, targeted_params: int, num_sequences: int, seq_len: int,
                 hidden_size: int, finetune_passes: int = 1) -> "Learned":
        """This config with the fields left None filled in for one model: the family's recipe, each
        stage capped at MAX_DEFAULT_EPOCHS passes over `num_sequences` calibration sequences, both
        scaled down together (not below MIN_DEFAULT_STEPS) when stages 2 + 3 would exceed
        TRAIN_WORK_CAP (targeted parameters × training tokens, stage 3 counted `finetune_passes`
        times: the streamed path runs its steps per block and then end to end); the fine-tuning rate
        scaled to `hidden_size` (LearnedRecipe.finetune_lr_for); margin and batch size the recipe's.
        Values given explicitly stay."""
        recipe = family.learned
        self = replace(self, margin=recipe.margin if self.margin is None else self.margin,
                       batch_size=recipe.batch_size if self.batch_size is None else self.batch_size)
        per_epoch = math.ceil(num_sequences / min(self.batch_size, num_sequences))
        filled: dict = {k: min(v, MAX_DEFAULT_EPOCHS * per_epoch)
                        for k, v in (("steps", recipe.steps), ("finetune_steps", recipe.finetune_steps))
                        if getattr(self, k) is None}
        passes = {"steps": 1, "finetune_steps": finetune_passes}
        tokens = min(self.batch_size, num_sequences) * seq_len
        work = sum(v * passes[k] for k, v in filled.items()) * tokens * targeted_params
        if work > TRAIN_WORK_CAP:
            filled = {k: min(v, max(MIN_DEFAULT_STEPS, round(v * TRAIN_WORK_CAP / work))) for k, v in filled.items()}
        if self.finetune_lr is None:
            filled["finetune_lr"] = recipe.finetune_lr_for(hidden_size)
        filled["candidates"] = self.candidates_for(family)
        return replace(self, **filled)

    def candidates_for(self, family: Family) -> str:
        """The spectrum stage 1 takes candidates from for `family`: the one asked for, else the family's."""
        return self.candidates or family.learned.candidates


METHODS: dict[str, type[Method]] = {m.name: m for m in (Plain, Asvd, Whiten, Learned)}
# The best method available; `edgesvd run` and `compress` use it when none is named.
DEFAULT_METHOD = "learned"


def method_config(method: Method | str, **options) -> Method:
    """A Method from a config or a name; `options` that the method does not have are ignored (the
    CLI passes the learned method's options whatever the method)."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    cls = METHODS[method]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in options.items() if k in names and v is not None})
