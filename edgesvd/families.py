"""Model families edgesvd compresses and exports, described once: code asks the family, never a name."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError, ModelLoadError


@dataclass(frozen=True)
class Family:
    """What differs between encoders and decoders, for every stage of the pipeline.

    name: as written in checkpoints and manifests. model_types: transformers `model_type`s.
    auto_class: the transformers Auto class loading the head edgesvd compresses and exports.
    onnx_task: optimum's export task. causal: generates with a KV cache (prefill and decode are
    timed, distillation compares next-token distributions, calibration cuts windows).
    calibration_unit / default_calibration: what one calibration sequence is, and how many.
    task_score / higher_is_better: what `--eval FILE` measures. quality_proxy: the agreement
    with the dense model a budget run reports without `--eval`. pooled_output: a mean-pooled
    `sentence_embedding` output makes sense (the embedding a sentence encoder is used for).
    """

    name: str
    model_types: frozenset[str]
    auto_class: str
    onnx_task: str
    causal: bool
    calibration_unit: str
    default_calibration: int
    task_score: str
    higher_is_better: bool
    quality_proxy: str
    pooled_output: bool

    def timed_length(self, sequence_length: int, prompt_length: int | None = None) -> int:
        """Tokens per sequence of the timed pass: decoders time the prefill of their prompt."""
        return (prompt_length or sequence_length) if self.causal else sequence_length

    def auto_model(self):
        """The transformers Auto class (imported on use: transformers is slow to import)."""
        import transformers

        return getattr(transformers, self.auto_class)

    def __str__(self) -> str:
        return self.name


# 512 sentences and 128 windows of 128 tokens are both about 15 k tokens of MiniLM / Llama text.
ENCODER = Family("encoder", frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert"}),
                 "AutoModel", "feature-extraction", causal=False, calibration_unit="sentence",
                 default_calibration=512, task_score="stsb_spearman", higher_is_better=True,
                 quality_proxy="similarity_spearman_vs_dense", pooled_output=True)
DECODER = Family("decoder", frozenset({"llama", "qwen2", "qwen3", "mistral", "gpt2", "opt", "phi3", "gemma", "gemma2"}),
                 "AutoModelForCausalLM", "text-generation-with-past", causal=True, calibration_unit="window",
                 default_calibration=128, task_score="perplexity", higher_is_better=False,
                 quality_proxy="top1_agreement_vs_dense", pooled_output=False)
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
