"""Budgets on devices: cost model per profile, plan → compress → export → measure → re-plan, one bundle per device."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from edgesvd.calibration import sample_calibration
from edgesvd.checkpoint import (CompressionRecord, LayerRecord, atomic_output_dir, check_output_dir, keep_of,
                                library_versions, save_compressed)
from edgesvd.compress import CompressConfig, prepare, replace_with_factors
from edgesvd.costmodel import CostModel, ModelFacts, model_facts
from edgesvd.errors import BudgetError
from edgesvd.evaluate import TASK_SCORES, check_eval_data, task_score
from edgesvd.layer_importance import whitened_importances
from edgesvd.loading import resolve_model
from edgesvd.planner import Receipt, plan_ranks, resolve_limits
from edgesvd.profiles import Budget, Profile
from edgesvd.progress import console



def is_local(profile: Profile) -> bool:
    """True when the profile's device is this machine, so its latency can be measured here."""
    return profile.device.measure


def require_measurable(profiles: list[Profile]) -> None:
    """A profile that measures this machine's GPU needs one that works; a one-line DeviceError
    before any work otherwise."""
    from edgesvd.errors import DeviceError

    from .providers import CUDA, cuda_status

    for p in profiles:
        if is_local(p) and p.runtime.execution_provider == CUDA:
            usable, reason = cuda_status()
            if not usable:
                raise DeviceError(f"profile {p.name} measures this machine's GPU with the CUDA execution provider, "
                                  f"but {reason}")


def cost_model_for(profile: Profile, facts: ModelFacts, measure: bool = True, log=None) -> CostModel:
    """The CostModel for `profile`: on the host, latency of every layer shape at every candidate
    rank is timed under onnxruntime (cached); elsewhere it is calibrated or estimated."""
    table = None
    if measure and is_local(profile):
        from .microbench import measure_layers

        rt = profile.runtime
        table = measure_layers(list(facts.layers), profile.workload.tokens(facts.family), profile.rank_multiple,
                               rt.execution_provider, rt.threads, rt.precision, log=log)
    return CostModel(profile, facts, table)


# -- the closed loop's arithmetic ---------------------------------------------------------------
MEASURABLE = ("model_bytes", "peak_memory", "latency_p50", "latency_p90")


