"""The learned method: budget, exact folding, determinism, global selection, CLI/inspect, real MiniLM."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgesvd import CalibrationConfig, Learned, Whiten, compress, load_compressed, save_compressed
from edgesvd.checkpoint import load_spectra
from edgesvd.cli import main
from edgesvd.costmodel import LayerShape
from edgesvd.evaluate import mean_pool
from edgesvd.factorize import LowRankLinear, PivotedLowRank
from edgesvd.importance import ScoredLowRank, candidate_rank, top_components
from edgesvd.planner import LayerImportance, select_global
from edgesvd.spectra import whiten_spectrum
from edgesvd.statistics import ActivationStats, GradientGramHooks, collect_output_gradients
from edgesvd.weightgrid import round_int4

FAST = Learned(steps=6, finetune_steps=4, batch_size=4)


def _compress(model_dir, keep=0.5, multiple=1, learned=FAST, seed=0, samples=8):
    return compress(str(model_dir), replace(learned, keep=keep, rank_multiple=multiple),
                    calib=CalibrationConfig("builtin", samples, 32, seed), device="cpu")


def _layer(name, out_features, in_features, importance) -> LayerImportance:
    return LayerImportance(LayerShape(name, out_features, in_features),
                           np.sort(np.asarray(importance, dtype=np.float64))[::-1])


def test_budget_met_within_one_percent_decoder_and_encoder(tiny_llama_dir, tiny_bert_dir):
    for model_dir, keep in ((tiny_llama_dir, 0.5), (tiny_llama_dir, 0.3), (tiny_bert_dir, 0.4)):
        record = _compress(model_dir, keep).record
        assert abs(record.keep_actual / keep - 1) <= 0.01, (model_dir.name, keep, record.keep_actual)
        assert record.method == "learned"
        losses = record.details["losses"]
        assert {"before_switch", "after_switch", "after_finetune"} <= set(losses)


def test_global_selection_gives_layers_different_ranks(tiny_llama_dir):
    record = _compress(tiny_llama_dir, 0.5, multiple=4).record
    ranks = {l.rank for l in record.layers if l.out_features == l.in_features == 64}
    assert len(ranks) > 1, "global selection should not end uniform on a random-init model"


def test_scores_fold_exactly_into_the_factors():
    torch.manual_seed(0)
    weight, x = torch.randn(24, 40), torch.randn(200, 40)
    spec = whiten_spectrum(weight, (x.T @ x).double(), x.shape[0])
    a, b = spec.factors(16)
    bias = torch.randn(24)
    scored = ScoredLowRank(a.float(), b.float(), bias)
    with torch.no_grad():
        scored.scores.copy_(torch.linspace(-0.5, 2.0, 16))  # negative, pruned-ish and amplified
        scored.alive[3] = 0
    index = torch.tensor([i for i in range(16) if i != 3])
    full = torch.zeros_like(spec.sigma)
    full[:16] = (scored.scores * scored.alive).detach().double()
    fa, fb = spec.factors(index.numel(), full, index)
    folded = LowRankLinear.from_factors(fa.float(), fb.float(), bias)
    probe = torch.randn(7, 40)
    torch.testing.assert_close(folded(probe), scored(probe), atol=1e-5, rtol=1e-5)


def test_folded_checkpoint_reproduces_the_model(tiny_llama_dir, tmp_path):
    result = _compress(tiny_llama_dir, 0.5)
    save_compressed(result.model, result.tokenizer, result.record, tmp_path / "ck", result.spectra)
    loaded, record = load_compressed(tmp_path / "ck")
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    spectra = load_spectra(tmp_path / "ck")
    for layer in record.layers:
        entry = spectra[layer.name]
        assert {"sigma", "scores", "kept"} <= set(entry)
        expected = min(layer.in_features, layer.out_features) if layer.rank is None else layer.rank
        assert int(entry["kept"].sum()) == expected


def test_pivoted_form_is_fine_tuned_plain_then_stored_pivoted(tiny_llama_dir, tmp_path):
    """--form pivoted: the budget is counted in the pivoted form, every factorized layer ends pivoted
    (it was fine-tuned plain: pivoted factors diverge under Adam), and the checkpoint reproduces it."""
    result = _compress(tiny_llama_dir, 0.5, learned=replace(FAST, form="pivoted"))
    factored = [l for l in result.record.layers if l.rank is not None]
    assert factored and all(l.pivoted for l in factored)
    assert all(isinstance(result.model.get_submodule(l.name), PivotedLowRank) for l in factored)
    assert abs(result.record.keep_actual / 0.5 - 1) <= 0.01
    save_compressed(result.model, result.tokenizer, result.record, tmp_path / "ck", result.spectra)
    loaded, _ = load_compressed(tmp_path / "ck")
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_deterministic_with_a_seed(tiny_llama_dir):
    first = _compress(tiny_llama_dir, 0.4).model.state_dict()
    second = _compress(tiny_llama_dir, 0.4).model.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_select_global_prefers_important_per_unit_cost():
    # Two equal-shape layers: all importance in `hot`, so it takes the budget up to break-even (dense).
    hot = _layer("hot", 32, 32, torch.linspace(10, 9, 32))
    cold = _layer("cold", 32, 32, torch.full((32,), 1e-3))
    ranks = select_global([hot, cold], target_params=1024 + 8 * 64, multiple=8)
    assert ranks == {"hot": None, "cold": 8}
    # Same importance, one layer twice as costly per component: the cheap one is filled first.
    wide = _layer("wide", 64, 192, torch.ones(64))
    narrow = _layer("narrow", 64, 64, torch.ones(64))
    ranks = select_global([wide, narrow], target_params=8 * 256 + 24 * 128, multiple=8)
    assert ranks == {"wide": 8, "narrow": 24}


def test_candidates_and_top_components():
    assert candidate_rank(384, 384, 0.5, 0.5, 8) == 144  # 0.75 × break-even 192
    assert candidate_rank(64, 64, 0.8, 0.5, 8) == 64  # reaches break-even: every component
    assert top_components(torch.tensor([0.1, 3.0, 0.2, 2.0]), 2).tolist() == [1, 3]


def test_learned_options_are_validated():
    import pytest

    from edgesvd.errors import ConfigError

    for bad in ({"steps": -1}, {"margin": -0.1}, {"lr": 0}, {"selection": "random"}, {"max_score": 0},
                {"quantize_aware": "int8"}, {"quantize_aware": "int4", "form": "pivoted"}):
        with pytest.raises(ConfigError):
            Learned(**bad)
    assert Learned(quantize_aware="int4").form == "plain"  # pivoting after training would replace the weights


def test_quantization_aware_fine_tuning_trains_the_unrounded_weights_through_the_grid(tiny_llama_dir):
    """The whole-model path: stage 3 sees the factors on the int4 grid (its last loss is the rounded
    model's), the checkpoint keeps the trained unrounded weights and records the grid."""
    result = _compress(tiny_llama_dir, keep=0.6, learned=replace(FAST, quantize_aware="int4"))
    details = result.record.details
    assert details["learned"]["quantize_aware"] == "int4"
    factored = [m for m in result.model.modules() if isinstance(m, LowRankLinear)]
    assert factored and not any(isinstance(m, PivotedLowRank) for m in result.model.modules())
    weight = factored[0].a.weight
    assert isinstance(weight, torch.nn.Parameter) and not torch.equal(weight, round_int4(weight))
    losses = details["losses"]
    assert losses["after_finetune_on_grid"] != losses["after_finetune"]


def test_cli_learned_then_inspect_shows_where_the_budget_went(tiny_bert_dir, tmp_path):
    out = tmp_path / "ck"
    runner = CliRunner()
    res = runner.invoke(main, ["compress", str(tiny_bert_dir), "--keep", "0.5", "--rank-multiple", "2",
                               "--calib-samples", "8", "--calib-len", "32", "--steps", "4",
                               "--finetune-steps", "2", "--device", "cpu", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "method=learned" in res.output
    res = runner.invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "σ² kept" in res.output and "mean score" in res.output
    res = runner.invoke(main, ["compress", str(tiny_bert_dir), "--margin", "-1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "margin" in res.output


def test_minilm_learned_not_worse_than_whiten(minilm_dir, stsb_file):
    """Real weights, few steps, 200 STS-B dev pairs: learned ≥ whiten at the same keep.

    Calibrated on wiki.utf8 (the issue's comparison). 16 sentences are what makes the encoders'
    curvature candidates (the default) a test: their Gram estimate from so few draws must be shrunk
    toward whitening (measured 0.8945 vs 0.8955 for whiten; 0.8838 unshrunk). The 0.005 slack
    covers the noise of a 200-pair Spearman; a broken selection or fold costs far more.
    """
    from conftest import shared_path

    from edgesvd.evaluate import stsb_spearman

    wiki = str(shared_path("data", "calibration", "wiki.utf8"))

    def run(method) -> float:
        result = compress("minilm", method, calib=CalibrationConfig(wiki, 16, 64, 0), device="cpu")
        return stsb_spearman(result.model, result.tokenizer, stsb_file, limit=200)

    whiten = run(Whiten(keep=0.5))
    learned = run(Learned(keep=0.5, steps=8, finetune_steps=4, batch_size=4))
    assert learned >= whiten - 0.005, (learned, whiten)


def test_pruned_components_keep_their_importance_and_score_on_the_path():
    """What the budget planner reads from one learning pass: survivors at their current importance,
    pruned components at the importance (and score) they had when they were pruned."""
    from edgesvd.importance import ScoredLowRank

    layer = ScoredLowRank(torch.randn(4, 6), torch.randn(5, 4), None)
    with torch.no_grad():
        layer.importance.copy_(torch.tensor([4.0, 1.0, 3.0, 2.0]))
        layer.scores.copy_(torch.tensor([1.1, 0.2, 0.9, 0.5]))
    layer.keep_only(2)  # components 1 and 3 go
    with torch.no_grad():
        layer.importance.mul_(0.5)  # what decay does afterwards (a pruned component has no gradient)
        layer.scores.copy_(torch.tensor([1.2, 9.0, 0.8, 9.0]))
    importance, scores = layer.path_importance()
    assert torch.equal(layer.alive, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(importance, torch.tensor([2.0, 1.0, 1.5, 2.0]))
    assert torch.allclose(scores, torch.tensor([1.2, 0.2, 0.8, 0.5]))


def _distill_case(model_dir):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(3, 512, (3, 19))
    mask = torch.ones_like(ids)
    mask[2, 13:] = 0  # a padded row: its last tokens are left out of the loss
    return teacher, student, ids, mask


def _reference_kl(student, target_logits, ids, mask):
    import torch.nn.functional as F

    valid = mask.bool()
    out = student(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return F.kl_div(F.log_softmax(out[valid], -1), F.log_softmax(target_logits[valid], -1), log_target=True,
                    reduction="batchmean")


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("fixture, model_type", [("tiny_llama_dir", None), ("tiny_qwen2_dir", None),
                                                 ("tiny_gpt2_dir", None), (None, "gemma2"),
                                                 (None, "gemma3_text")])
def test_chunked_kl_equals_the_full_logits_loss(fixture, model_type, request, monkeypatch):
    """The decoders' distillation loss, summed over token chunks from the final hidden states (logits
    recomputed in backward), gives the loss and gradients of the full-logits KL: untied and tied heads,
    GPT-2's final LayerNorm, Gemma 2's soft-capped logits, Gemma 3 (whose base_model is itself); teacher targets as logits (whole-model
    path) or as final hidden states through the head (streamed path)."""
    from edgesvd import finetune
    from edgesvd.families import DECODER
    from edgesvd.loading import find_blocks

    model_dir = request.getfixturevalue(fixture) if fixture else request.getfixturevalue("tiny_family_dir")(model_type)
    teacher, student, ids, mask = _distill_case(model_dir)
    monkeypatch.setattr(finetune, "KL_CHUNK_TOKENS", 7)  # 3 × 19 tokens, less padding: several chunks and a rest
    with torch.no_grad():
        target_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        target_hidden = teacher.get_submodule(find_blocks(teacher)[0].rpartition(".")[0])(
            input_ids=ids, attention_mask=mask, use_cache=False)[0]
    reference = _reference_kl(student, target_logits, ids, mask)
    expected = _grads(student, reference)
    assert float(reference.detach()) > 1e-3  # the student differs from its teacher: the comparison is not 0 = 0
    for batch in (finetune.Batch(ids, mask, target_logits),
                  finetune.Batch(ids, mask, target_hidden, finetune.logit_head(teacher))):
        loss = finetune.distill_loss(student, batch, DECODER)
        assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-6), (float(loss), float(reference))
        for got, want in zip(_grads(student, loss), expected, strict=True):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_model_that_changes_its_logits_after_the_head_trains_on_full_logits(tiny_llama_dir):
    """An architecture whose logits are not its head's output (here scaled after the head) is found by
    the one-time check and distilled on its real logits."""
    from transformers import LlamaForCausalLM

    from edgesvd import finetune
    from edgesvd.families import DECODER

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    teacher, _, ids, mask = _distill_case(tiny_llama_dir)
    student = Scaled.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        target_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    reference = _reference_kl(student, target_logits, ids, mask)
    loss = finetune.distill_loss(student, finetune.Batch(ids, mask, target_logits), DECODER)
    assert finetune._SPLITS[student] is None
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-6)


def test_a_decoder_teacher_caches_final_hidden_states_and_keeps_its_own_head(tiny_qwen2_dir):
    """The whole-model path's decoder teacher: tokens × hidden cached (not × vocabulary), a frozen copy of
    the (tied) head, and targets whose logits are the dense model's."""
    from transformers import AutoModelForCausalLM

    from edgesvd.calibration import CalibrationBatch
    from edgesvd.families import DECODER
    from edgesvd.finetune import Teacher

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir).eval()
    ids = torch.randint(3, 512, (6, 12))
    teacher = Teacher(model, CalibrationBatch(ids, torch.ones_like(ids), {}), DECODER, torch.device("cpu"), 4)
    assert teacher.cache.shape == (6, 12, model.config.hidden_size) and teacher.model is None
    assert teacher.head.head is not model.get_output_embeddings()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(2)  # what fine-tuning an --include'd head would do
        batch = teacher.batch(torch.tensor([4, 1]))
        model.get_output_embeddings().weight.div_(2)
        dense = model(input_ids=ids[[4, 1]], use_cache=False).logits
    assert torch.allclose(batch.head(batch.target), dense, atol=1e-5)


def test_an_encoders_output_gradient_grams_estimate_the_gauss_newton_matrix(tiny_bert_dir):
    """Encoders' curvature candidates: Σ gᵀg with g = Jᵀv, v ~ N(0, I) per sentence, is an unbiased
    estimate of Σ JᵀJ (J: the Jacobian of the unit-normalised pooled embedding), which one backward
    per embedding coordinate gives exactly. One draw is noisy (a 64-wide matrix from 256 rank-one
    terms); the mean of eight draws is about √8 closer."""
    from edgesvd.calibration import sample_calibration
    from edgesvd.loading import load_model, load_tokenizer, resolve_model

    source = resolve_model(str(tiny_bert_dir))
    model, tok = load_model(source), load_tokenizer(source.path)
    calib = sample_calibration(tok, CalibrationConfig(source="builtin", num_sequences=256, seq_len=24), source.family)
    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    draws = [collect_output_gradients(model, targets, calib, False, 64, seed=s).gram for s in range(8)]
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # untouched, restored
    model.requires_grad_(False)
    hooks = GradientGramHooks(ActivationStats(), {t: model.get_submodule(t) for t in targets})
    with torch.enable_grad():
        for ids, attention in calib.batches(64):
            hooks.batch(attention.reshape(-1).bool())
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            hidden = model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pool(hidden, attention), dim=-1)
            for k in range(pooled.shape[1]):  # Σ_k of e_k's backward: Σ_t J_tᵀ·J_t
                pooled[:, k].sum().backward(retain_graph=True)
    exact = hooks.remove().gram
    for t in targets:
        error = lambda g: float((g - exact[t]).norm() / exact[t].norm())  # noqa: E731
        one, mean = error(draws[0][t]), error(sum(d[t] for d in draws) / len(draws))
        assert mean < 0.25 and mean < 0.6 * one, (t, one, mean)
