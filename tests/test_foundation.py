"""Foundation: factorized module, rank arithmetic, statistics, methods, checkpoints round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgesvd import CalibrationConfig, LowRankLinear, Plain, Whiten, compress, load_compressed, save_compressed
from edgesvd.calibration import sample_calibration
from edgesvd.checkpoint import load_spectra
from edgesvd.factorize import (
    MAXVOL_TOLERANCE,
    LayerRecord,
    PivotedLowRank,
    break_even_rank,
    params_at,
    pivot,
    pivot_layers,
    pivot_rows,
    rank_for_params,
    replace_with_factors,
)
from edgesvd.families import DECODER
from edgesvd.loading import load_model, load_tokenizer, resolve_model, select_targets
from edgesvd.planner import uniform_rank
from edgesvd.spectra import asvd_spectrum, curvature_spectrum, plain_spectrum, whiten_spectrum, whitening_factor
from edgesvd.statistics import ActivationStats, GramHooks, Projected, collect_statistics

SMALL = CalibrationConfig(num_sequences=8, seq_len=32)


def small(model_dir, method):
    return compress(str(model_dir), method, calib=SMALL)


def test_lowrank_linear_is_two_matmuls():
    torch.manual_seed(0)
    a, b, bias = torch.randn(4, 10), torch.randn(6, 4), torch.randn(6)
    layer = LowRankLinear.from_factors(a, b, bias)
    x = torch.randn(3, 10)
    assert torch.allclose(layer(x), (x @ a.T) @ b.T + bias, atol=1e-6)
    assert [type(m) for m in layer.children()] == [nn.Linear, nn.Linear]
    assert layer.a.weight.shape == (4, 10) and layer.b.weight.shape == (6, 4) and layer.a.bias is None


def test_rank_arithmetic():
    assert break_even_rank(384, 384) == 192
    assert uniform_rank(384, 384, 0.5, 8) == 96
    assert uniform_rank(1536, 384, 0.5, 8) == 152  # 0.5 · 307.2 = 153.6 → nearest multiple of 8
    assert uniform_rank(1536, 384, 0.5, 32) == 160
    assert uniform_rank(384, 384, 1.0, 8) is None  # at break-even: stays dense
    assert uniform_rank(384, 384, 0.99, 8) is None  # rounds up to 192 = break-even
    assert uniform_rank(64, 64, 0.01, 8) == 8  # never below one multiple
    assert params_at(384, 384, 96) / params_at(384, 384, None) == pytest.approx(0.5)


def test_pivoted_layer_is_the_same_product_in_fewer_parameters():
    torch.manual_seed(0)
    a, b, bias = torch.randn(4, 10), torch.randn(6, 4), torch.randn(6)
    layer = PivotedLowRank.from_factors(a, b, bias, output_rms=torch.rand(6) + 0.5)
    x = torch.randn(3, 10)
    assert torch.allclose(layer(x), (x @ a.T) @ b.T + bias, atol=1e-5)
    assert [type(m) for m in layer.children()] == [nn.Linear, nn.Linear]
    # 4 pivot rows of the product (4×10) and the other 2 rows as combinations of them (2×4)
    assert layer.a.weight.shape == (4, 10) and layer.b.weight.shape == (2, 4) and layer.a.bias is None
    assert sorted(layer.rows.tolist()) == list(range(6))
    assert torch.allclose(layer.weight_product(), b @ a, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        PivotedLowRank(10, 6, 6)


def test_a_pivoted_layer_computes_the_stored_form_whichever_way_pytorch_runs_it():
    """PyTorch runs a pivoted layer through an expanded B (few tokens) or the product (many tokens),
    the export through the stored form; all three are the same function, gradients included."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(12, 20), torch.randn(16, 12), torch.randn(16)
    layer = PivotedLowRank.from_factors(a, b, bias, output_rms=torch.rand(16) + 0.5)
    for tokens in (1, 3, 400):  # 1 and 3: expanded B; 400: the product is fewer operations
        x = torch.randn(tokens, 20)
        stored = layer.stored_forward(x)
        assert torch.allclose(layer(x), stored, atol=1e-5), tokens
        grads = [torch.autograd.grad(f(x).square().sum(), [layer.a.weight, layer.b.weight])
                 for f in (layer, layer.stored_forward)]
        assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-4) for g, h in zip(*grads)), tokens
    traced = torch.jit.trace(layer, torch.randn(400, 20))  # tracing (and ONNX export) records the stored form
    x = torch.randn(5, 20)
    assert "index_select" in traced.graph.str() and torch.allclose(traced(x), layer.stored_forward(x), atol=1e-5)