def missed_budgets(limits: dict[str, float], measured: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Budgets the measurement misses: key → (measured, limit)."""
    return {k: (measured[k], lim) for k, lim in limits.items() if k in measured and measured[k] > lim}


def retargeted(plan_limits: dict[str, float], limits: dict[str, float], measured: dict[str, float],
               bounds: dict[str, tuple] | None = None, margin: float = 0.97, relax_above: float = 0.10,
               max_relax: float = 1.25, binding: str | None = None) -> dict[str, float]:
    """Planning limits for the next plan, from what the last one measured.

    Latency: a missed budget is re-aimed by the ratio the measurement was off (limit ÷ measured,
    times `margin`: timing errors are relative); one met with more than `relax_above` headroom
    is re-aimed up (by at most `max_relax`), since a plan far under its budget gave quality away —
    unless the plan is bound by another budget (`binding`), which relaxing it would not change.
    Once one planning limit has met and another missed, the next is their midpoint (bisection;
    `bounds` holds key → (highest that met, lowest that missed) across calls). A missed size is
    lowered by 1.25 × the overshoot: what its estimate misses (graph structure, runtime memory)
    is an additive constant. Everything else keeps its planning limit.
    """
    bounds = {} if bounds is None else bounds
    out = dict(plan_limits)
    for key, limit in limits.items():
        if key not in measured:
            continue
        value, aim = measured[key], plan_limits[key]
        if not key.startswith("latency"):
            if value > limit:
                out[key] = aim - 1.25 * (value - limit)
            continue
        lo, hi = bounds.get(key, (None, None))
        if value > limit:
            hi = aim if hi is None else min(hi, aim)
        elif (limit - value) / limit > relax_above and binding in (None, key):
            lo = aim if lo is None else max(lo, aim)
        else:
            continue
        bounds[key] = (lo, hi)
        if lo is not None and hi is not None:
            out[key] = (lo + hi) / 2
        else:
            out[key] = aim * min(limit / value * margin, max_relax)
    return out


# -- building a planned model -------------------------------------------------------------------
def apply_ranks(dense: torch.nn.Module, spectra: dict, orders: dict[str, torch.Tensor],
                ranks: dict[str, int | None]) -> tuple[torch.nn.Module, list[LayerRecord], dict]:
    """A copy of `dense` whose layers take their planned ranks (the most important components),
    with the checkpoint's layer records and spectrum entries."""
    model = copy.deepcopy(dense)
    records, entries = [], {}
    for name, rank in ranks.items():
        mod = model.get_submodule(name)
        records.append(LayerRecord(name, mod.in_features, mod.out_features, rank, mod.bias is not None))
        if rank is None:
            continue
        index = orders[name][:rank]
        a, b = spectra[name].factors(rank, index=index.to(spectra[name].sigma.device))
        replace_with_factors(model, name, a, b)
        kept = torch.zeros_like(spectra[name].sigma)
        kept[index] = 1
        entries[name] = {"sigma": spectra[name].sigma, "kept": kept}
    return model.eval(), records, entries


@torch.no_grad()
def agreement_with_dense(dense: torch.nn.Module, model: torch.nn.Module, batch, family: str) -> dict[str, float]:
    """Quality proxy on held-out calibration text. Encoders: Spearman correlation between the dense
    and the compressed model's pairwise cosine similarities of mean-pooled embeddings (what an
    embedding model is used for; raw embedding cosine is dominated by a shared direction).
    Decoders: agreement of the next-token argmax with the dense model."""
    from edgesvd.evaluate import spearman

    ids, mask = batch.input_ids, batch.attention_mask
    if family == "encoder":
        def similarities(m):
            h = m(input_ids=ids, attention_mask=mask).last_hidden_state
            w = mask.unsqueeze(-1).to(h)
            e = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1).clamp_min(1), dim=-1)
            iu = torch.triu_indices(len(e), len(e), offset=1)
            return (e @ e.T)[iu[0], iu[1]].double().numpy()
        return {"similarity_spearman_vs_dense": round(float(spearman(similarities(dense), similarities(model))), 4)}
    a = dense(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    b = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    valid = mask.bool()
    return {"top1_agreement_vs_dense": round(float((a == b)[valid].float().mean()), 4)}


# -- one run over many devices ------------------------------------------------------------------
@dataclass
class DeviceResult:
    """What one profile got: its bundle, plan, measured or estimated values and its quality (the
    --eval task score first when there is one, then the proxy)."""

    profile: str
    device: str
    latency_source: str
    bundle: Path
    onnx_bytes: int
    receipt: Receipt
    values: dict[str, float]          # model_bytes, peak_memory, latency_p50, latency_p90 (measured when local)
    measured: bool
    limits: dict[str, float]
    iterations: int
    history: list[dict] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)
    parity_ok: bool = True

    def to_json(self) -> dict:
        d = asdict(self)
        d["bundle"] = str(self.bundle)
        d["receipt"] = self.receipt.to_json()
        return d


def _values(report, label: str, folder: Path) -> dict[str, float]:
    """Size, latency and (on the CPU) peak memory measured for one model. On the CUDA EP the
    process's RSS is not the GPU's memory, so peak memory is left to the estimate."""
    from .onnx_export import onnx_files_bytes
    from .providers import CUDA

    m = next(x for x in report.measurements if x.model == label)
    stats = m.modes["prefill" if "prefill" in m.modes else next(iter(m.modes))]
    values = {"model_bytes": float(onnx_files_bytes(folder)), "latency_p50": stats["p50_ms"],
              "latency_p90": stats["p90_ms"]}
    if m.provider != CUDA:
        values["peak_memory"] = m.peak_rss_mb * 1e6
    return values


def _measure(onnx_dir: Path, profile: Profile, family: str, runs: int, warmup: int, session,
             dense_dir: Path | None = None) -> tuple[dict, dict | None, dict]:
    """Latency, peak memory and size of one export on this machine (the exporters' profiler), and
    of the dense export too when `dense_dir` is given: measured back to back, so a relative budget
    compares two numbers taken under the same load. Returns (values, dense values or None, report)."""
    from .profiling import ProfileConfig, profile as profile_onnx

    w = profile.workload
    seq = (w.prompt_length or w.sequence_length) if family == "decoder" else w.sequence_length
    report = profile_onnx(onnx_dir, dense_dir, ProfileConfig(batch=w.batch, seq_len=seq, warmup=warmup, runs=runs,
                                                              eps=(profile.runtime.execution_provider,), session=session))
    dense = _values(report, "dense", dense_dir) if dense_dir is not None else None
    return _values(report, "compressed", onnx_dir), dense, report.to_json()


