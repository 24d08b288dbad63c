"""Budgets on a device: the cost model for a profile (measured on the host) and the measure-and-replan loop."""

from __future__ import annotations

from edgesvd.costmodel import CostModel, ModelFacts
from edgesvd.profiles import Profile


def is_local(profile: Profile) -> bool:
    """True when the profile's device is this machine, so its latency can be measured here."""
    return profile.device.measure


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