def test_pivot_layers_stores_a_trained_plain_layer_pivoted_with_the_same_function():
    """The learned method fine-tunes plain factors and pivots once at the end: the pivoted layer
    computes what the trained plain one did, and only layers whose record says pivoted change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 6))
    records = [LayerRecord("0", 10, 6, 4, True, True), LayerRecord("1", 6, 6, 3, True, False)]
    for record in records:
        replace_with_factors(model, record.name, torch.randn(record.rank, record.in_features),
                             torch.randn(record.out_features, record.rank), output_rms=torch.rand(6) + 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # as fine-tuning would
    x = torch.randn(5, 10)
    before = model(x)
    pivot_layers(model, records)
    assert isinstance(model[0], PivotedLowRank) and type(model[1]) is LowRankLinear
    assert torch.allclose(model(x), before, atol=1e-5)
    pivot_layers(model, records)  # already pivoted: left alone
    assert torch.allclose(model(x), before, atol=1e-5)


def test_pivots_bound_the_combinations_and_avoid_outlier_outputs():
    """Any split of the product gives a pivoted layer computing it whose combination weights are
    bounded by maxvol's tolerance (in the basis the rows were chosen in), so the factors quantize
    like weights; splits differing by a scaling of the components give the same layer; an output
    expected to be far larger than the rest is computed through C, not kept as a pivot."""
    torch.manual_seed(1)
    a, b = torch.randn(48, 96, dtype=torch.float64), torch.randn(128, 48, dtype=torch.float64)
    a_new, c, rows = pivot(a, b)
    assert torch.allclose(torch.cat([a_new, c @ a_new])[rows], b @ a, atol=1e-9)
    scale = torch.logspace(-3, 3, 48, dtype=torch.float64)
    _, c2, rows2 = pivot(a / scale[:, None], b * scale)  # σ on one side: same product, other split
    assert torch.equal(rows2, rows) and torch.allclose(c2, c, atol=1e-8)
    # C is basis-free given the rows (B_R·B_S⁻¹), so bounding it in the orthonormal basis bounds it here.
    assert c.abs().max() <= MAXVOL_TOLERANCE + 1e-9
    # A split whose B has orthogonal columns (B = U·√σ, every spectrum's) skips the QR: the same
    # product, |C| under the same bound.
    u, sv, vh = torch.linalg.svd(b @ a, full_matrices=False)
    a3, c3, rows3 = pivot(sv[:48, None].sqrt() * vh[:48], u[:, :48] * sv[:48].sqrt())
    assert torch.allclose(torch.cat([a3, c3 @ a3])[rows3], b @ a, atol=1e-9)
    assert c3.abs().max() <= MAXVOL_TOLERANCE + 1e-9
    pivots = set(rows.argsort()[:48].tolist())
    rms = torch.ones(128, dtype=torch.float64)
    rms[sorted(pivots)[0]] = 40.0  # one outlier among the current pivots
    _, _, rows4 = pivot(a, b, rms)
    assert sorted(pivots)[0] not in set(rows4.argsort()[:48].tolist())


def test_row_choice_reaches_a_locally_maximal_volume():
    """Starting from LU's rows, maxvol swaps until no combination weight exceeds its tolerance, and
    no single swap would then grow the block's volume by more than that: on a basis whose first
    rows LU would pick but that are nearly dependent, the swaps must happen."""
    torch.manual_seed(2)
    q = torch.linalg.qr(torch.randn(300, 40, dtype=torch.float64)).Q
    q[:40] = q[40:80] * 1.5 + 1e-3 * torch.randn(40, 40, dtype=torch.float64)  # tempting, near-copies
    order = pivot_rows(q)
    assert sorted(order.tolist()) == list(range(300))
    sel = order[:40]
    c = torch.linalg.solve(q[sel], q, left=False)
    assert c.abs().max() <= MAXVOL_TOLERANCE + 1e-6
    lu_rows = torch.linalg.lu_factor(q)[1][:40]  # where LU alone stops: a worse block
    start = torch.arange(300)
    for i, p in enumerate((lu_rows - 1).tolist()):
        start[[i, p]] = start[[p, i]]
    volume = torch.linalg.slogdet(q[sel])[1]
    assert volume > torch.linalg.slogdet(q[start[:40]])[1] + 1.0


def test_pivoted_rank_arithmetic():
    assert break_even_rank(384, 384, pivoted=True) == 384  # full rank costs what the dense layer does
    assert params_at(384, 384, 112, pivoted=True) == 112 * (768 - 112)
    assert all(params_at(64, 96, r, pivoted=True) < params_at(64, 96, None) for r in range(1, 64))
    for out_f, in_f, keep in ((384, 384, 0.5), (1536, 384, 0.3), (576, 192, 0.9)):
        r = rank_for_params(out_f, in_f, keep * out_f * in_f, pivoted=True)
        assert r * (out_f + in_f - r) == pytest.approx(keep * out_f * in_f)
    assert uniform_rank(384, 384, 0.5, 8, pivoted=True) == 112  # r(768 − r) = 73,728 → 112.5
    assert uniform_rank(576, 576, 0.9, 8, pivoted=True) == 392  # 393.9; plain: 256
    assert uniform_rank(576, 576, 0.9, 8) == 256
    assert uniform_rank(384, 384, 0.9999, 8, pivoted=True) is None  # rounds up to full rank


def test_whiten_reconstructs_exactly_at_full_rank_and_beats_plain_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(32, 48, dtype=torch.float64)
    mix = torch.randn(48, 48, dtype=torch.float64) * torch.logspace(0, -3, 48, dtype=torch.float64)
    x = torch.randn(2000, 48, dtype=torch.float64) @ mix.T  # strongly anisotropic inputs
    gram = x.T @ x
    full = whiten_spectrum(w, gram, 2000, damp=1e-9)
    a, b = full.factors(32)
    assert torch.allclose(b @ a, w, atol=1e-6)
    err = {}
    for name, spec in (("plain", plain_spectrum(w)), ("whiten", whiten_spectrum(w, gram, 2000))):
        a, b = spec.factors(8)
        err[name] = ((x @ (b @ a).T - x @ w.T).norm() / (x @ w.T).norm()).item()
    assert err["whiten"] < 0.5 * err["plain"]


def test_curvature_spectrum_truncates_in_the_kronecker_factored_loss_metric():
    """With G ∝ I it is whitening (the same truncated weights); with a real G its rank-k truncation has a
    lower ½‖L_Gᵀ·ΔW·L_A‖² (the loss rise under the G ⊗ A Fisher) than whitening's, which ignores G."""
    torch.manual_seed(0)
    w = torch.randn(40, 24, dtype=torch.float64)
    x = torch.randn(3000, 24, dtype=torch.float64) @ (torch.randn(24, 24, dtype=torch.float64)
                                                       * torch.logspace(0, -2, 24, dtype=torch.float64))
    g = torch.randn(3000, 40, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)
    gram, out_gram = x.T @ x, g.T @ g
    for k in (4, 12):
        a, b = curvature_spectrum(w, gram, 3000, 7.0 * torch.eye(40, dtype=torch.float64)).factors(k)
        wa, wb = whiten_spectrum(w, gram, 3000).factors(k)
        assert torch.allclose(b @ a, wb @ wa, atol=1e-10)

    def loss_rise(approx):  # tr(ΔW·A·ΔWᵀ·G) = ‖L_Gᵀ·ΔW·L_A‖²
        delta = approx - w
        return float(torch.trace(delta @ (gram / 3000) @ delta.T @ (out_gram / 3000)))

    for k in (4, 12):
        a, b = curvature_spectrum(w, gram, 3000, out_gram, damp=1e-9).factors(k)
        wa, wb = whiten_spectrum(w, gram, 3000, damp=1e-9).factors(k)
        assert loss_rise(b @ a) < 0.9 * loss_rise(wb @ wa)
    a, b = curvature_spectrum(w, gram, 3000, out_gram, damp=1e-9).factors(24)
    assert torch.allclose(b @ a, w, atol=1e-6)  # every component: the weight itself