def _export_cfg(base, profile: Profile, family: str):
    precision = profile.runtime.precision
    return replace(base, dtype="fp16" if precision == "fp16" else "fp32",
                   quantize="int8" if precision == "int8" else None, pooled=base.pooled and family == "encoder")


def _fmt(key: str, v: float) -> str:
    return f"{v:.2f} ms" if key.startswith("latency") else f"{v / 1e6:.2f} MB"


@dataclass
class _Attempt:
    """One plan tried: its receipt, model, folder and what it measured (estimated when not local)."""

    plan: int
    receipt: Receipt
    model: torch.nn.Module | None
    folder: Path
    values: dict[str, float]
    report: dict | None
    met: bool
    limits: dict[str, float]
    dense: dict[str, float]


@dataclass
class Importance:
    """One importance pass shared by every device: what the planner ranks and how a plan becomes a model.

    `method` 'whiten': components ordered by whitened σ², a plan is cut from the spectra.
    `method` 'learned': components ordered by learned importance along the pruning path, a plan is
    finished by stage 3 of the learned method (scores folded, factors fine-tuned) on a copy.
    """

    method: str
    layers: list                      # LayerImportance per target, for the planner
    orders: dict[str, torch.Tensor]   # component indices, most important first
    dense: torch.nn.Module            # the dense model on the CPU (quality reference, whitened cuts)
    spectra: dict | None = None       # whitened spectra ('whiten')
    state: object | None = None       # LearnedState ('learned')
    scores: dict[str, torch.Tensor] | None = None
    show_progress: bool = True

    def model_for(self, ranks: dict[str, int | None]) -> tuple[torch.nn.Module, list[LayerRecord], dict, dict]:
        """The compressed model for one plan (CPU), its layer records, spectrum entries and details."""
        if self.method == "whiten":
            model, records, entries = apply_ranks(self.dense, self.spectra, self.orders, ranks)
            return model, records, entries, {}
        from edgesvd.learned import finish

        model, records, entries, details = finish(self.state, ranks, self.orders, self.scores,
                                                  model=copy.deepcopy(self.state.model),
                                                  show_progress=self.show_progress)
        return model.cpu().eval(), records, entries, details


def _build_and_export(receipt: Receipt, where: Path, attempt: int, p: Profile, cfg, importance: Importance,
                      prepared, family: str) -> torch.nn.Module:
    """Turn the plan's ranks into a model, save the checkpoint and export it into `where`."""
    from .onnx_export import export_checkpoint

    model, records, entries, details = importance.model_for(receipt.ranks())
    record = CompressionRecord(
        method=importance.method, keep_requested=round(keep_of(records), 4), family=family, source_model=str(cfg.model),
        layers=records, rank_multiple=p.rank_multiple, calibration=prepared.calib.summary,
        details={"planner": "budget", "profile": p.name, "plan": attempt, **details}, versions=library_versions())
    save_compressed(model, prepared.tokenizer, record, where / "checkpoint", entries, force=True)
    export_checkpoint(where / "checkpoint", where / "onnx", _export_cfg(cfg.export, p, family), force=True)
    return model


def _plan_keep(receipt: Receipt) -> float:
    """Targeted parameters a plan keeps (dense layers count whole)."""
    return keep_of([LayerRecord(r.name, r.shape[1], r.shape[0], r.rank, False) for r in receipt.rows])


BUDGET_METHODS = ("learned", "whiten")


