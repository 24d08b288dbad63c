"""Budget truth: intervals on synthetic timings, the micro-benchmark cache under injected timings,
paired measurement with real onnxruntime, and the closed loop's search on a real tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_export_helpers import checkpoint, exported, exported_dense, work_root

from edgesvd.costmodel import CostModel, LayerShape, ModelFacts, candidate_ranks
from edgesvd.errors import BudgetError
from edgesvd.exporters.budgets import MET, MISSED, UNDECIDED, PlanMeasurement, Verdict, judge
from edgesvd.exporters.closed_loop import CLOSE_ENOUGH, Bracket, closed_loop
from edgesvd.exporters.microbench import (
    TOLERANCE,
    Entry,
    OrtTimer,
    cache_file,
    fingerprint,
    measure_layers,
    ranks_to_time,
    refresh_caches,
)
from edgesvd.exporters.profiling import (
    CONFIDENCE,
    Interval,
    PairedLatency,
    ProfileConfig,
    paired_latency,
    quantile_interval,
)
from edgesvd.factorize import break_even_rank
from edgesvd.families import DECODER
from edgesvd.profiles import load_profile, parse_budget


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return work_root(tmp_path_factory)


# -- intervals ------------------------------------------------------------------------------------
def test_order_statistic_interval_matches_the_binomial_table_and_covers():
    x = np.arange(1, 41, dtype=float)  # sorted: x(k) = k
    i = quantile_interval(x, 0.5, 0.95)
    assert (i.low, i.high) == (14.0, 27.0)  # the textbook ranks for n = 40 at 95 %
    assert quantile_interval(x[:5], 0.5, 0.95).high == math.inf  # five samples cannot pin a median at 95 %
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):  # skewed, heavy-tailed like timings under load: true median of lognormal(0, 1) is 1
        s = quantile_interval(rng.lognormal(0.0, 1.0, 40), 0.5, 0.95)
        covered += s.low <= 1.0 <= s.high
    assert covered / 2000 >= 0.94


def _pairs(ratios, dense=10.0, window=1) -> PairedLatency:
    ratios = np.asarray(ratios, dtype=float)
    return PairedLatency("forward", [dense] * len(ratios), list(dense * ratios), [2.5], CONFIDENCE, 1, window)


BUDGETS = {"latency_p50": parse_budget("latency_p50", "60%", "test")}


@pytest.mark.parametrize("centre, spread, status", [
    (0.50, 0.02, MET),        # well inside: even the slow windows are below 0.60
    (0.70, 0.02, MISSED),     # well beyond: all of the median's interval above
    (0.60, 0.05, UNDECIDED),  # straddles the limit: no claim either way
    (0.585, 0.002, MET),      # close to the limit but tight: certified
    (0.585, 0.15, UNDECIDED),  # the same median, too noisy to certify
])
def test_relative_budget_verdicts_on_synthetic_timings(centre, spread, status):
    ratios = np.random.default_rng(1).permutation(centre + spread * np.linspace(-1.0, 1.0, 160))
    v = judge(BUDGETS, {"latency_p50": 6.0}, {"latency_p50": 6.0}, _pairs(ratios))["latency_p50"]
    assert v.status == status and v.pairs == 160 and v.load_average == 2.5 and v.limit == 0.6
    assert v.interval.low <= np.median(ratios) <= v.interval.high <= v.bound
    assert (v.bound <= 0.6) == (status == MET) and (v.interval.low > 0.6) == (status == MISSED)


def test_absolute_budget_is_judged_on_the_compressed_p50():
    budgets = {"latency_p50": parse_budget("latency_p50", "7 ms", "test")}
    rng = np.random.default_rng(2)
    fast = _pairs(rng.normal(0.5, 0.01, 80), dense=10.0)  # 5 ms
    slow = _pairs(rng.normal(0.5, 0.01, 80), dense=20.0)  # 10 ms: same ratio, slower machine
    assert judge(budgets, {"latency_p50": 7.0}, {}, fast)["latency_p50"].status == MET
    assert judge(budgets, {"latency_p50": 7.0}, {}, slow)["latency_p50"].status == MISSED


def test_windows_keep_spells_of_load_from_certifying():
    """Spells of load that favour one model make consecutive pairs alike: an interval over single
    pairs puts a median just under the limit with confidence, though the next person's measurement
    lands in another spell; windows widen the interval and the verdict waits."""
    rng = np.random.default_rng(3)
    spells = np.repeat(rng.permutation(0.585 + 0.03 * np.linspace(-1.0, 1.0, 32)), 10)  # 32 spells of 10 pairs
    ratios = spells + rng.normal(0.0, 0.002, len(spells))
    per_pair, per_window = _pairs(ratios).ratio(), _pairs(ratios, window=10).ratio()
    assert per_pair.high < 0.6 and per_window.high - per_window.low > 3 * (per_pair.high - per_pair.low)
    v = judge(BUDGETS, {}, {}, _pairs(ratios, window=10))["latency_p50"]
    assert v.status == UNDECIDED and v.bound > 0.6 > v.interval.estimate


def test_sizes_are_judged_exactly():
    budgets = {"model_bytes": parse_budget("model_bytes", "10 MB", "test")}
    assert judge(budgets, {"model_bytes": 10e6}, {"model_bytes": 9.9e6}, None)["model_bytes"].status == MET
    assert judge(budgets, {"model_bytes": 10e6}, {"model_bytes": 10.1e6}, None)["model_bytes"].status == MISSED


# -- paired measurement with real onnxruntime ----------------------------------------------------------
def test_paired_latency_takes_more_pairs_only_while_undecided(tiny_llama_dir, root):
    dense, comp = exported_dense(tiny_llama_dir, root), exported(checkpoint(tiny_llama_dir, root), root)
    cfg = ProfileConfig(batch=1, seq_len=16, warmup=1, runs=8)
    looks = []
    undecided = paired_latency(dense, comp, cfg, modes=("prefill",), decided=lambda pl: looks.append(pl.pairs) and False,
                               max_pairs=32)["prefill"]
    assert looks == [8, 16, 32] and undecided.pairs == 32 and undecided.looks == 3
    assert undecided.level == pytest.approx(1 - (1 - CONFIDENCE) / 3)  # each look pays for the others
    assert all(t > 0 for t in undecided.dense_ms + undecided.compressed_ms) and undecided.load >= 0
    decided = paired_latency(dense, comp, cfg, modes=("prefill",), decided=lambda pl: True, max_pairs=32)
    assert set(decided) == {"prefill"} and decided["prefill"].pairs == 8
    both = paired_latency(dense, comp, cfg)  # one look, every mode
    assert set(both) == {"prefill", "decode"} and all(pl.pairs == 8 for pl in both.values())


# -- the micro-benchmark cache -------------------------------------------------------------------------
class ScriptedTimer:
    """Timings injected through the micro-benchmark's timer interface: ms per entry from `law`,
    times `factor(round)`; counts what it was asked to time."""

    def __init__(self, law, factor=lambda r: 1.0):
        self.law, self.factor, self.rounds, self.timed = law, factor, 0, []

    def __call__(self, entries, runs):
        f = self.factor(self.rounds)
        self.rounds += 1
        self.timed += entries
        return [[self.law(e) * f * (1 + 0.01 * k) for k in range(runs)] for e in entries]

    def close(self):
        pass


def _law(e: Entry) -> float:  # a MatMul's time grows with its weights
    return 0.01 + e.weight_bytes / 4e6


SHAPES = [LayerShape("a", 96, 64), LayerShape("b", 64, 96)]


def test_a_consistent_set_is_cached_with_when_and_under_what_load(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path))
    first = measure_layers(SHAPES, tokens=16, multiple=8, timer=ScriptedTimer(_law))
    assert first.info["measured"]["cached"] and first.info["from_cache"] == 0
    data = json.loads(cache_file(fingerprint(16, "CPUExecutionProvider", 0, "fp32")).read_text())
    assert data["fingerprint"]["cpu"] and data["fingerprint"]["onnxruntime"] and len(data["probes"]) == 3
    assert all({"p50_ms", "made", "load_average"} <= set(row) for row in data["entries"].values())
    again = ScriptedTimer(_law, lambda r: 1.05)  # 5 % slower now: within tolerance, the cache serves
    second = measure_layers(SHAPES, tokens=16, multiple=8, timer=again)
    assert second.info["from_cache"] == len(second.table) and second.table == first.table
    assert set(again.timed) == {Entry.parse(k) for k in data["probes"]}  # only the probes were re-timed
    other = measure_layers(SHAPES, tokens=32, multiple=8, timer=ScriptedTimer(_law))  # another workload: own cache
    assert other.info["from_cache"] == 0


def test_an_inconsistent_set_is_rejected_and_never_cached(tmp_path, monkeypatch):
    """The load changed half-way: identical shapes timed 4× apart are not trusted."""
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path))
    burst = ScriptedTimer(_law, lambda r: 1.0 if r % 8 < 4 else 4.0)
    bench = measure_layers(SHAPES, tokens=16, multiple=8, timer=burst)
    assert not bench.info["measured"]["cached"] and bench.info["measured"]["disagreement"] > TOLERANCE
    assert burst.rounds == 3 * 8  # three sets tried
    assert not cache_file(fingerprint(16, "CPUExecutionProvider", 0, "fp32")).exists()
    steady = measure_layers(SHAPES, tokens=16, multiple=8, timer=ScriptedTimer(_law))
    assert steady.info["from_cache"] == 0 and steady.info["measured"]["cached"]


def test_the_cache_is_dropped_when_its_probes_drift(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path))
    measure_layers(SHAPES, tokens=16, multiple=8, timer=ScriptedTimer(_law))
    quiet = ScriptedTimer(_law, lambda r: 0.5)  # the machine is twice as fast as when the cache was made
    bench = measure_layers(SHAPES, tokens=16, multiple=8, timer=quiet)
    assert bench.info["invalidated"]["drift"] == pytest.approx(-0.5, abs=0.01)
    assert bench.info["from_cache"] == 0 and bench.info["measured"]["cached"]
    assert all(bench.table[k][0] == pytest.approx(0.5 * _law(Entry(*k)), rel=0.05) for k in bench.table)


def test_real_onnxruntime_timer_and_refresh(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path))
    timer = OrtTimer(tokens=16)
    [[*times]] = timer([Entry(96, 64, 16)], 3)
    assert len(times) == 3 and all(t > 0 for t in times)
    bench = measure_layers(SHAPES, tokens=16, multiple=8, use_cache=False)
    assert {(96, 64, None, False), (64, 96, None, False), (96, 64, 8, False)} <= set(bench.table)
    assert all(p50 > 0 and p90 > 0 for p50, p90 in bench.table.values())
    measure_layers(SHAPES, tokens=16, multiple=8, timer=ScriptedTimer(_law))  # a cache to refresh
    [summary] = refresh_caches()  # re-timed by onnxruntime: kept if its timings agree, else removed
    assert summary["entries"] == len(bench.table)
    path = cache_file(fingerprint(16, "CPUExecutionProvider", 0, "fp32"))
    assert path.exists() == summary["kept"]
    if summary["kept"]:
        assert json.loads(path.read_text())["entries"]["96|64|None"]["p50_ms"] != pytest.approx(_law(Entry(96, 64, None)))


def test_pivoted_layers_are_timed_in_their_form_and_the_cost_model_reads_those_timings(tmp_path, monkeypatch):
    """A pivoted shape is timed as the pivoted graph (onnxruntime) at its own candidate ranks, cached
    under its own keys, and the cost model's layer time comes from those entries, not the plain ones."""
    monkeypatch.setenv("EDGESVD_CACHE_DIR", str(tmp_path))
    pivoted = [LayerShape("p", 96, 64, pivoted=True)]
    bench = measure_layers(pivoted, tokens=16, multiple=8, use_cache=False)
    factorized = {k for k in bench.table if k[2] is not None}
    assert factorized and all(k[3] for k in factorized)  # every factorized entry is pivoted
    assert {k[2] for k in factorized} == set(ranks_to_time(pivoted[0], 8))
    # ranks beyond the plain break-even (38.4 here) exist only in the pivoted form
    assert max(k[2] for k in factorized) > break_even_rank(96, 64)
    assert Entry.parse(Entry(96, 64, 40, True).key) == Entry(96, 64, 40, True)
    table = {**bench.table, (96, 64, 16, True): (7.0, 7.0), (96, 64, 16, False): (1.0, 1.0)}
    facts = ModelFacts(DECODER, 96 * 64, tuple(pivoted), (), 64, 96, 1, 1, 1, 64, 10)
    cost = CostModel(load_profile("host", measure_host=False), facts, table)
    assert cost.layer_ms(pivoted[0], 16) == pytest.approx(7.0)
    assert cost.layer_ms(pivoted[0], None) == pytest.approx(table[(96, 64, None, False)][0])


