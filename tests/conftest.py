"""Shared fixtures: tiny random-init models of each family saved as real HF folders, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("EDGESVD_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (tests with real data need ../shared beside the checkout)")
    return p


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return shared_path("models", "stories260K")


@pytest.fixture(scope="session")
def stsb_file() -> Path:
    return shared_path("data", "stsb", "sts-dev.csv")


@pytest.fixture(scope="session")
def tinystories_file() -> Path:
    return shared_path("data", "tinystories", "valid-dev.txt")


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory) -> Path:
    """Real English text without ../shared: built-in corpus documents, blank-line separated (what
    `--eval` reads for a decoder's perplexity)."""
    from edgesvd.calibration import builtin_documents

    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text("\n\n".join(builtin_documents()[-40:]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from edgesvd.loading import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A real byte-level BPE tokenizer (vocab 512) trained offline on the docstring corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgesvd.calibration import docstring_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docstring_documents()[:2000], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# Llama-style decoders share one tiny shape; Llama unties, Qwen2 ties embedding and LM head.
_TINY_DECODER = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tiny(model_cls, config, tokenizer, folder: Path) -> Path:
    torch.manual_seed(0)
    return _save(model_cls(config).eval(), tokenizer, folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny(LlamaForCausalLM, LlamaConfig(**_TINY_DECODER, tie_word_embeddings=False), bpe_tokenizer,
                 tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _tiny(GPT2LMHeadModel, cfg, bpe_tokenizer, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, bpe_tokenizer) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny(Qwen2ForCausalLM, Qwen2Config(**_TINY_DECODER, tie_word_embeddings=True), bpe_tokenizer,
                 tmp_path_factory.mktemp("tiny-qwen2"))


# The other decoder families edgesvd supports, each with the structure that sets it apart: Qwen3's
# q/k norms, Mistral's sliding window, Phi-3's fused qkv and gate_up Linears, Gemma 2's logit
# softcapping and alternating sliding/full attention, Gemma 3's local/global rope. Windows of 16
# tokens are shorter than the calibration and parity sequences, so the windowed masks are exercised;
# Qwen3 and Gemma heads are wider than hidden ÷ heads, as in the real models (Qwen3-0.6B: 128 vs 64).
_GEMMA = dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
              layer_types=["sliding_attention", "full_attention"])
TINY_FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16, tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _GEMMA),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA),
}


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory, bpe_tokenizer):
    """A builder: the tiny random-init decoder of a TINY_FAMILIES model type, saved once per session."""
    import transformers

    built: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type not in built:
            config_cls, model_cls, extra = TINY_FAMILIES[model_type]
            config = getattr(transformers, config_cls)(**_TINY_DECODER, **extra)
            built[model_type] = _tiny(getattr(transformers, model_cls), config, bpe_tokenizer,
                                      tmp_path_factory.mktemp(f"tiny-{model_type}"))
        return built[model_type]

    return build


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """Random-init BERT (2 layers, hidden 64) with MiniLM's real WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256)
    return _save(BertModel(cfg).eval(), tok, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def deep_llama_dir(tmp_path_factory, bpe_tokenizer):
    """Eight blocks whose MLP weights have a shape nothing else in the model has (176×64 / 64×176)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("deep-llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(folder, safe_serialization=True)
    bpe_tokenizer.save_pretrained(folder)
    return folder