def test_curvature_spectrum_shrinks_a_gradient_estimate_made_of_few_draws():
    """An output Gram matrix summed from random draws (encoders) is shrunk toward I by d/(d + draws):
    from no draws it is whitening, from a thousand times d it is nearly the estimate as given."""
    torch.manual_seed(0)
    w = torch.randn(40, 24, dtype=torch.float64)
    x = torch.randn(3000, 24, dtype=torch.float64)
    g = torch.randn(3000, 40, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)
    gram, out_gram = x.T @ x, g.T @ g
    for k in (4, 12):
        none = curvature_spectrum(w, gram, 3000, out_gram, out_samples=0).factors(k)
        white = whiten_spectrum(w, gram, 3000).factors(k)
        assert torch.allclose(none[1] @ none[0], white[1] @ white[0], atol=1e-10)
        many = curvature_spectrum(w, gram, 3000, out_gram, out_samples=40_000).factors(k)
        given = curvature_spectrum(w, gram, 3000, out_gram).factors(k)
        assert torch.allclose(many[1] @ many[0], given[1] @ given[0], atol=0.05 * float(w.norm()))
        assert not torch.allclose(given[1] @ given[0], white[1] @ white[0], atol=0.05 * float(w.norm()))


def test_whiten_survives_singular_statistics():
    w = torch.randn(16, 16, dtype=torch.float64)
    gram = torch.zeros(16, 16, dtype=torch.float64)
    gram[:4, :4] = torch.eye(4, dtype=torch.float64)  # 12 dead input channels
    a, b = whiten_spectrum(w, gram, 10).factors(4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_output_side_statistics_give_the_spectra_of_xtx():
    """A narrow layer's statistics summed as W·XᵀX·Wᵀ and diag(XᵀX) (Projected) give the same truncated
    weights as XᵀX itself, under whiten, curvature and asvd; a wider-than-tall weight cannot use them."""
    torch.manual_seed(0)
    w = torch.randn(20, 48, dtype=torch.float64)
    x = torch.randn(3000, 48, dtype=torch.float64) @ (torch.randn(48, 48, dtype=torch.float64)
                                                       * torch.logspace(0, -3, 48, dtype=torch.float64))
    g = torch.randn(3000, 20, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    gram, out_gram, z = x.T @ x, g.T @ g, x @ w.T
    projected = Projected(z.T @ z, (x * x).sum(0))
    spectra = {"whiten": lambda stats: whiten_spectrum(w, stats, 3000),
               "curvature": lambda stats: curvature_spectrum(w, stats, 3000, out_gram),
               "asvd": lambda stats: asvd_spectrum(w, stats, 3000)}
    for name, spectrum_of in spectra.items():
        for k in (4, 12, 20):
            a, b = spectrum_of(gram).factors(k)
            pa, pb = spectrum_of(projected).factors(k)
            assert torch.allclose(pb @ pa, b @ a, atol=1e-9 * float(w.norm())), (name, k)
    a, b = curvature_spectrum(w, projected, 3000, out_gram).factors(20)
    assert torch.allclose(b @ a, w, atol=1e-8)  # every component: the weight itself
    # Both routes of a wide weight (eigendecomposition) against the SVD of L_Gᵀ·W·L_A itself.
    la = whitening_factor(gram, 3000)
    lg = whitening_factor(out_gram / out_gram.diagonal().mean(), 1)
    u, sigma, vh = torch.linalg.svd(lg.T @ w @ la)
    for k in (4, 12):
        truncated = torch.linalg.solve(lg.T, u[:, :k] * sigma[:k]) @ torch.linalg.solve(la.T, vh[:k].T).T
        a, b = curvature_spectrum(w, projected, 3000, out_gram).factors(k)
        assert torch.allclose(b @ a, truncated, atol=1e-9 * float(w.norm()))
    with pytest.raises(ValueError, match="needs XᵀX"):
        whiten_spectrum(w.T.contiguous(), Projected(z @ z.T, (z * z).sum(0)), 3000)


def test_statistics_hooks_keep_a_narrow_layer_at_its_output_side_only_when_it_reads_alone():
    """`narrow` reads first and would qualify, but `wide` reads the same tensor: the two share XᵀX.
    `alone` and `free` qualify and read their inputs alone: W·XᵀX·Wᵀ (without the bias: `alone`'s
    output cannot serve as X·Wᵀ, `free`'s does) and diag(XᵀX), summed over both batches."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.narrow, self.wide, self.alone = nn.Linear(32, 8), nn.Linear(32, 32), nn.Linear(32, 8)
            self.free = nn.Linear(32, 8, bias=False)

        def forward(self, x):
            return self.narrow(x).sum() + self.wide(x).sum() + self.alone(2 * x).sum() + self.free(3 * x).sum()

    torch.manual_seed(0)
    model, xs = Two(), [torch.randn(5, 32), torch.randn(7, 32)]
    stats = ActivationStats()
    hooks = GramHooks(stats, dict(model.named_children()))
    with torch.no_grad():
        for x in xs:
            hooks.batch(None)
            model(x)
            hooks.batch_done()
    hooks.remove()
    x = torch.cat(xs).double()
    assert stats.group_of == {"narrow": "narrow", "wide": "narrow", "alone": "alone", "free": "free"}
    assert torch.allclose(stats.gram_for("wide"), x.T @ x, rtol=1e-5, atol=1e-5)
    for name, scale in (("alone", 2), ("free", 3)):
        kept, w = stats.gram_for(name), model.get_submodule(name).weight.detach().double()
        assert isinstance(kept, Projected) and stats.tokens_for(name) == 12
        assert torch.allclose(kept.product, w @ (scale**2 * x.T @ x) @ w.T, rtol=1e-5, atol=1e-5)
        assert torch.allclose(kept.diagonal, (scale**2 * x * x).sum(0), rtol=1e-5)
    assert set(stats.with_tensors(stats.tensors()).diagonal) == {"alone", "free"}


def test_statistics_exclude_padding_and_share_inputs(tiny_bert_dir):
    source = resolve_model(str(tiny_bert_dir))
    model, tok = load_model(source), load_tokenizer(source.path)
    targets = select_targets(model)
    enc = tok(["a short one", "a much longer sentence that needs more tokens than the first"],
              padding=True, return_tensors="pt")
    from edgesvd.calibration import CalibrationBatch

    calib = CalibrationBatch(enc["input_ids"], enc["attention_mask"], {})
    stats = collect_statistics(model, targets, calib)
    q, k, v = (f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value"))
    assert stats.group_of[k] == stats.group_of[v] == stats.group_of[q] == q
    assert len(stats.gram) == 2 * 4  # per block: attention input, attention output, FFN in, FFN out
    captured = {}
    hook = model.get_submodule(q).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(**enc)
    hook.remove()
    rows = captured["x"][enc["attention_mask"].bool()].double()
    assert stats.tokens_for(q) == int(enc["attention_mask"].sum())
    assert torch.allclose(stats.gram_for(q), rows.T @ rows, rtol=1e-4, atol=1e-4)
    ffn_out = "encoder.layer.0.output.dense"  # 160 → 64, reading its input alone: kept as W·XᵀX·Wᵀ
    hook = model.get_submodule(ffn_out).register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    with torch.no_grad():
        model(**enc)
    hook.remove()
    rows, w = captured["h"][enc["attention_mask"].bool()].double(), model.get_submodule(ffn_out).weight.double()
    kept = stats.gram_for(ffn_out)
    assert isinstance(kept, Projected) and kept.product.shape == (64, 64)
    assert torch.allclose(kept.product, w @ (rows.T @ rows) @ w.T, rtol=1e-4, atol=1e-3)


def test_passes_over_sentences_skip_padding_and_change_no_output(tiny_bert_dir):
    """Statistics, loss-gradient and teacher passes take sentences of similar length together, each
    batch cut to its longest: the same XᵀX and teacher outputs as one forward of the padded set."""
    from edgesvd.families import ENCODER
    from edgesvd.finetune import Teacher

    source = resolve_model(str(tiny_bert_dir))
    model, tok = load_model(source), load_tokenizer(source.path)
    calib = sample_calibration(tok, CalibrationConfig("builtin", 24, 64, seed=1), ENCODER)
    lengths = calib.attention_mask.sum(1)
    batches = calib.index_batches(4, by_length=True)
    assert sorted(torch.cat(batches).tolist()) == list(range(24))
    widths = [calib.rows(b)[0].shape[1] for b in batches]
    assert widths == [int(lengths[b].max()) for b in batches] and max(widths) > min(widths)

    target = "encoder.layer.1.attention.self.query"  # after a block: attention must not see padding
    stats = collect_statistics(model, [target], calib, batch_size=4)
    captured = {}
    hook = model.get_submodule(target).register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    with torch.no_grad():
        full = model(input_ids=calib.input_ids, attention_mask=calib.attention_mask).last_hidden_state
    hook.remove()
    valid = calib.attention_mask.bool()
    rows = captured["x"][valid].double()
    assert stats.tokens_for(target) == int(valid.sum())
    assert torch.allclose(stats.gram_for(target), rows.T @ rows, rtol=1e-4, atol=1e-4)

    teacher = Teacher(model, calib, ENCODER, torch.device("cpu"), batch_size=4)
    assert teacher.cache is not None
    index = torch.tensor([3, 17, 8])
    batch = teacher.batch(index)
    assert batch.ids.shape[1] == int(lengths[index].max())
    assert torch.allclose(batch.target[-1][batch.mask.bool()], full[index][:, : batch.ids.shape[1]][batch.mask.bool()],
                          atol=1e-5)


def test_embeddings_come_back_in_the_order_given(tiny_bert_dir):
    """embed batches sentences by length; each comes back where it was, as if embedded alone."""
    from edgesvd.evaluate import embed

    source = resolve_model(str(tiny_bert_dir))
    model, tok = load_model(source), load_tokenizer(source.path)
    sentences = ["a much longer sentence than the others, with commas and more words", "short", "a middling one"]
    together = embed(model, tok, sentences, batch_size=2)
    alone = torch.cat([embed(model, tok, [s]) for s in sentences])
    assert torch.allclose(together, alone, atol=1e-5)


def test_calibration_sampling_is_seeded(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    one = sample_calibration(tok, CalibrationConfig("builtin", 4, 16, seed=3), DECODER)
    two = sample_calibration(tok, CalibrationConfig("builtin", 4, 16, seed=3), DECODER)
    other = sample_calibration(tok, CalibrationConfig("builtin", 4, 16, seed=4), DECODER)
    assert one.input_ids.shape == (4, 16) and torch.equal(one.input_ids, two.input_ids)
    assert not torch.equal(one.input_ids, other.input_ids)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_qwen2_dir", "tiny_bert_dir"])
def test_round_trip_reproduces_outputs_exactly(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    result = small(model_dir, Whiten(keep=0.5))
    assert any(l.rank is not None for l in result.record.layers)
    out = save_compressed(result.model, result.tokenizer, result.record, tmp_path / "ck", result.spectra)
    assert {"config.json", "model.safetensors", "spectrum.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded, record = load_compressed(out)
    for layer in record.layers:
        module = loaded.get_submodule(layer.name)
        if layer.rank is None:
            assert isinstance(module, nn.Linear)
        else:
            assert isinstance(module, LowRankLinear) and module.rank == layer.rank
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        before, after = result.model(input_ids=ids), loaded(input_ids=ids)
    key = "logits" if "logits" in before else "last_hidden_state"
    assert torch.equal(before[key], after[key])
    assert {l.name for l in record.layers if l.rank is not None} <= set(load_spectra(out))


def test_ranks_as_requested_and_break_even_layers_stay_dense(tiny_llama_dir):
    result = small(tiny_llama_dir, Plain(keep=0.5, rank_multiple=8))
    for layer in result.record.layers:
        assert layer.rank == uniform_rank(layer.out_features, layer.in_features, 0.5, 8, layer.pivoted)
        assert layer.rank % 8 == 0
    dense = small(tiny_llama_dir, Plain(keep=1.0))
    assert all(l.rank is None for l in dense.record.layers)
    assert not any(isinstance(m, LowRankLinear) for m in dense.model.modules())


def test_targets_default_include_exclude(tiny_llama_dir):
    model = load_model(resolve_model(str(tiny_llama_dir)))
    default = select_targets(model)
    assert len(default) == 2 * 7 and "lm_head" not in default
    assert "lm_head" in select_targets(model, include=["lm_head"])
    assert not any(".mlp." in n for n in select_targets(model, exclude=["*.mlp.*"]))


def test_whiten_beats_plain_on_real_minilm(minilm_dir, stsb_file):
    """Real weights: at keep 0.5 whitening keeps embeddings closer to the dense model than plain SVD."""
    from edgesvd.evaluate import embed, read_stsb

    sentences = read_stsb(stsb_file, limit=64)[0]
    source = resolve_model("minilm")
    dense = embed(load_model(source), load_tokenizer(source.path), sentences)
    cos = {}
    for method in (Plain(keep=0.5), Whiten(keep=0.5)):
        r = compress("minilm", method, calib=CalibrationConfig(num_sequences=256, seq_len=64))
        cos[method.name] = torch.nn.functional.cosine_similarity(embed(r.model, r.tokenizer, sentences), dense).mean().item()
    assert cos["whiten"] > cos["plain"] + 0.02, cos


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """SIGKILL leaves the marked `.<out>.<pid>.*` folder behind; the next write to the same output
    removes it, refuses while a live writer holds one, and never touches an unmarked look-alike."""
    import signal
    import subprocess
    import sys

    from edgesvd.errors import OutputError
    from edgesvd.outputs import atomic_output_dir

    writer = ("import sys, time; from edgesvd.outputs import atomic_output_dir\n"
              "with atomic_output_dir(sys.argv[1], force=False) as tmp:\n"
              "    (tmp / 'model.safetensors').write_text('half'); print('ready', flush=True); time.sleep(60)\n")
    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "out")], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    killed = start()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    lookalike = tmp_path / f".out.{killed.pid}.abc123"  # the user's, named like a temporary of a dead run
    lookalike.mkdir()
    (lookalike / "model.safetensors").write_bytes(b"the user's")
    live = start()  # removes the killed run's folder, not the look-alike
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.")]) == 2
    with pytest.raises(OutputError, match=f"pid {live.pid}"):
        with atomic_output_dir(tmp_path / "out", force=False):
            pass
    live.send_signal(signal.SIGKILL)
    live.wait()
    with atomic_output_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", lookalike.name])
    assert (tmp_path / "out" / "done.txt").read_text() == "ok"