# -- the closed loop's search ------------------------------------------------------------------------
def test_bracket_bisects_once_both_sides_are_known():
    b = Bracket()
    assert b.next_aim(10.0, 1.10, True) == pytest.approx(10.0 * 0.99 / 1.10)  # missed: corrected by the error
    b.record(10.0, False)
    assert b.next_aim(9.0, 0.80, True) is not None
    b.record(8.0, True)
    assert b.next_aim(8.0, 0.90, True) == pytest.approx(9.0)  # bracketed: the midpoint
    assert b.next_aim(8.0, 1.0 - CLOSE_ENOUGH / 2, True) is None  # certified close to its limit: done
    assert Bracket().next_aim(8.0, 0.5, False) is None  # far inside, but another budget binds
    assert Bracket().next_aim(8.0, math.inf, True) == pytest.approx(8.0 / 1.5)  # an open interval: a bounded step


@pytest.fixture(scope="module")
def tiny_plan_inputs(tiny_bert_dir):
    """Layers with real whitened importances of a real (tiny) model, and a cost model whose layer
    times are proportional to their weights, tied to a dense model measured at 10 ms of which the
    factorized layers take 60 %."""
    from edgesvd.calibration import CalibrationConfig
    from edgesvd.compression import prepare
    from edgesvd.costmodel import model_facts
    from edgesvd.importance import whitened_importances
    from edgesvd.spectra import spectra_of

    prepared = prepare(str(tiny_bert_dir), CalibrationConfig(num_sequences=8, seq_len=32))
    facts = model_facts(prepared.model, prepared.targets, prepared.source.family)
    layers, _ = whitened_importances(prepared.model, spectra_of(prepared.model, prepared.targets, "whiten",
                                                                  prepared.stats))
    table = {}
    for shape in facts.layers:
        for rank in [None, *candidate_ranks(shape, 8)]:
            table[(shape.out_features, shape.in_features, rank, False)] = (shape.params(rank) * 1e-5,) * 2
    cost = CostModel(load_profile("raspberry-pi-5"), facts, table).anchored_to(10.0, 11.0, 0.6)
    return layers, cost


