"""Model families edgesvd compresses and exports, described once: code asks the family, never a name."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError, ModelLoadError


@dataclass(frozen=True)
class LearnedRecipe:
    """The learned method's settings measured best for a family (the defaults of `Learned` fields
    left None; edgesvd.methods.Learned.resolved scales them to the model and its calibration).

    steps / finetune_steps: stage-2 and stage-3 optimizer steps. finetune_lr: Adam learning rate
    of stage 3 (the factors, and the layers left dense) at `width`, the hidden size it was measured
    on; a wider model gets finetune_lr·width/hidden_size (Adam's step on a weight moves each output
    by about lr·fan-in, so the rate that keeps that move constant falls as 1/width: μP, Yang et al.
    2021). candidates: the spectrum stage 1 takes candidates from (Learned.candidates), 'curvature'
    for both families today (stories260K keep 0.8: 4.8465 -> 4.7203; SmolLM2 keep 0.8: 26.82 -> 24.74;
    MiniLM keep 0.5, seeds 0 / 1: Wikipedia 0.8493 / 0.8522 -> 0.8544 / 0.8573, built-in corpus
    0.8608 / 0.856 -> 0.8626 / 0.8587, one more backward pass); 'whiten' is the cheaper alternative.
    margin / batch_size: stage 1's extra candidates (Learned.margin) and the sequences per training
    step of stages 2 and 3.
    """

    steps: int
    finetune_steps: int
    finetune_lr: float
    width: int
    candidates: str = "curvature"
    margin: float = 0.5
    batch_size: int = 8

    def finetune_lr_for(self, hidden_size: int) -> float:
        """Stage 3's learning rate for a model of this hidden size: the recipe's, scaled down as 1/width
        above the width it was measured on (never scaled up: narrower models were not measured)."""
        return self.finetune_lr * min(1.0, self.width / hidden_size)


@dataclass(frozen=True)
class Family:
    """What differs between encoders and decoders, for every stage of the pipeline.

    name: as written in checkpoints and manifests. model_types: transformers `model_type`s.
    auto_class: the transformers Auto class loading the head edgesvd compresses and exports.
    onnx_task: optimum's export task. causal: generates with a KV cache (prefill and decode are
    timed, distillation compares next-token distributions, calibration cuts windows).
    calibration_unit / default_calibration: what one calibration sequence is, and how many.
    default_calibration_source: where calibration text comes from without --calib.
    learned: the learned method's recipe for this family.
    task_score / higher_is_better: what `--eval FILE` measures. quality_proxy: the agreement
    with the dense model a budget run reports without `--eval`. pooled_output: a mean-pooled
    `sentence_embedding` output makes sense (the embedding a sentence encoder is used for).
    form: how factorized layers are stored by default (edgesvd.factorize.FORMS).
    """

    name: str
    model_types: frozenset[str]
    auto_class: str
    onnx_task: str
    causal: bool
    calibration_unit: str
    default_calibration: int
    default_calibration_source: str
    learned: LearnedRecipe
    task_score: str
    higher_is_better: bool
    quality_proxy: str
    pooled_output: bool
    form: str = "plain"

    def timed_length(self, sequence_length: int, prompt_length: int | None = None) -> int:
        """Tokens per sequence of the timed pass: decoders time the prefill of their prompt."""
        return (prompt_length or sequence_length) if self.causal else sequence_length

    def auto_model(self):
        """The transformers Auto class (imported on use: transformers is slow to import)."""
        import transformers

        return getattr(transformers, self.auto_class)

    def __str__(self) -> str:
        return self.name


# Encoders: 512 sentences of the built-in corpus, 120 + 120 steps, fine-tune lr 2e-4. On MiniLM at
# keep 0.5 (STS-B dev) 120 + 120 steps scored 0.861 / 0.856 (seeds 0 / 1) against 0.857 / 0.853 with
# 60 + 60; 200 + 200 and 60 + 180 were no better, 1,024 sentences no better (notes: quality.md).
# Margin 1.0 (candidates up to break-even at keep 0.5) and 16 sentences per step together, with the
# curvature candidates: Wikipedia calibration 0.8544 / 0.8573 -> 0.8604 / 0.8592, built-in corpus
# 0.8626 / 0.8587 -> 0.8615 / 0.8640; either alone gained about 0.0015 (README, "Quality by default").
ENCODER = Family("encoder", frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert"}),
                 "AutoModel", "feature-extraction", causal=False, calibration_unit="sentence",
                 default_calibration=512, default_calibration_source="builtin",
                 learned=LearnedRecipe(steps=120, finetune_steps=120, finetune_lr=2e-4, width=384, margin=1.0,
                                       batch_size=16),
                 task_score="stsb_spearman", higher_is_better=True,
                 quality_proxy="similarity_spearman_vs_dense", pooled_output=True)
# Decoders: 2,048 sequences of 128 tokens sampled from the model itself, 200 + 1000 steps, fine-tune
# lr 1e-3. On stories260K at keep 0.8 this reached 1.26× the dense perplexity, against 1.43× with 512
# sequences and 200 + 400 steps and 2.05× with the former 128 sequences and 60 + 60 steps; more than
# 200 stage-2 steps did not help, stage 3 and calibration size did.
# Decoders are stored pivoted: at a given size the pivoted form keeps far more components, and the
# learned method's perplexity showed it on every decoder measured (stories260K keep 0.8: 1.154× dense
# against 1.261× plain; SmolLM2-135M keep 0.8: 1.34× against 3.00×, keep 0.9: 1.10× against 1.78×, the
# plain rows fine-tuned at the former rate).
# Its price is CPU prefill (SmolLM2 keep 0.8: 0.60× the dense speed against 0.88× plain; decode 0.90×
# against 1.05×); encoders, where the comparison with onnxruntime's int8 is on latency, stay plain.
DECODER = Family("decoder", frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2", "opt", "phi3", "gemma", "gemma2",
                                       "gemma3_text"}),
                 "AutoModelForCausalLM", "text-generation-with-past", causal=True, calibration_unit="window",
                 default_calibration=2048, default_calibration_source="self",
                 learned=LearnedRecipe(steps=200, finetune_steps=1000, finetune_lr=1e-3, width=64),
                 task_score="perplexity", higher_is_better=False,
                 quality_proxy="top1_agreement_vs_dense", pooled_output=False, form="pivoted")
FAMILIES = {f.name: f for f in (ENCODER, DECODER)}
TASK_SCORES = {f.name: f.task_score for f in FAMILIES.values()}


def family_named(name: str) -> Family:
    """The Family recorded as `name` in a checkpoint or manifest."""
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family '{name}' (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def family_of(config) -> Family:
    """The Family of a transformers config: by model type, else by a *ForCausalLM architecture."""
    model_type = getattr(config, "model_type", "")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or []):
        return DECODER
    raise ModelLoadError(
        f"unsupported model type '{model_type}': supported encoders {sorted(ENCODER.model_types)}, "
        f"decoders {sorted(DECODER.model_types)}"
    )
