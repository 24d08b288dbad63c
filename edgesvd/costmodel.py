"""Cost model: bytes, peak memory and latency of a model at given per-layer ranks on a profile's device."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from torch import nn

from .factorize import break_even_rank, params_at
from .families import Family
from .profiles import Profile
from .units import BYTES_PER_COLUMN, BYTES_PER_VECTOR_PARAM

# Labels shown next to every latency number, so nobody mistakes an estimate for a measurement.
MEASURED, CALIBRATED, ESTIMATED = "measured", "calibrated", "estimated"
# p90/p50 of a forward pass when nothing was measured (onnxruntime on an idle machine runs close
# to its median); replaced by the measured ratio as soon as the dense model is timed.
DEFAULT_TAIL = 1.1
# Bytes per output of a factorized layer's output order (the Gather's int64 indices).
INDEX_BYTES = 8
# Graph bytes a pivoted layer adds beyond its weights: five more nodes than a plain one (Mul, Concat,
# Gather and two Transposes), about 185 bytes each in stories260K's export (30 pivoted layers against
# 20 plain: 160 more nodes, 29.6 KB). Negligible for real models, but on a tiny one it decides
# whether a 97 % size budget is met.
PIVOTED_GRAPH_BYTES = 1100


@dataclass(frozen=True)
class LayerShape:
    """One Linear: out×in weight, with or without bias."""

    name: str
    out_features: int
    in_features: int
    bias: bool = True
    pivoted: bool = False  # factorized in the pivoted form (edgesvd.factorize)

    @property
    def key(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def params(self, rank: int | None) -> int:
        """Weight parameters at `rank` (None: dense); the bias is counted separately."""
        return params_at(self.out_features, self.in_features, rank, self.pivoted)


@dataclass(frozen=True)
class ModelFacts:
    """What the cost model needs to know about a model: its Linear layers and transformer shape."""

    family: Family
    total_params: int
    layers: tuple[LayerShape, ...]          # targeted Linear layers
    other_linears: tuple[LayerShape, ...]   # Linear layers left alone (e.g. lm_head, pooler)
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    vector_params: int = 0  # parameters of 1-D tensors (biases, norms): float32 under weight quantization

    @property
    def targeted_params(self) -> int:
        return sum(l.params(None) for l in self.layers)


def model_facts(model, targets: list[str], family: Family, pivoted: bool = False) -> ModelFacts:
    """ModelFacts of a (dense) Hugging Face model whose targeted Linear layers are `targets` (to be
    factorized in the pivoted form or not)."""
    cfg = model.config
    get = lambda *names, default=None: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), default)
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    chosen = set(targets)
    layers, others = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            shape = LayerShape(name, mod.out_features, mod.in_features, mod.bias is not None,
                               pivoted and name in chosen)
            (layers if name in chosen else others).append(shape)
    order = {n: i for i, n in enumerate(targets)}
    layers.sort(key=lambda s: order[s.name])
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once, as the export stores them
    return ModelFacts(
        family=family, total_params=sum(p.numel() for p in params), layers=tuple(layers),
        other_linears=tuple(others), hidden=hidden, intermediate=get("intermediate_size", "n_inner", default=4 * hidden),
        num_layers=get("num_hidden_layers", "n_layer"), num_heads=heads,
        num_kv_heads=get("num_key_value_heads", default=heads), head_dim=get("head_dim", default=hidden // heads),
        vocab=get("vocab_size", default=0), vector_params=sum(p.numel() for p in params if p.dim() == 1))


def candidate_ranks(shape: LayerShape, multiple: int) -> list[int]:
    """Ranks a planner may give a layer: multiples of `multiple` strictly below break-even."""
    bound = min(break_even_rank(shape.out_features, shape.in_features, shape.pivoted), shape.out_features,
                shape.in_features)
    return [r for r in range(multiple, int(np.ceil(bound)), multiple) if r < bound]


# Latency table measured on this machine: (out, in, rank|None, pivoted) → (p50 ms, p90 ms) of the
# layer at the workload's token count; rank None is the dense layer (pivoted False).
LayerTable = dict[tuple[int, int, int | None, bool], tuple[float, float]]


def _fit_matmul_table(rows) -> tuple[float, float, float]:
    """Least-squares fit t = overhead + flops/F + bytes/B to measured MatMul rows (all terms ≥ 0).

    Residuals are relative (each row divided by its time): small MatMuls, which dominate a
    factorized layer, must fit as well as the big ones that would otherwise set every coefficient.
    """
    t = np.array([r.p50_ms / 1e3 for r in rows])
    a = np.array([[1.0, 2.0 * r.m * r.k * r.n / 1e9, 4.0 * (r.m * r.k + r.k * r.n + r.m * r.n) / 1e9] for r in rows])
    a, t = a / t[:, None], np.ones_like(t)
    active = [0, 1, 2]
    for _ in range(3):  # drop terms that come out negative, refit (a tiny non-negative least squares)
        coef = np.zeros(3)
        coef[active] = np.linalg.lstsq(a[:, active], t, rcond=None)[0]
        if (coef >= 0).all():
            break
        active = [i for i in active if coef[i] > 0]
    coef = np.clip(coef, 0, None)
    return float(coef[0]), float(coef[1]), float(coef[2])  # s, s/GFLOP, s/GB


class CostModel:
    """Bytes, peak memory and latency of `facts` at per-layer ranks on `profile`'s device.

    Latency comes, in order of preference, from `table` (this machine's onnxruntime timings of
    every layer at every candidate rank: label 'measured'), from the profile's `[measured]`
    MatMul table fitted to overhead + compute + traffic (label 'calibrated'), or from the
    device's public peak compute and bandwidth as a roofline (label 'estimated').
    """

    def __init__(self, profile: Profile, facts: ModelFacts, table: LayerTable | None = None,
                 fixed_ms: float | None = None, tail: float | None = None, table_info: dict | None = None) -> None:
        self.profile, self.facts, self.table = profile, facts, table or {}
        self.table_info = table_info or {}  # where the layer table came from (cache, load), for the receipt
        precision = profile.runtime.precision
        self.bpp = profile.runtime.bytes_per_param  # weight matrices
        self.bpc, self.bpv = BYTES_PER_COLUMN[precision], BYTES_PER_VECTOR_PARAM[precision]
        self.act_bytes = 2 if profile.runtime.precision == "fp16" else 4
        self.tokens = profile.workload.tokens(facts.family)
        self._fit = _fit_matmul_table(profile.measured.matmul) if profile.measured else None
        self._exact = {(r.m, r.k, r.n): r.p50_ms for r in profile.measured.matmul} if profile.measured else {}
        self.source = MEASURED if self.table else CALIBRATED if self._fit else ESTIMATED
        self._fixed_ms = fixed_ms
        self.tail = tail if tail is not None else DEFAULT_TAIL
        self.anchored = False
        self.scale = 1.0  # measured ÷ modelled time of the targeted layers, once anchored
        self.layer_share: float | None = None  # the targeted layers' share of the measured dense time
        self._tied_fixed_ms: float | None = None  # the measured time outside them, once tied
        self._cache: dict[tuple, float] = {}

    def _copy(self, profile: Profile, tail: float) -> "CostModel":
        out = CostModel(profile, self.facts, self.table, self._fixed_ms, tail, self.table_info)
        out.scale, out.anchored = self.scale, self.anchored
        out.layer_share, out._tied_fixed_ms = self.layer_share, self._tied_fixed_ms
        return out

    def anchored_to(self, dense_p50_ms: float, dense_p90_ms: float | None = None,
                    layer_share: float | None = None) -> "CostModel":
        """A copy tied to the dense model measured on this machine, so its total is that latency.

        With `layer_share` (the targeted layers' MatMuls' share of the dense model's kernel time,
        from a trace of the same model on the same machine): the targeted layers get that share of
        the measured latency, spread over them in the proportions of their modelled (micro-
        benchmarked) times, and everything factorization leaves alone gets the rest: so a plan's
        estimate = measured dense × (1 − share + share × its modelled layer time ÷ the dense one's).
        Without it every time is scaled alike (the estimate of what is not timed stays a model).
        Scaling, not an offset: on a shared machine the load slows every operator alike, and the
        layer table may come from a quieter moment."""
        tail = dense_p90_ms / dense_p50_ms if dense_p90_ms else self.tail
        out = self._copy(self.profile, tail)
        if layer_share is None:
            out.scale = self.scale * dense_p50_ms / self.dense()["latency_p50"]
            out._tied_fixed_ms = None
        else:
            modelled = sum(self._unscaled_layer_ms(s, None) for s in self.facts.layers)
            out.scale = layer_share * dense_p50_ms / modelled
            out._tied_fixed_ms = (1.0 - layer_share) * dense_p50_ms
        out.layer_share = layer_share
        out.anchored = True
        return out

    # -- per-operator time ---------------------------------------------------------------------
    def _roofline_ms(self, flops: float, traffic: float) -> float:
        dev, rt = self.profile.device, self.profile.runtime
        compute = flops / (dev.peak_gflops * 1e9 * rt.efficiency)
        memory = traffic / (dev.bandwidth_gbs * 1e9 * rt.efficiency)
        return 1e3 * max(compute, memory) + rt.op_overhead_us / 1e3

    def matmul_ms(self, m: int, k: int, n: int) -> float:
        """Time of one (m×k)·(k×n) MatMul whose right side is a weight."""
        if (m, k, n) in self._exact:
            return self._exact[(m, k, n)]
        if self._fit is not None:
            overhead, per_gflop, per_gb = self._fit
            scale = self.act_bytes / 4
            return 1e3 * (overhead + 2 * m * k * n / 1e9 * per_gflop
                          + scale * 4 * (m * k + k * n + m * n) / 1e9 * per_gb)
        traffic = self.act_bytes * (m * k + m * n) + self.bpp * k * n
        return self._roofline_ms(2.0 * m * k * n, traffic)

    def _activation_matmul_ms(self, flops: float, traffic: float) -> float:
        if self._fit is not None:
            overhead, per_gflop, per_gb = self._fit
            return 1e3 * (overhead + flops / 1e9 * per_gflop + traffic / 1e9 * per_gb)
        return self._roofline_ms(flops, traffic)

    def elementwise_ms(self, elements: float, tensors: int = 3) -> float:
        """Time of one memory-bound elementwise operator touching `tensors` arrays of `elements`."""
        if self._fit is not None:
            overhead, _, per_gb = self._fit
            return 1e3 * (overhead + tensors * elements * self.act_bytes / 1e9 * per_gb)
        return self._roofline_ms(elements, tensors * elements * self.act_bytes)

    # -- per-layer costs -----------------------------------------------------------------------
    def layer_bytes(self, shape: LayerShape, rank: int | None) -> float:
        """Weight bytes of one layer at `rank` (None: dense) at the export precision: the weight
        matrices, their per-column quantization scales (plain: A has `rank` columns, B and a dense
        weight `out`; pivoted: A' `rank` and C `out − rank`), a pivoted layer's int64 output order
        and float `rank` scales and its extra graph nodes, and the bias, which quantization leaves in
        float32."""
        columns, extra = shape.out_features + (rank or 0), 0.0
        if rank is not None and shape.pivoted:
            columns = shape.out_features
            extra = INDEX_BYTES * shape.out_features + self.bpv * rank + PIVOTED_GRAPH_BYTES
        return (self.bpp * shape.params(rank) + self.bpc * columns + extra
                + (self.bpv * shape.out_features if shape.bias else 0))

    def layer_ms(self, shape: LayerShape, rank: int | None) -> float:
        """p50 time of one layer at `rank` (None: dense) at the workload's token count."""
        return self._unscaled_layer_ms(shape, rank) * self.scale

    def _unscaled_layer_ms(self, shape: LayerShape, rank: int | None) -> float:
        key = (shape.out_features, shape.in_features, rank)
        if (key, shape.pivoted) in self._cache:
            return self._cache[key, shape.pivoted]
        value = self._table_ms(key, shape.pivoted and rank is not None) if self.table else None
        if value is None:
            m = self.tokens
            if rank is None:
                value = self.matmul_ms(m, shape.in_features, shape.out_features)
            elif not shape.pivoted:
                value = self.matmul_ms(m, shape.in_features, rank) + self.matmul_ms(m, rank, shape.out_features)
            else:
                # the two MatMuls, the Mul of the r pivot outputs, then Concat, Gather (between two
                # Transposes) each move the m×out outputs once
                value = (self.matmul_ms(m, shape.in_features, rank)
                         + self.matmul_ms(m, rank, shape.out_features - rank) + self.elementwise_ms(m * rank)
                         + 4 * self.elementwise_ms(m * shape.out_features, tensors=2))
            if shape.bias:
                value += self.elementwise_ms(m * shape.out_features)
        self._cache[key, shape.pivoted] = value
        return value

    def _table_ms(self, key: tuple[int, int, int | None], pivoted: bool) -> float | None:
        """Measured time at `key` in the form, linearly interpolated between the measured ranks of
        that shape and form."""
        if (*key, pivoted) in self.table:
            return self.table[(*key, pivoted)][0]
        out_f, in_f, rank = key
        if rank is None:
            return None
        ranks = sorted(r for (o, i, r, p) in self.table if (o, i, p) == (out_f, in_f, pivoted) and r is not None)
        if not ranks:
            return None
        lo = max((r for r in ranks if r <= rank), default=ranks[0])
        hi = min((r for r in ranks if r >= rank), default=ranks[-1])
        t_lo, t_hi = self.table[(out_f, in_f, lo, pivoted)][0], self.table[(out_f, in_f, hi, pivoted)][0]
        if hi == lo:  # outside the measured range: scale the nearest point by the rank
            return t_lo * rank / lo
        return t_lo + (t_hi - t_lo) * (rank - lo) / (hi - lo)

    # -- whole-model quantities ----------------------------------------------------------------
    @cached_property
    def fixed_bytes(self) -> float:
        """Weight bytes outside the targeted layers at the export precision: embedding tables and
        untargeted Linear weights as matrices (quantized with `--quantize`, as the export does),
        norms and biases as vectors."""
        f = self.facts
        targeted = sum(s.params(None) + (s.out_features if s.bias else 0) for s in f.layers)
        vectors = max(f.vector_params - sum(s.out_features for s in f.layers if s.bias), 0)
        matrices = f.total_params - targeted - vectors
        return self.bpp * matrices + self.bpv * vectors + self.bpc * sum(s.out_features for s in f.other_linears)

    @property
    def activation_bytes(self) -> float:
        """Live activations of one forward pass at the workload, plus the KV cache for decoders."""
        f, w = self.facts, self.profile.workload
        seq = w.seq_len(f.family)
        tokens = w.batch * seq
        per_layer = tokens * (3 * f.hidden + f.intermediate) + 2 * w.batch * f.num_heads * seq * seq
        total = per_layer * self.act_bytes
        if f.family.causal:
            total += tokens * f.vocab * self.act_bytes  # prefill logits
            total += 2 * f.num_layers * w.batch * (seq + w.new_tokens) * f.num_kv_heads * f.head_dim * self.act_bytes
        return float(total)

    @property
    def fixed_ms(self) -> float:
        """Time outside the targeted layers: measured, once tied to the dense model with its layer
        share; else estimated from attention, elementwise operators, embeddings and untargeted
        Linear layers (or given), times the anchor's scale."""
        if self._tied_fixed_ms is not None:
            return self._tied_fixed_ms
        return self.scale * self._unscaled_fixed_ms()

    def _unscaled_fixed_ms(self) -> float:
        if self._fixed_ms is not None:
            return self._fixed_ms
        f, w = self.facts, self.profile.workload
        seq = w.seq_len(f.family)
        tokens = w.batch * seq
        # QKᵀ and AV: one batched MatMul each over batch × heads (activations on both sides)
        flops = 2.0 * w.batch * f.num_heads * seq * seq * f.head_dim
        traffic = self.act_bytes * w.batch * f.num_heads * (2 * seq * f.head_dim + seq * seq)
        attention = 2 * self._activation_matmul_ms(flops, traffic)
        softmax = self.elementwise_ms(w.batch * f.num_heads * seq * seq, 2)
        # residual adds, two norms, activation function, reshapes that copy: ~8 passes over hidden
        elementwise = 8 * self.elementwise_ms(tokens * f.hidden) + self.elementwise_ms(tokens * f.intermediate)
        per_layer = attention + softmax + elementwise
        others = sum(self.matmul_ms(tokens, s.in_features, s.out_features) for s in f.other_linears)
        return f.num_layers * per_layer + others + self.elementwise_ms(tokens * f.hidden, 2)

    def quantities(self, layer_bytes: float, layer_ms: float) -> dict[str, float]:
        """Every budgeted quantity from the summed bytes and p50 time of the targeted layers."""
        model_bytes = self.fixed_bytes + layer_bytes
        p50 = self.fixed_ms + layer_ms
        return {"model_bytes": model_bytes,
                "peak_memory": model_bytes + self.activation_bytes + self.profile.runtime.overhead_bytes,
                "latency_p50": p50, "latency_p90": p50 * self.tail}

    def totals(self, ranks: dict[str, int | None]) -> dict[str, float]:
        """Every budgeted quantity at `ranks` (layer name → rank, None or absent: dense)."""
        b = sum(self.layer_bytes(s, ranks.get(s.name)) for s in self.facts.layers)
        t = sum(self.layer_ms(s, ranks.get(s.name)) for s in self.facts.layers)
        return self.quantities(b, t)

    def dense(self) -> dict[str, float]:
        """Every budgeted quantity of the dense model."""
        return self.totals({})

    def with_profile(self, profile: Profile) -> "CostModel":
        """The same model and measurements under a profile with other budgets."""
        return self._copy(profile, self.tail)
