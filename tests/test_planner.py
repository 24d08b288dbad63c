"""Planner properties on synthetic importances, cost model arithmetic, and the real micro-benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_export_helpers import run_cfg, run_profiles

from edgesvd.costmodel import CALIBRATED, ESTIMATED, MEASURED, CostModel, LayerShape, ModelFacts, candidate_ranks
from edgesvd.errors import BudgetError
from edgesvd.factorize import break_even_rank
from edgesvd.families import DECODER, ENCODER
from edgesvd.importance import component_importance
from edgesvd.planner import LayerImportance, plan_ranks
from edgesvd.profiles import load_profile, parse_budget


def _facts(blocks: int = 3) -> ModelFacts:
    layers = []
    for i in range(blocks):
        layers += [LayerShape(f"l{i}.{n}", 384, 384) for n in "qkvo"]
        layers += [LayerShape(f"l{i}.up", 1536, 384), LayerShape(f"l{i}.down", 384, 1536)]
    return ModelFacts(ENCODER, 8_000_000, tuple(layers), (), 384, 1536, blocks, 12, 12, 32, 30522)


def _importances(facts: ModelFacts, seed: int = 0) -> list[LayerImportance]:
    rng = np.random.default_rng(seed)
    out = []
    for shape in facts.layers:
        k = min(shape.out_features, shape.in_features)
        sigma = rng.gamma(1.0, 1.0, k) * np.exp(-np.arange(k) / rng.uniform(10, 300))
        imp, _ = component_importance(sigma)
        out.append(LayerImportance(shape, imp))
    return out


def _budget(**kw) -> dict:
    return {k: parse_budget(k, v, "test") for k, v in kw.items()}


@pytest.fixture(scope="module")
def setup():
    facts = _facts()
    return facts, _importances(facts), CostModel(load_profile("raspberry-pi-5"), facts)


def _check_met(receipt, cost, limits):
    independent = cost.totals(receipt.ranks())  # recomputed from the ranks, not the planner's sums
    for key, limit in limits.items():
        assert independent[key] <= limit * (1 + 1e-9), (key, independent[key], limit)


@pytest.mark.parametrize("budgets", [
    {"model_bytes": "20 MB"}, {"latency_p50": "60%"}, {"latency_p90": "70%"},
    {"model_bytes": "24 MB", "latency_p50": "75%", "peak_memory": "100 MB"},
])
def test_every_budget_is_met(setup, budgets):
    facts, layers, cost = setup
    budgets = _budget(**budgets)
    receipt = plan_ranks(layers, cost, budgets)
    dense = cost.dense()
    _check_met(receipt, cost, {k: b.limit(dense[k]) for k, b in budgets.items()})
    assert sum(b.binding for b in receipt.budgets) == 1
    binding = next(b for b in receipt.budgets if b.binding)
    assert binding.headroom == min(b.headroom for b in receipt.budgets) and binding.headroom < 0.05
    assert receipt.latency_source == ESTIMATED


@pytest.mark.parametrize("profile, multiple", [("raspberry-pi-5", 8), ("laptop-4core-x86", 16), ("jetson-orin-nano", 64)])
def test_rank_multiple_and_break_even_respected(profile, multiple):
    facts = _facts()
    layers = _importances(facts, seed=1)
    cost = CostModel(load_profile(profile), facts)
    receipt = plan_ranks(layers, cost, _budget(model_bytes="65%"))
    assert any(r.rank is not None for r in receipt.rows)
    for row in receipt.rows:
        if row.rank is not None:
            assert row.rank % multiple == 0
            assert row.rank < break_even_rank(*row.shape)


@pytest.mark.parametrize("key, values", [
    ("model_bytes", ["14 MB", "17 MB", "20 MB", "23 MB", "27 MB", "32 MB"]),
    ("latency_p50", ["45%", "55%", "65%", "75%", "90%", "100%"]),
])
def test_monotone_in_the_budget(setup, key, values):
    facts, layers, cost = setup
    kept, sizes = [], []
    for v in values:
        receipt = plan_ranks(layers, cost, _budget(**{key: v}))
        kept.append(sum(r.importance_kept for r in receipt.rows))
        sizes.append(receipt.totals[key])
    assert all(b >= a - 1e-12 for a, b in zip(kept, kept[1:])), kept
    assert kept[-1] > kept[0]


def test_no_budget_keeps_every_layer_dense(setup):
    _, layers, cost = setup
    receipt = plan_ranks(layers, cost, {})
    assert all(r.rank is None for r in receipt.rows) and receipt.importance_kept == pytest.approx(1.0)


def test_importance_decides_where_rank_goes():
    """A layer whose spectrum decays fast needs little rank; a flat one gets more of the budget."""
    shapes = [LayerShape("fast", 512, 512), LayerShape("flat", 512, 512)]
    facts = ModelFacts(ENCODER, 600_000, tuple(shapes), (), 512, 2048, 1, 8, 8, 64, 1000)
    k = np.arange(512)
    layers = [LayerImportance(shapes[0], component_importance(np.exp(-k / 8.0))[0]),
              LayerImportance(shapes[1], component_importance(np.exp(-k / 400.0))[0])]
    cost = CostModel(load_profile("raspberry-pi-5"), facts)
    ranks = plan_ranks(layers, cost, _budget(model_bytes="1.4 MB")).ranks()
    assert ranks["fast"] is not None and ranks["flat"] is not None and ranks["fast"] < ranks["flat"]


def test_infeasible_budget_is_one_line_with_the_smallest_achievable(setup):
    _, layers, cost = setup
    for budgets in (_budget(model_bytes="1 MB"), _budget(latency_p50="5%"), _budget(model_bytes="10%", latency_p50="90%")):
        with pytest.raises(BudgetError) as err:
            plan_ranks(layers, cost, budgets)
        msg = str(err.value)
        assert "\n" not in msg and "smallest achievable size" in msg and "latency" in msg and "estimated" in msg
    smallest = cost.quantities(sum(cost.layer_bytes(s, candidate_ranks(s, 8)[0]) for s in cost.facts.layers), 0)
    with pytest.raises(BudgetError, match=f"smallest achievable size {smallest['model_bytes'] / 1e6:.2f} MB"):
        plan_ranks(layers, cost, _budget(model_bytes="1 MB"))


def test_factorized_layer_not_faster_than_dense_stays_dense():
    """With a measured table in which every factorized 384×384 layer is slower than dense, no such
    layer is factorized under a latency budget; the 1536 shapes still are."""
    facts = _facts(blocks=2)
    table = {}
    for shape in facts.layers:
        slow = shape.key == (384, 384)
        table[(*shape.key, None, False)] = (1.0, 1.1)
        for r in candidate_ranks(shape, 8):
            ms = 1.2 + r / 1000 if slow else 0.2 + 0.8 * r / break_even_rank(*shape.key)
            table[(*shape.key, r, False)] = (ms, ms * 1.1)
    profile = load_profile("host", measure_host=False)
    cost = CostModel(profile, facts, table, fixed_ms=2.0)
    assert cost.source == MEASURED
    receipt = plan_ranks(_importances(facts), cost, _budget(latency_p50="80%"))
    for row in receipt.rows:
        if row.shape == (384, 384):
            assert row.rank is None
    assert any(r.rank is not None for r in receipt.rows if r.shape != (384, 384))
    _check_met(receipt, cost, {"latency_p50": 0.8 * cost.dense()["latency_p50"]})


def test_cost_model_memory_and_anchor(setup):
    facts, _, cost = setup
    dense = cost.dense()
    assert dense["model_bytes"] == pytest.approx(4 * facts.total_params)
    assert dense["peak_memory"] > dense["model_bytes"] + cost.profile.runtime.overhead_bytes
    fp16 = CostModel(load_profile("jetson-orin-nano"), facts)
    assert fp16.dense()["model_bytes"] == pytest.approx(2 * facts.total_params)
    anchored = cost.anchored_to(dense_p50_ms=50.0, dense_p90_ms=60.0)
    assert anchored.dense()["latency_p50"] == pytest.approx(50.0) and anchored.dense()["latency_p90"] == pytest.approx(60.0)
    shape = facts.layers[0]
    ranks = {shape.name: 64}
    assert cost.totals(ranks)["model_bytes"] == pytest.approx(
        dense["model_bytes"] - 4 * (shape.params(None) - shape.params(64)))


def test_decoder_memory_counts_the_kv_cache():
    shapes = (LayerShape("q", 1024, 1024, False),)
    facts = ModelFacts(DECODER, 10_000_000, shapes, (), 1024, 4096, 8, 16, 4, 64, 32000)
    base = CostModel(load_profile("raspberry-pi-5"), facts).dense()["peak_memory"]
    longer = CostModel(load_profile("raspberry-pi-5").with_workload(new_tokens=1032), facts).dense()["peak_memory"]
    assert longer - base == pytest.approx(2 * 8 * 1 * 1000 * 4 * 64 * 4)  # K and V, layers, tokens, kv heads, dim, fp32


def test_table_interpolates_between_measured_ranks(setup):
    facts, _, _ = setup
    shape = facts.layers[0]
    table = {(384, 384, None, False): (1.0, 1.0), (384, 384, 32, False): (0.2, 0.2), (384, 384, 96, False): (0.6, 0.6)}
    cost = CostModel(load_profile("host", measure_host=False), facts, table)
    assert cost.layer_ms(shape, 64) == pytest.approx(0.4)
    assert cost.layer_ms(shape, 32) == pytest.approx(0.2)


def test_calibrated_profile_fits_its_table(tmp_path):
    """A profile with a [measured] table predicts its own rows closely (label 'calibrated')."""
    from dataclasses import replace

    from edgesvd.profiles import MatmulTiming, MeasuredTable

    rows = []
    for k in (64, 256, 1024):
        for n in (64, 256, 1024):  # synthetic device: 5 µs overhead, 100 GFLOP/s, 20 GB/s
            t = 5e-6 + 2 * 128 * k * n / 100e9 + 4 * (128 * k + k * n + 128 * n) / 20e9
            rows.append(MatmulTiming(128, k, n, t * 1e3))
    profile = replace(load_profile("raspberry-pi-5"), measured=MeasuredTable(tuple(rows)))
    cost = CostModel(profile, _facts())
    assert cost.source == CALIBRATED
    t = 5e-6 + 2 * 128 * 512 * 384 / 100e9 + 4 * (128 * 512 + 512 * 384 + 128 * 384) / 20e9
    assert cost.matmul_ms(128, 512, 384) == pytest.approx(t * 1e3, rel=1e-3)


def test_component_importance_shares():
    sigma = np.array([4.0, 3.0, 2.0, 1.0])
    imp, order = component_importance(sigma)
    assert imp.sum() == pytest.approx(1.0) and list(order) == [0, 1, 2, 3] and imp[0] == pytest.approx(16 / 30)
    imp, order = component_importance(np.array([1.0, 3.0, 2.0]))
    assert list(order) == [1, 2, 0] and imp[0] == pytest.approx(9 / 14)


def _run_cfg(model_dir, out_root, **kw):
    return run_cfg(model_dir, out_root, runs=5, warmup=1, **kw)


def test_closed_loop_on_a_tiny_model_with_real_onnxruntime(tiny_bert_dir, tmp_path, monkeypatch):
    """`run --profile host` on a tiny BERT: plan, export, measure with onnxruntime, re-plan while
    the measured ONNX size misses its budget; the bundle manifest holds budgets, receipt, values."""
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path / "cache"))

    host = load_profile("host").with_workload(sequence_length=32).with_budgets(
        {"model_bytes": "99%", "latency_p50": "400%"})
    [result] = run_profiles(_run_cfg(tiny_bert_dir, tmp_path / "out"), [host], max_plans=4)
    assert result.measured and result.latency_source == "measured"
    assert result.values["model_bytes"] <= result.limits["model_bytes"]
    assert result.values["latency_p50"] <= result.limits["latency_p50"]
    assert any(r.rank is not None for r in result.receipt.rows)
    for earlier, later in zip(result.history, result.history[1:]):  # a missed size re-plans smaller
        if "model_bytes" in earlier["missed"]:
            assert later["estimated"]["model_bytes"] < earlier["estimated"]["model_bytes"]
    assert sum(bool(h.get("chosen")) for h in result.history) == 1
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    budgets = manifest["budgets"]
    assert budgets["met"] is True and budgets["values_are"] == "measured on this machine"
    assert budgets["values"]["model_bytes"] == result.values["model_bytes"]
    assert budgets["receipt"]["binding"] in ("model_bytes", "latency_p50")
    assert {r["name"]: r["rank"] for r in budgets["receipt"]["rows"]} == manifest["compression"]["ranks"]
    # the receipt of a latency claim: interval, certified bound, pairs and load, and how the estimate was tied
    latency = budgets["certified"]["latency_p50"]
    assert latency["status"] == "met" and latency["bound"] <= latency["limit"] == 4.0
    assert latency["interval"]["low"] <= latency["interval"]["estimate"] <= latency["interval"]["high"]
    assert latency["pairs"] >= 24 and latency["load_average"] >= 0 and latency["confidence"] == 0.95
    assert budgets["latency_measurement"]["forward"]["pairs"] == latency["pairs"]
    assert 0 < budgets["cost_model"]["layer_share"] < 1
    assert budgets["cost_model"]["layer_table"]["fingerprint"]["onnxruntime"]
    for plan in budgets["plans"]:
        assert plan["latency"]["pairs"] >= 24 and "estimate_error" in plan["latency"]
    comparison = (tmp_path / "out" / tiny_bert_dir.name / "comparison.md").read_text()
    assert f"({latency['pairs']} pairs, load" in comparison and "95% interval" in comparison


def test_closed_loop_fails_clearly_and_writes_nothing(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path / "cache"))

    host = load_profile("host").with_workload(sequence_length=32).with_budgets({"model_bytes": "50%"})
    with pytest.raises(BudgetError, match="budget infeasible on host.*smallest achievable size"):
        run_profiles(_run_cfg(tiny_bert_dir, tmp_path / "out"), [host])
    assert not (tmp_path / "out" / tiny_bert_dir.name).exists()


def test_budget_run_on_a_tiny_decoder(tiny_llama_dir, prose_file, tmp_path, monkeypatch):
    """Decoders: the prefill is what is timed, sizes are anchored to the measured dense ONNX model,
    a device not at hand gets estimated values, labelled so in the manifest; one learning pass
    serves both devices; --eval puts the task score in the comparison and the manifests."""
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path / "cache"))

    import edgesvd.compression as learned

    passes = []
    real = learned.learn_importance
    monkeypatch.setattr(learned, "learn_importance", lambda *a, **k: passes.append(a[1]) or real(*a, **k))
    budgets = {"model_bytes": "97%", "latency_p50": "none", "peak_memory": "none"}
    host = load_profile("host").with_workload(prompt_length=16, new_tokens=4).with_budgets(budgets)
    pi = load_profile("raspberry-pi-5").with_budgets(budgets)
    cfg = _run_cfg(tiny_llama_dir, tmp_path / "out", eval_file=prose_file)
    results = {r.profile: r for r in run_profiles(cfg, [host, pi], max_plans=3)}
    assert len(passes) == 1  # one learning pass (the real one) for both devices
    for r in results.values():  # each plan finished from it: learned scores folded, recorded per layer
        record = json.loads((r.bundle / "manifest.json").read_text())["compression"]
        assert record["method"] == "learned"
        q = json.loads((r.bundle / "manifest.json").read_text())["quality"]["perplexity"]
        assert next(iter(r.quality.items())) == ("perplexity", q["compressed"]) and q["dense"] > 1
    comparison = (tmp_path / "out" / tiny_llama_dir.name / "comparison.md").read_text()
    assert "quality: perplexity of the compressed PyTorch model on the --eval file" in comparison
    local, remote = results["host"], results["raspberry-pi-5"]
    assert local.measured and local.values["model_bytes"] <= local.limits["model_bytes"]
    receipt = json.loads((local.bundle / "manifest.json").read_text())["budgets"]
    planned = {b["key"]: b["value"] for b in receipt["receipt"]["budgets"]}
    # the plan's bytes include what the estimate leaves out of the dense export (graph, a tied table)
    assert planned["model_bytes"] == pytest.approx(local.values["model_bytes"], rel=0.02)
    plans = receipt["plans"]
    assert plans[0]["verdicts"]["model_bytes"]["status"] == "met"  # aimed inside: no plan wasted on a few bytes
    assert "top1_agreement_vs_dense" in local.quality
    assert not remote.measured and remote.values["model_bytes"] <= remote.limits["model_bytes"]
    manifest = json.loads((remote.bundle / "manifest.json").read_text())
    assert manifest["budgets"]["values_are"].startswith("estimated") and manifest["budgets"]["met"] is True
