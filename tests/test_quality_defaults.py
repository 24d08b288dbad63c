"""Quality by default: the built-in natural-prose corpus, `--calib self`, and learned defaults derived
from the model's family, size and calibration (issue 13)."""

from __future__ import annotations

from dataclasses import replace
from importlib.resources import files

import pytest
import torch
from click.testing import CliRunner

from edgesvd import CalibrationConfig, Learned, compress
from edgesvd.calibration import builtin_documents, default_sequences, docstring_documents, sample_calibration
from edgesvd.cli import main
from edgesvd.errors import CalibrationError
from edgesvd.families import DECODER, ENCODER
from edgesvd.loading import load_model, load_tokenizer, resolve_model
from edgesvd.methods import MAX_DEFAULT_EPOCHS, MIN_DEFAULT_STEPS, TRAIN_WORK_CAP


def test_builtin_corpus_is_natural_prose_shipped_with_its_attribution():
    corpus = files("edgesvd") / "corpus"
    attribution = (corpus / "ATTRIBUTION.md").read_text(encoding="utf-8")
    docs = builtin_documents()
    assert len(docs) == 952 and len((corpus / "natural_en.txt").read_bytes()) <= 1_000_000
    # every source named with its licence; the non-commercial stories were left out
    for needle in ("World Factbook", "public domain", "Principles of Economics", "CC BY 4.0",
                   "African Storybook", "creativecommons.org/licenses/by/3.0"):
        assert needle in attribution
    assert "licenses/by-nc" not in attribution
    # prose, not code: sentences end in punctuation, few Python identifiers
    assert sum(d.rstrip()[-1] in '.!?"”' for d in docs) > 0.9 * len(docs)
    assert not any("()" in d or "`" in d for d in docs)
    assert sum("()" in d for d in docstring_documents()) > 10  # the docstring option remains, technical text


