"""FedAvg of adapter deltas: weighted by examples, in a deterministic order, accumulated in fp32."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from emulator.errors import EmulatorError


class AggregationError(EmulatorError):
    """Deltas that cannot be averaged together."""


@dataclass(frozen=True)
class WeightedDelta:
    owner_id: str
    num_examples: int
    tensors: Mapping[str, torch.Tensor]


def fedavg(global_adapter: Mapping[str, torch.Tensor], deltas: Sequence[WeightedDelta]) -> dict[str, torch.Tensor]:
    """``global + sum_i (n_i / N) * delta_i``; owners are summed in sorted order so the result is reproducible."""
    if not deltas:
        raise AggregationError("no deltas to aggregate")
    ordered = sorted(deltas, key=lambda d: d.owner_id)
    total = sum(d.num_examples for d in ordered)
    if total <= 0 or any(d.num_examples <= 0 for d in ordered):
        raise AggregationError("every delta needs a positive number of examples")
    names = set(global_adapter)
    for delta in ordered:
        if set(delta.tensors) != names:
            raise AggregationError(f"delta from {delta.owner_id} does not match the adapter's tensors")
    result: dict[str, torch.Tensor] = {}
    for name, value in global_adapter.items():
        accumulated = torch.zeros(value.shape, dtype=torch.float32)  # same shape as the tensor, fp32
        for delta in ordered:
            accumulated += delta.tensors[name].to(torch.float32) * (delta.num_examples / total)
        result[name] = (value.to(torch.float32) + accumulated).to(value.dtype)
    return result


def delta_of(tuned: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a data owner sends: its tuned adapter minus the global adapter it started from, in fp32."""
    return {name: (tuned[name].to(torch.float32) - start[name].to(torch.float32)).contiguous() for name in start}
