"""Aggregating adapter deltas: per-delta L2 clipping, then one registered aggregator, coordinate-wise.

Owners are taken in sorted order and every sum is accumulated in fp32, so the result is reproducible.
``fedavg`` weights each (clipped) delta by its examples; ``trimmed-mean`` and ``median`` ignore the example counts
(an owner's claim cannot buy it weight) and bound, per coordinate, how far one owner can move the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from emulator.errors import EmulatorConfigError, EmulatorError


class AggregationError(EmulatorError):
    """Deltas that cannot be aggregated together."""


class AggregatorConfigError(AggregationError, EmulatorConfigError):
    """An invalid aggregation setting; the message marks the field as ``{field}``."""


@dataclass(frozen=True)
class WeightedDelta:
    owner_id: str
    num_examples: int
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class AggregatorConfig:
    name: str = "fedavg"
    clip_norm: float | None = None  # every delta is scaled to a global L2 norm of at most this; None: no clipping
    trim_fraction: float = 0.2  # trimmed-mean: the share of owners dropped from each end, per coordinate

    def __post_init__(self) -> None:
        if self.name not in AGGREGATORS:
            raise AggregatorConfigError(f"{{aggregator}} must be one of {', '.join(sorted(AGGREGATORS))}, "
                                        f"got {self.name!r}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise AggregatorConfigError(f"{{clip_norm}} must be a finite number > 0, got {self.clip_norm}")
        if not 0.0 < self.trim_fraction < 0.5:
            raise AggregatorConfigError(f"{{trim_fraction}} must be in (0, 0.5), got {self.trim_fraction}")


# An aggregator combines K clipped deltas of one tensor, coordinate-wise:
# (stacked [K, *shape] fp32, weights [K] fp32 = n_i / N, config) -> [*shape] fp32.
Aggregator = Callable[[torch.Tensor, torch.Tensor, AggregatorConfig], torch.Tensor]
AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(name: str, aggregator: Aggregator) -> Aggregator:
    if name in AGGREGATORS:
        raise AggregationError(f"aggregator {name!r} is already registered")
    AGGREGATORS[name] = aggregator
    return aggregator


def trim_count(owners: int, fraction: float) -> int:
    """Owners dropped from each end: ``floor(fraction * owners)``, at least 1 once there are 3 owners.
    ``fraction < 0.5`` keeps at least one owner."""
    return max(math.floor(fraction * owners), 1 if owners >= 3 else 0)


def _weighted_mean(stacked: torch.Tensor, weights: torch.Tensor, config: AggregatorConfig) -> torch.Tensor:
    return torch.tensordot(weights, stacked, dims=1)  # [K] . [K, *shape] -> [*shape]


def _trimmed_mean(stacked: torch.Tensor, weights: torch.Tensor, config: AggregatorConfig) -> torch.Tensor:
    owners = stacked.shape[0]
    k = trim_count(owners, config.trim_fraction)
    ordered = stacked.sort(dim=0).values  # [K, *shape], ascending per coordinate
    return ordered[k:owners - k].mean(dim=0)  # [K - 2k, *shape] -> [*shape]


def _median(stacked: torch.Tensor, weights: torch.Tensor, config: AggregatorConfig) -> torch.Tensor:
    owners = stacked.shape[0]
    ordered = stacked.sort(dim=0).values  # [K, *shape]
    return (ordered[(owners - 1) // 2] + ordered[owners // 2]) / 2  # the middle one, or the mean of the middle two


register_aggregator("fedavg", _weighted_mean)
register_aggregator("trimmed-mean", _trimmed_mean)
register_aggregator("median", _median)


def delta_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The global L2 norm over every tensor of a delta (accumulated in fp64)."""
    return math.sqrt(sum(float(t.to(torch.float64).square().sum()) for t in tensors.values()))


def clip_delta(tensors: Mapping[str, torch.Tensor], clip_norm: float | None) -> dict[str, torch.Tensor]:
    """The delta in fp32, scaled by ``min(1, clip_norm / norm)``: its norm is at most ``clip_norm`` (up to fp32
    rounding). A delta with a non-finite norm is refused."""
    norm = delta_norm(tensors)
    if not math.isfinite(norm):
        raise AggregationError("a delta holds NaN or infinite values")
    scale = 1.0 if clip_norm is None or norm <= clip_norm else clip_norm / norm
    return {name: t.to(torch.float32) * scale for name, t in tensors.items()}


def _checked(global_adapter: Mapping[str, torch.Tensor], deltas: Sequence[WeightedDelta]) -> list[WeightedDelta]:
    if not deltas:
        raise AggregationError("no deltas to aggregate")
    ordered = sorted(deltas, key=lambda d: d.owner_id)
    if len({d.owner_id for d in ordered}) != len(ordered):
        raise AggregationError("more than one delta from the same owner")
    if any(d.num_examples <= 0 for d in ordered):
        raise AggregationError("every delta needs a positive number of examples")
    for delta in ordered:
        if set(delta.tensors) != set(global_adapter) or any(
                delta.tensors[name].shape != value.shape for name, value in global_adapter.items()):
            raise AggregationError(f"delta from {delta.owner_id} does not match the adapter's tensors")
    return ordered


def aggregate(global_adapter: Mapping[str, torch.Tensor], deltas: Sequence[WeightedDelta],
              config: AggregatorConfig | None = None) -> dict[str, torch.Tensor]:
    """``global + aggregator(clipped deltas)``, tensor by tensor, in the global adapter's dtypes."""
    config = config or AggregatorConfig()
    ordered = _checked(global_adapter, deltas)
    clipped = [clip_delta(d.tensors, config.clip_norm) for d in ordered]
    counts = torch.tensor([d.num_examples for d in ordered], dtype=torch.float64)  # [K]
    weights = (counts / counts.sum()).to(torch.float32)  # [K], sums to 1
    combine = AGGREGATORS[config.name]
    result: dict[str, torch.Tensor] = {}
    for name, value in global_adapter.items():
        stacked = torch.stack([delta[name] for delta in clipped])  # [K, *shape], fp32
        result[name] = (value.to(torch.float32) + combine(stacked, weights, config)).to(value.dtype)
    return result


def fedavg(global_adapter: Mapping[str, torch.Tensor], deltas: Sequence[WeightedDelta]) -> dict[str, torch.Tensor]:
    """``global + sum_i (n_i / N) * delta_i``, unclipped."""
    return aggregate(global_adapter, deltas, AggregatorConfig("fedavg"))


def delta_of(tuned: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a data owner sends: its tuned adapter minus the global adapter it started from, in fp32."""
    return {name: (tuned[name].to(torch.float32) - start[name].to(torch.float32)).contiguous() for name in start}