def shared_importance(cfg, profiles: list[Profile], say) -> tuple[Importance, object, ModelFacts, dict]:
    """Load, calibrate, and rank components once for every device.

    Every profile is planned on the whitened spectra first, so an infeasible budget fails before
    any training. With 'learned' the scores are then learned once, pruning down to the smallest
    keep any of those plans needs (a looser device keeps more of the pruning path). Returns the
    importance, the prepared model, the model's facts and the cost model per profile.
    """
    from edgesvd.compress import DEFAULT_METHOD
    from edgesvd.errors import ConfigError
    from edgesvd.layer_importance import learned_importances
    from edgesvd.learned import learn_importance

    method = cfg.method or DEFAULT_METHOD
    if method not in BUDGET_METHODS:
        raise ConfigError(f"--profile plans with method {' or '.join(BUDGET_METHODS)}, not '{method}'")
    multiple = min(p.rank_multiple for p in profiles)
    prepared = prepare(CompressConfig(model=cfg.model, method=method, rank_multiple=multiple,
                                      calibration=cfg.calibration, device=cfg.device,
                                      show_progress=cfg.show_progress))
    dense = copy.deepcopy(prepared.model).cpu().eval() if method == "learned" else prepared.model.cpu().eval()
    facts = model_facts(dense, prepared.targets, prepared.source.family)
    layers, spectra, orders = whitened_importances(dense, prepared.targets, prepared.stats, cfg.show_progress)
    spectra = {k: replace(s, left=s.left.cpu(), sigma=s.sigma.cpu(), right=s.right.cpu()) for k, s in spectra.items()}
    costs = {p.name: cost_model_for(p, facts, log=say if cfg.show_progress else None) for p in profiles}
    keeps = [_plan_keep(plan_ranks(layers, costs[p.name])) for p in profiles]  # infeasible budgets fail here
    if method == "whiten":
        return Importance("whiten", layers, orders, dense, spectra=spectra), prepared, facts, costs
    keep = min(keeps)
    say(f"[bold]edgesvd run[/bold] · learning importance once for {len(profiles)} device(s), pruning to keep "
        f"{keep:.3f} (the tightest whitened plan)")
    state = learn_importance(prepared, keep, multiple, cfg.learned, cfg.calibration.seed, cfg.show_progress,
                             spectra=spectra)
    layers, orders, scores = learned_importances(state)
    return (Importance("learned", layers, orders, dense, state=state, scores=scores, show_progress=cfg.show_progress),
            prepared, facts, costs)


