"""The split of a model into adapter blocks and a frozen middle, and uniform layer drop of that middle."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from emulator.errors import EmulatorConfigError


class SplitError(EmulatorConfigError):
    """An invalid split; the message names the offending field."""


def uniform_keep_indices(m: int, k: int) -> list[int]:
    """Indices of the ``k`` kept blocks among ``m`` middle blocks: ``round(i*(m-1)/(k-1))``, ties rounded up.

    The first and last middle blocks are always kept; ``k == m`` keeps all; ``k == 1`` keeps the first.
    """
    if not 1 <= k <= m:
        raise SplitError(f"{{keep}} must be between 1 and the {m} middle blocks, got {k}")
    if k == 1:
        return [0]
    return [math.floor(i * (m - 1) / (k - 1) + 0.5) for i in range(k)]


@dataclass(frozen=True)
class SplitConfig:
    bottom: int = 2
    top: int = 2
    keep: int | None = None  # kept middle blocks; None keeps them all

    def __post_init__(self) -> None:
        if self.bottom < 0:
            raise SplitError(f"{{bottom}} must be >= 0, got {self.bottom}")
        if self.top < 0:
            raise SplitError(f"{{top}} must be >= 0, got {self.top}")
        if self.bottom + self.top < 1:
            raise SplitError("{bottom} plus {top} must be at least 1: the adapter needs a block")
        if self.keep is not None and self.keep < 1:
            raise SplitError(f"{{keep}} must be >= 1, got {self.keep}")

    def plan(self, n_layers: int) -> LayerPlan:
        if self.bottom + self.top >= n_layers:
            raise SplitError(
                f"{{bottom}} {self.bottom} plus {{top}} {self.top} must be less than the model's {n_layers} blocks"
            )
        m = n_layers - self.bottom - self.top
        k = m if self.keep is None else self.keep
        if k > m:
            raise SplitError(f"{{keep}} {k} exceeds the {m} middle blocks of this model")
        kept = [self.bottom + i for i in uniform_keep_indices(m, k)]
        return LayerPlan(
            n_layers=n_layers,
            bottom=list(range(self.bottom)),
            middle=list(range(self.bottom, self.bottom + m)),
            kept_middle=kept,
            top=list(range(n_layers - self.top, n_layers)),
        )


@dataclass(frozen=True)
class LayerEntry:
    emulator_index: int
    full_index: int
    role: str  # "bottom" | "middle" | "top"


@dataclass(frozen=True)
class LayerPlan:
    n_layers: int
    bottom: list[int]
    middle: list[int]
    kept_middle: list[int]
    top: list[int]
    entries: list[LayerEntry] = field(init=False)

    def __post_init__(self) -> None:
        roles = [("bottom", i) for i in self.bottom]
        roles += [("middle", i) for i in self.kept_middle]
        roles += [("top", i) for i in self.top]
        entries = [LayerEntry(j, full, role) for j, (role, full) in enumerate(roles)]
        object.__setattr__(self, "entries", entries)

    @property
    def adapter_blocks(self) -> list[int]:
        return self.bottom + self.top

    @property
    def emulator_sources(self) -> list[int]:
        """Full-model block index of each emulator block, in emulator order."""
        return [entry.full_index for entry in self.entries]

    @property
    def n_emulator_layers(self) -> int:
        return len(self.entries)

    def to_json(self) -> list[dict[str, int | str]]:
        return [
            {"emulator_index": e.emulator_index, "full_index": e.full_index, "role": e.role} for e in self.entries
        ]

    @classmethod
    def from_json(cls, n_layers: int, layer_map: list[dict[str, int | str]]) -> LayerPlan:
        by_role: dict[str, list[int]] = {"bottom": [], "middle": [], "top": []}
        for entry in sorted(layer_map, key=lambda e: int(e["emulator_index"])):
            by_role[str(entry["role"])].append(int(entry["full_index"]))
        bottom, top = by_role["bottom"], by_role["top"]
        middle = list(range(len(bottom), n_layers - len(top)))
        return cls(n_layers, bottom, middle, by_role["middle"], top)