def _search(tmp_path, tiny_plan_inputs, law, max_plans=6, budget="70%"):
    """closed_loop with real plans of the tiny model, builds that only make the folders, and a
    measurement whose ratio is `law(estimated ratio)` ± 0.5 %."""
    layers, cost = tiny_plan_inputs
    p = load_profile("raspberry-pi-5").with_budgets({"latency_p50": budget, "peak_memory": "none"})
    dense = cost.dense()
    limits = {"latency_p50": p.budgets["latency_p50"].limit(dense["latency_p50"])}
    estimated = {}

    def build(receipt, where, attempt):
        for sub in ("checkpoint", "onnx"):
            (where / sub).mkdir(parents=True)
        estimated[where / "onnx"] = receipt.totals["latency_p50"] / dense["latency_p50"]

    def measure(onnx_dir, limits_now):
        ratio = law(estimated[onnx_dir])
        pairs = _pairs(np.linspace(ratio * 0.995, ratio * 1.005, 64))
        values = {"latency_p50": ratio * 10.0, "latency_p90": ratio * 11.0, "model_bytes": 1.0}
        return PlanMeasurement(values, {"latency_p50": 10.0, "latency_p90": 11.0}, pairs,
                               judge(p.budgets, limits_now, values, pairs), {})

    return closed_loop(p, layers, cost, limits, dict(dense), build, tmp_path / "loop", measure, max_plans)