def _closed_loop(p: Profile, layers, cost: CostModel, limits: dict[str, float], dense_values: dict[str, float],
                 build, folder: Path, family: str, cfg, dense_dir: Path | None, max_plans: int, say
                 ) -> tuple[_Attempt, list[dict]]:
    """Plan, build, measure (on this machine), re-aim, at most `max_plans` times; keep the plan that
    meets every measured budget with the most importance. Elsewhere one plan, values estimated.
    The chosen plan's checkpoint/ and onnx/ end up in `folder`. Returns it (with the limits and
    dense values it was judged by: relative budgets follow the dense model measured beside each
    plan) and the history."""
    import shutil

    local = is_local(p)
    relative = any(b.relative is not None for b in p.budgets.values())
    plan_limits, history, attempts, seen, bounds = dict(limits), [], [], [], {}
    if local:  # sizes: what the estimate leaves out of the dense model (graph, runtime) is a constant
        estimated = cost.dense()
        for key in ("model_bytes", "peak_memory"):
            if key in plan_limits:
                plan_limits[key] -= dense_values[key] - estimated[key]
    for attempt in range(1, max_plans + 1):
        try:
            receipt = plan_ranks(layers, cost, {k: Budget(k, absolute=v) for k, v in plan_limits.items()})
            for _ in range(20):  # a missed plan re-aimed to the same ranks: keep re-aiming until they change
                if receipt.ranks() not in seen or not history or not history[-1]["missed"]:
                    break
                plan_limits = retargeted(plan_limits, limits, attempts[-1].values, bounds)
                receipt = plan_ranks(layers, cost, {k: Budget(k, absolute=v) for k, v in plan_limits.items()})
        except BudgetError as exc:
            if not history:
                extra = f" (dense model measured here: p50 {dense_values['latency_p50']:.2f} ms)" if local else ""
                raise BudgetError(f"{exc}{extra}") from exc
            raise BudgetError(f"{p.name}: plan {attempt - 1} missed on this machine ({history[-1]['missed']}) "
                              f"and no tighter plan exists: {exc}") from exc
        if receipt.ranks() in seen:  # re-aiming changed nothing: the loop has converged
            break
        seen.append(receipt.ranks())
        receipt.budgets = [replace(b, budget=str(p.budgets[b.key])) for b in receipt.budgets]
        say(f"[bold]edgesvd run[/bold] · {p.name}: plan {attempt} "
            f"({sum(r.rank is not None for r in receipt.rows)}/{len(receipt.rows)} layers factorized, "
            f"estimated p50 {receipt.totals['latency_p50']:.2f} ms, {receipt.totals['model_bytes'] / 1e6:.2f} MB)")
        where = folder / f"plan{attempt}"
        model = build(receipt, where, attempt)
        if not local:  # estimated, like the dense values the limits came from (the bundle's size is shown apart)
            values = dict(receipt.totals)
            attempts.append(_Attempt(attempt, receipt, model, where, values, None, True, dict(limits),
                                     dict(dense_values)))
            break
        values, dense_now, report = _measure(where / "onnx", p, family, cfg.profile_runs, cfg.profile_warmup,
                                             cfg.session, dense_dir if relative else None)
        values.setdefault("peak_memory", receipt.totals["peak_memory"])  # GPU: estimated (see _values)
        if dense_now is not None:  # relative budgets against the dense model measured just now
            dense_values.update(dense_now)
            limits = resolve_limits(p.budgets, dense_values)
        missed = missed_budgets(limits, values)
        history.append({"plan": attempt, "estimated": {k: receipt.totals[k] for k in limits},
                        "measured": {k: values[k] for k in limits}, "limits": dict(limits),
                        "importance_kept": receipt.importance_kept,
                        "missed": "; ".join(f"{k} {_fmt(k, v)} > {_fmt(k, lim)}" for k, (v, lim) in missed.items())})
        best = max((a for a in attempts if a.met), key=lambda a: a.receipt.importance_kept, default=None)
        keep_model = not missed and (best is None or receipt.importance_kept > best.receipt.importance_kept)
        attempts.append(_Attempt(attempt, receipt, model if keep_model else None, where, values, report, not missed,
                                 dict(limits), dict(dense_values)))
        nxt = retargeted(plan_limits, limits, values, bounds, binding=receipt.binding)
        if nxt == plan_limits or attempt == max_plans:
            break
        say(f"[yellow]{p.name}: plan {attempt} "
            + (f"misses its budget on this machine ({history[-1]['missed']}); tightening"
               if missed else "meets its budgets with room to spare; relaxing") + " and re-planning[/yellow]")
        plan_limits = nxt
    met = [a for a in attempts if a.met]
    if not met:
        raise BudgetError(f"{p.name}: budget not met on this machine after {len(attempts)} plans "
                          f"(last: {history[-1]['missed']}); relax the budget or raise --max-plans")
    chosen = max(met, key=lambda a: a.receipt.importance_kept)
    for sub in ("checkpoint", "onnx"):
        (chosen.folder / sub).replace(folder / sub)
    for a in attempts:
        shutil.rmtree(a.folder, ignore_errors=True)
    if history:
        history[chosen.plan - 1]["chosen"] = True
    return chosen, history