def test_encoders_sample_sentences_of_the_builtin_corpus(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    batch = sample_calibration(tok, CalibrationConfig(num_sequences=32, seq_len=64), ENCODER)
    assert batch.summary["source"] == "builtin" and batch.summary["documents"] == 952
    lengths = batch.attention_mask.sum(1)
    assert batch.input_ids.shape[0] == 32 and lengths.float().mean() < 48  # sentences, not 64-token windows
    text = tok.decode(batch.input_ids[0][batch.attention_mask[0].bool()], skip_special_tokens=True)
    assert len(text.split()) >= 4


def test_self_calibration_is_seeded_and_is_the_decoder_default(tiny_llama_dir):
    source = resolve_model(str(tiny_llama_dir))
    model, tok = load_model(source), load_tokenizer(source.path)
    one = sample_calibration(tok, CalibrationConfig("self", 6, 12, seed=5), DECODER, model)
    two = sample_calibration(tok, CalibrationConfig(None, 6, 12, seed=5), DECODER, model)  # the default
    other = sample_calibration(tok, CalibrationConfig("self", 6, 12, seed=6), DECODER, model)
    hot = sample_calibration(tok, CalibrationConfig("self", 6, 12, seed=5, temperature=3.0), DECODER, model)
    assert one.input_ids.shape == (6, 12) and bool((one.input_ids[:, 0] == tok.bos_token_id).all())
    assert torch.equal(one.input_ids, two.input_ids) and two.summary["source"] == "self"
    assert not torch.equal(one.input_ids, other.input_ids) and not torch.equal(one.input_ids, hot.input_ids)
    assert one.summary["temperature"] == 1.0 and hot.summary["temperature"] == 3.0
    assert bool(one.attention_mask.all())


def test_self_calibration_is_refused_where_it_cannot_work(tiny_llama_dir, minilm_dir):
    with pytest.raises(CalibrationError, match="decoder"):
        sample_calibration(load_tokenizer(minilm_dir), CalibrationConfig("self", 4, 16), ENCODER,
                           load_model(resolve_model(str(minilm_dir))))
    with pytest.raises(CalibrationError, match="combined"):
        CalibrationConfig(("self", "builtin"))
    with pytest.raises(CalibrationError, match="temperature"):
        CalibrationConfig("self", temperature=0)
    with pytest.raises(CalibrationError, match="model to sample"):
        sample_calibration(load_tokenizer(tiny_llama_dir), CalibrationConfig("self", 4, 16), DECODER)


def test_self_calibration_of_stories260k_is_story_text(stories_dir):
    source = resolve_model(str(stories_dir))
    model, tok = load_model(source), load_tokenizer(source.path)
    batch = sample_calibration(tok, CalibrationConfig("self", 4, 48, seed=0), DECODER, model)
    again = sample_calibration(tok, CalibrationConfig("self", 4, 48, seed=0), DECODER, model)
    assert torch.equal(batch.input_ids, again.input_ids)
    words = " ".join(tok.decode(row, skip_special_tokens=True) for row in batch.input_ids).split()
    # a trained model writes words it knows: mostly alphabetic, with the vocabulary of its stories
    assert len(words) > 60 and sum(w.strip('.,!?"\'').isalpha() for w in words) > 0.8 * len(words)


def test_learned_defaults_come_from_family_size_and_calibration():
    # the families' measured recipes, unchanged where neither cap binds
    enc = Learned().resolved(ENCODER, 10_600_000, 512, 128, 384)
    assert (enc.steps, enc.finetune_steps, enc.finetune_lr, enc.margin, enc.batch_size) == (120, 120, 2e-4, 1.0, 16)
    dec = Learned().resolved(DECODER, 250_000, 2048, 128, 64)
    assert (dec.steps, dec.finetune_steps, dec.finetune_lr, dec.margin, dec.batch_size) == (200, 1000, 1e-3, 0.5, 8)
    # at most MAX_DEFAULT_EPOCHS passes, counted in the family's batches
    assert Learned().resolved(ENCODER, 10_600_000, 16, 32, 384).steps == MAX_DEFAULT_EPOCHS
    assert Learned(batch_size=4).resolved(ENCODER, 10_600_000, 16, 32, 384).steps == MAX_DEFAULT_EPOCHS * 4
    # at most MAX_DEFAULT_EPOCHS passes over a small calibration set
    small = Learned().resolved(DECODER, 250_000, 16, 32, 64)
    assert small.steps == small.finetune_steps == MAX_DEFAULT_EPOCHS * 2
    # a large model: both stages shrink in proportion, within the work cap, not below the floor
    big = Learned().resolved(DECODER, 106_000_000, 2048, 128, 576)
    assert big.steps == MIN_DEFAULT_STEPS and 20 < big.finetune_steps < 200  # 200 → 15, raised to the floor
    assert big.finetune_steps * 8 * 128 * 106_000_000 <= TRAIN_WORK_CAP
    # the streamed path (SmolLM2: 232 windows, 16 per step) runs stage 3 per block and then end to end:
    # the cap counts both, so each gets half of what one pass would (46 → 23)
    once = Learned(steps=0, batch_size=16).resolved(DECODER, 106_000_000, 232, 128, 576)
    twice = Learned(steps=0, batch_size=16).resolved(DECODER, 106_000_000, 232, 128, 576, finetune_passes=2)
    assert (once.finetune_steps, twice.finetune_steps) == (46, 23)
    # and a fine-tuning rate falling as 1/width above the width the recipe was measured on (never raised)
    assert big.finetune_lr == pytest.approx(1e-3 * 64 / 576)
    assert Learned().resolved(ENCODER, 40_000_000, 512, 128, 768).finetune_lr == pytest.approx(1e-4)
    assert Learned().resolved(ENCODER, 4_000_000, 512, 128, 128).finetune_lr == 2e-4
    # explicit values are the user's
    mine = Learned(steps=7, finetune_steps=3, finetune_lr=5e-4, margin=0.25, batch_size=2).resolved(
        ENCODER, 106_000_000, 2048, 128, 576)
    assert (mine.steps, mine.finetune_steps, mine.finetune_lr, mine.margin, mine.batch_size) == (7, 3, 5e-4, 0.25, 2)
    # calibration size: the family's, fewer for a model too large to sample that many quickly
    assert default_sequences(ENCODER, 22_700_000, 128) == 512
    assert default_sequences(DECODER, 292_000, 128) == 2048
    assert 128 <= default_sequences(DECODER, 135_000_000, 128) < 512


def test_stage3_trains_the_layers_left_dense_only_when_asked(tiny_llama_dir):
    def run(finetune_dense):
        method = Learned(keep=0.8, rank_multiple=1, steps=6, finetune_steps=6, batch_size=4,
                         finetune_dense=finetune_dense)
        return compress(str(tiny_llama_dir), method, calib=CalibrationConfig(None, 8, 24), device="cpu")

    dense_model = load_model(resolve_model(str(tiny_llama_dir)))
    trained, frozen = run(True), run(False)
    assert trained.record.calibration["source"] == "self" and trained.record.details["learned"]["steps"] == 6
    left = [l.name for l in trained.record.layers if l.rank is None]
    assert left and left == [l.name for l in frozen.record.layers if l.rank is None]
    for name in left:
        original = dense_model.get_submodule(name).weight
        assert torch.equal(frozen.model.get_submodule(name).weight, original)
        assert not torch.equal(trained.model.get_submodule(name).weight, original)


def test_cli_compress_records_the_resolved_defaults(tiny_llama_dir, tmp_path):
    out = tmp_path / "ck"
    result = CliRunner().invoke(main, ["compress", str(tiny_llama_dir), "--keep", "0.6", "--calib-samples", "8",
                                       "--calib-len", "16", "--calib-temperature", "0.8", "--seed", "3",
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    from edgesvd.checkpoint import read_record

    _, record = read_record(out)
    assert record.calibration["source"] == "self" and record.calibration["temperature"] == 0.8
    learned = record.details["learned"]
    assert (learned["steps"], learned["finetune_steps"], learned["finetune_lr"]) == (16, 16, 1e-3)
    bad = CliRunner().invoke(main, ["compress", str(tiny_llama_dir), "--calib", "self", "--calib", "builtin",
                                    "--out", str(tmp_path / "x"), "--quiet"])
    assert bad.exit_code == 2 and "cannot be combined" in bad.output


def test_decoder_default_is_deterministic_end_to_end(tiny_llama_dir):
    method = replace(Learned(keep=0.6, steps=4, finetune_steps=4, batch_size=4), rank_multiple=1)
    one = compress(str(tiny_llama_dir), method, calib=CalibrationConfig(None, 8, 16, seed=2), device="cpu")
    two = compress(str(tiny_llama_dir), method, calib=CalibrationConfig(None, 8, 16, seed=2), device="cpu")
    for (n, a), (_, b) in zip(one.model.state_dict().items(), two.model.state_dict().items()):
        assert torch.equal(a, b), n