def test_the_search_converges_when_the_estimate_is_optimistic(tmp_path, tiny_plan_inputs):
    """The model runs 8 % slower than estimated: plan 1 misses, the next is re-aimed by the
    measured error and certified close to the limit."""
    chosen, history = _search(tmp_path, tiny_plan_inputs, lambda est: est * 1.08)
    assert chosen.met and history[0]["verdicts"]["latency_p50"]["status"] != MET
    assert chosen.verdicts["latency_p50"].interval.high <= 0.70
    assert chosen.verdicts["latency_p50"].use >= 1 - 2 * CLOSE_ENOUGH  # close to the limit, not far inside
    aims = [h["aim"]["latency_p50"] for h in history]
    assert aims[1] < aims[0] and history[chosen.plan - 1].get("chosen")


def test_the_search_relaxes_then_bisects_when_the_estimate_is_pessimistic(tmp_path, tiny_plan_inputs):
    # measured below the estimate, until a cliff (onnxruntime has such kernel cliffs at some ranks)
    chosen, history = _search(tmp_path, tiny_plan_inputs, lambda est: 0.3 + 0.5 * est + (0.2 if est > 0.75 else 0.0))
    certified = [h for h in history if h["verdicts"]["latency_p50"]["status"] == MET]
    assert chosen.met and len(history) >= 2
    assert chosen.receipt.importance_kept == max(h["importance_kept"] for h in certified)
    aims = [h["aim"]["latency_p50"] for h in history]
    assert aims[1] > aims[0]  # plan 1 was far inside: relaxed
    assert any(h["verdicts"]["latency_p50"]["status"] != MET for h in history)  # relaxing went over the cliff
    for i, h in enumerate(history):  # bisection: once bracketed, every aim lies inside the bracket
        met = [a["aim"]["latency_p50"] for a in history[:i] if a["verdicts"]["latency_p50"]["status"] == MET]
        missed = [a["aim"]["latency_p50"] for a in history[:i] if a["verdicts"]["latency_p50"]["status"] != MET]
        if met and missed:
            assert max(met) < h["aim"]["latency_p50"] < min(missed)
    assert len({tuple(sorted(h["verdicts"])) for h in history}) == 1