def run_profiles(cfg, profiles: list[Profile], max_plans: int = 3) -> list[DeviceResult]:
    """`edgesvd run --profile …`: importance once (learned by default), then per device plan → compress → export →
    parity → (measure on this machine, re-plan while a budget is missed, at most `max_plans`
    plans) → bundle whose manifest holds budgets, receipt and measured values. `cfg` is the
    exporters' RunConfig (model, calibration, export options, output root, runs, session)."""
    from .bundle import pack
    from .onnx_export import export_dense
    from .parity import ParityConfig, verify
    from .pipeline import dense_and_compressed_scores

    if not profiles:
        raise BudgetError("no profile given")
    require_measurable(profiles)
    source = resolve_model(cfg.model)
    out = Path(cfg.out_root) / source.name
    check_output_dir(out, cfg.force)
    if cfg.eval_file is not None:
        check_eval_data(cfg.eval_file, source.family)
    say = console.print if cfg.show_progress else (lambda *a, **k: None)

    say("[bold]edgesvd run[/bold] · component importance (once for all devices)")
    importance, prepared, facts, costs = shared_importance(cfg, profiles, say)
    dense, family = importance.dense, prepared.source.family
    held_out = sample_calibration(prepared.tokenizer, replace(cfg.calibration, num_sequences=32,
                                                              seed=cfg.calibration.seed + 1), family)
    if importance.method == "learned":  # it plans differently from the whitened check: again, before any export
        for p in profiles:
            plan_ranks(importance.layers, costs[p.name])
    dense_score = None
    if cfg.eval_file is not None:
        say(f"[bold]edgesvd run[/bold] · dense task score on {cfg.eval_file}")
        dense_score = task_score(dense, prepared.tokenizer, family, cfg.eval_file)

    results: list[DeviceResult] = []
    with atomic_output_dir(out, cfg.force) as tmp:
        dense_measured: dict[tuple, dict] = {}

        def dense_dir(p: Profile) -> Path:
            """The dense baseline exported at the profile's precision (once per precision)."""
            ecfg = _export_cfg(cfg.export, p, family)
            where = tmp / ("onnx-dense" if ecfg.precision == "fp32" else f"onnx-dense-{ecfg.precision}")
            if not where.exists():
                say(f"[bold]edgesvd run[/bold] · dense baseline ({ecfg.precision}), exported to measure on this machine")
                export_dense(cfg.model, where, ecfg)
            return where

        for p in profiles:
            start = time.perf_counter()
            cost = costs[p.name]
            local = is_local(p)
            if local:
                key = (p.workload, p.runtime.execution_provider, p.runtime.precision)
                if key not in dense_measured:
                    dense_measured[key] = _measure(dense_dir(p), p, family, cfg.profile_runs, cfg.profile_warmup,
                                                   cfg.session)[0]
                dm = dense_measured[key]
                cost = cost.anchored_to(dm["latency_p50"], dm["latency_p90"])
            dense_values = cost.dense()
            if local:  # relative budgets are relative to what the dense model measured
                dense_values.update(dense_measured[key])
            limits = resolve_limits(p.budgets, dense_values)
            folder = tmp / p.name
            build = lambda receipt, where, attempt: _build_and_export(  # noqa: E731
                receipt, where, attempt, p, cfg, importance, prepared, family)
            chosen, history = _closed_loop(p, importance.layers, cost, limits, dense_values, build, folder, family, cfg,
                                           dense_dir(p) if local else None, max_plans, say)
            receipt, model, values, prof_report = chosen.receipt, chosen.model, chosen.values, chosen.report
            limits, dense_values = chosen.limits, chosen.dense
            if local:  # the dense model measured beside the chosen plan
                receipt.dense = {**receipt.dense, **dense_values}
            parity = verify(folder / "checkpoint", folder / "onnx", ParityConfig(session=cfg.session))
            proxy = agreement_with_dense(dense, model, held_out, family)
            quality, task = dict(proxy), {}
            if cfg.eval_file is not None:  # the task score first: the comparison and the chart show it
                task = dense_and_compressed_scores(prepared.source, model, prepared.tokenizer, cfg.eval_file,
                                                   dense_score)
                quality = {**{k: v["compressed"] for k, v in task.items()}, **quality}
            for b in receipt.budgets:  # judged by measurement where there is one
                b.limit, b.binding = limits[b.key], False
                b.measured = values[b.key] if local else None
                b.headroom = (b.limit - (b.value if b.measured is None else b.measured)) / b.limit
            if receipt.budgets:
                min(receipt.budgets, key=lambda b: b.headroom).binding = True
            extra = {"budgets": {
                "profile": p.name, "profile_file": p.path, "device": p.device.name,
                "execution_provider": p.runtime.execution_provider, "precision": p.runtime.precision,
                "workload": asdict(p.workload), "limits": limits,
                "as_written": {k: str(b) for k, b in p.budgets.items()},
                "values": values, "values_are": _values_are(p, local, cost.source),
                "dense": dense_values, "met": not missed_budgets(limits, values), "plans": history or [{"plan": 1}],
                "quality_proxy": proxy, "receipt": receipt.to_json()}}
            if task:
                extra["quality"] = task
            pack(folder / "onnx", folder / "checkpoint", folder / "bundle", parity.to_json(), prof_report,
                 cfg.session.to_json(), extra=extra)
            results.append(DeviceResult(p.name, p.device.name, "measured" if local else cost.source, out / p.name / "bundle",
                                        _onnx_bytes(folder / "onnx"), receipt,
                                        values, local, limits, len(history) or 1, history, quality, parity.ok))
            say(f"[bold]edgesvd run[/bold] · {p.name} done in {time.perf_counter() - start:.0f}s")
        comparison = [r.to_json() for r in results]
        (tmp / "comparison.json").write_text(json.dumps(comparison, indent=2, default=str) + "\n")
        (tmp / "comparison.md").write_text(comparison_markdown(results) + "\n")
        from .report import write_report

        for r in results:  # comparison.json exists now: every device's report gets the trade-off chart
            write_report(tmp / r.profile / "bundle")
    return results