def test_a_budget_that_cannot_be_certified_says_so(tmp_path, tiny_plan_inputs):
    layers, cost = tiny_plan_inputs
    p = load_profile("raspberry-pi-5").with_budgets({"latency_p50": "70%", "peak_memory": "none"})

    def measure(onnx_dir, limits_now):  # every plan straddles the limit: a machine too noisy to decide
        pairs = _pairs(np.random.default_rng(0).normal(0.70, 0.2, 64))
        values = {"latency_p50": 7.0, "latency_p90": 8.0}
        return PlanMeasurement(values, {"latency_p50": 10.0}, pairs, judge(p.budgets, limits_now, values, pairs), {})

    def build(receipt, where, attempt):
        for sub in ("checkpoint", "onnx"):
            (where / sub).mkdir(parents=True)

    dense = cost.dense()
    with pytest.raises(BudgetError, match=r"cannot certify p50 latency ≤ 70% of dense on this machine: "
                                          r"measurement spread \d+\.\d% \(load average 2\.50\) after 64 pairs "
                                          r"\(closest of 2 plans measured: plan [12], median .*"
                                          r"raise --max-pairs or --max-plans"):
        closed_loop(p, layers, cost, {"latency_p50": 7.0}, dict(dense), build, tmp_path / "loop", measure, 2)


def test_verdict_text_names_interval_pairs_and_load():
    v = Verdict("latency_p50", "60% of dense", Interval(0.57, 0.56, 0.59, 0.98), 0.595, 0.6, MET, 320, 3.2)
    assert str(v) == ("p50 latency 0.570× [0.560×, 0.590×], 80% of windows ≤ 0.595×, limit 0.600× "
                      "(95% confidence, 320 pairs, load average 3.20): met")


def test_a_limit_within_the_first_aims_margin_of_the_smallest_plan_is_still_planned(tmp_path, tiny_plan_inputs):
    """The first plan aims inside the limit; where that aim is out of reach but the limit is not
    (the limit just above the smallest achievable latency), it aims at the limit instead of failing."""
    from edgesvd.exporters.closed_loop import FIRST_AIM
    from edgesvd.planner import smallest_achievable

    layers, cost = tiny_plan_inputs
    low = smallest_achievable(layers, cost, cost.profile.rank_multiple)["latency_p50"] / cost.dense()["latency_p50"]
    limit = low / (1 - (1 - FIRST_AIM) / 2)  # above the smallest plan, below it ÷ FIRST_AIM
    chosen, history = _search(tmp_path, tiny_plan_inputs, lambda est: est, budget=f"{100 * limit:.4f}%")
    assert chosen.met and history[0]["aim"]["latency_p50"] == pytest.approx(limit * 10.0, rel=1e-6)


def test_tightening_below_the_smallest_plan_measures_the_smallest_plan_before_giving_up(tmp_path, tiny_plan_inputs):
    """The model runs 1.5× slower than estimated: the re-aimed plan would lie below anything
    achievable, so the search measures the smallest plan itself, then reports the miss."""
    from edgesvd.planner import smallest_achievable

    layers, cost = tiny_plan_inputs
    low_ms = smallest_achievable(layers, cost, cost.profile.rank_multiple)["latency_p50"]
    limit = 1.2 * low_ms / cost.dense()["latency_p50"]
    with pytest.raises(BudgetError, match=r"budget not met on this machine after 2 plans \(last: p50 latency"):
        _search(tmp_path, tiny_plan_inputs, lambda est: est * 1.5, budget=f"{100 * limit:.4f}%")
    assert sorted(p.name for p in (tmp_path / "loop").glob("plan*")) == ["plan1", "plan2"]  # the second: the floor