def _values_are(p: Profile, local: bool, source: str) -> str:
    from .providers import CUDA

    if not local:
        return f"{source} (not measured)"
    if p.runtime.execution_provider == CUDA:
        return "measured on this machine (peak memory estimated: GPU memory is not measured)"
    return "measured on this machine"


def _onnx_bytes(folder: Path) -> int:
    from .onnx_export import onnx_files_bytes

    return int(onnx_files_bytes(folder))


def comparison_rows(results: list[DeviceResult]) -> list[list[str]]:
    """Rows of the per-device comparison: size, latency (with its label), quality, binding budget."""
    rows = []
    for r in results:
        q = next(iter(r.quality.items()), ("", float("nan")))
        rows.append([r.profile, r.receipt.latency_source if not r.measured else "measured",
                     f"{sum(x.rank is not None for x in r.receipt.rows)}/{len(r.receipt.rows)}",
                     f"{r.onnx_bytes / 1e6:.2f} MB", f"{r.receipt.dense['latency_p50']:.2f} ms",
                     f"{r.values['latency_p50']:.2f} ms", f"{r.values['latency_p50'] / r.receipt.dense['latency_p50']:.2f}",
                     f"{r.receipt.importance_kept:.3f}", f"{q[1]:.4f}", r.receipt.binding or "-",
                     "yes" if not missed_budgets(r.limits, r.values) else "NO", str(r.iterations)])
    return rows


COMPARISON_COLUMNS = ["profile", "latency is", "factorized", "ONNX size", "dense p50", "p50", "p50 ratio",
                      "importance kept", "quality", "binds", "budgets met", "plans"]


def quality_legend(results: list[DeviceResult]) -> str:
    """What the comparison's quality column is: the --eval task score, else the proxy."""
    name = next((k for r in results for k in r.quality), "")
    if name in TASK_SCORES.values():
        return f"quality: {name.replace('_', ' ')} of the compressed PyTorch model on the --eval file"
    return f"quality: {name.replace('_', ' ')} on held-out calibration text (a proxy; --eval FILE gives a task score)"


def comparison_markdown(results: list[DeviceResult]) -> str:
    lines = ["| " + " | ".join(COMPARISON_COLUMNS) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(results)]
    return "\n".join(lines) + "\n\n" + quality_legend(results)


def run_with_profiles(cfg, profile_refs: tuple[str, ...], budget_items: tuple[str, ...], max_plans: int = 3
                      ) -> list[DeviceResult]:
    """The CLI's `run --profile …`: load and override the profiles, run, print receipts and the comparison."""
    from rich.table import Table

    from edgesvd.cli import out_console
    from edgesvd.errors import ConfigError
    from edgesvd.profile_commands import parse_budget_options, print_receipt
    from edgesvd.profiles import load_profile

    if max_plans < 1:
        raise ConfigError(f"--max-plans must be >= 1, got {max_plans}")
    overrides = parse_budget_options(tuple(budget_items))
    profiles = [load_profile(ref).with_budgets(overrides) for ref in profile_refs]
    if len({p.name for p in profiles}) != len(profiles):
        raise ConfigError("the same profile was given twice")
    results = run_profiles(cfg, profiles, max_plans)
    for r in results:
        print_receipt(r.receipt, per_layer=False)
        for h in r.history:
            shown = ", ".join(f"{k} {_fmt(k, v)} (limit {_fmt(k, h['limits'][k])}, estimated {_fmt(k, h['estimated'][k])})"
                              for k, v in h["measured"].items())
            out_console.print(f"  plan {h['plan']}: measured {shown}; importance kept {h['importance_kept']:.3f}; "
                              + (f"missed: {h['missed']}" if h["missed"] else "met")
                              + ("  ← chosen" if h.get("chosen") else ""))
    table = Table(title=f"edgesvd run — one importance pass, {len(results)} device(s)")
    for col in COMPARISON_COLUMNS:
        table.add_column(col, justify="left" if col in ("profile", "latency is", "binds") else "right")
    for row in comparison_rows(results):
        table.add_row(*row)
    out_console.print(table)
    out_console.print(f"{quality_legend(results)}; bundles: {', '.join(str(r.bundle) for r in results)}")
    out_console.print(f"reports: {', '.join(str(r.bundle / 'report.html') for r in results)}")
    return results
