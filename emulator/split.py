"""The split of a model into adapter blocks and a frozen middle, and uniform layer drop of that middle.

Two layouts. The original offsite-tuning one puts ``bottom`` adapter blocks first and ``top`` last; its layer map
has roles ``bottom`` / ``middle`` / ``top``. An explicit ``adapter_blocks`` list may spread the adapter through the
model (CRaSh); then every adapter block has role ``adapter`` -- unless the list is just a prefix plus a suffix of the
model, which is the original layout and gets the original roles, so equal splits always give equal layer maps.
Either way the emulator's blocks follow full-model order, and a middle slot may hold a repeated source block
(``stands_for`` then names the full block whose place it takes: CRaSh's layer sharing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from emulator.errors import EmulatorConfigError

ADAPTER_ROLES = ("bottom", "top", "adapter")
ROLES = ("bottom", "middle", "top", "adapter")


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
    """Where the adapter goes, and (``keep``) how many middle blocks uniform layer drop keeps.

    ``adapter_blocks`` (full-model indices, sorted and unique) replaces ``bottom`` / ``top``, which are then ignored
    (not validated either, so their defaults never get in the way). Every other block is middle.
    """

    bottom: int = 2
    top: int = 2
    keep: int | None = None  # kept middle blocks; None keeps them all
    adapter_blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.adapter_blocks is not None:
            blocks = tuple(self.adapter_blocks)
            object.__setattr__(self, "adapter_blocks", blocks)  # a list from a CLI or JSON: keep it hashable
            if not blocks:
                raise SplitError("{adapter_blocks} must name at least one block")
            if list(blocks) != sorted(set(blocks)):
                raise SplitError(f"{{adapter_blocks}} must be sorted and unique, got {list(blocks)}")
            if blocks[0] < 0:
                raise SplitError(f"{{adapter_blocks}} must be >= 0, got {blocks[0]}")
        else:
            if self.bottom < 0:
                raise SplitError(f"{{bottom}} must be >= 0, got {self.bottom}")
            if self.top < 0:
                raise SplitError(f"{{top}} must be >= 0, got {self.top}")
            if self.bottom + self.top < 1:
                raise SplitError("{bottom} plus {top} must be at least 1: the adapter needs a block")
        if self.keep is not None and self.keep < 1:
            raise SplitError(f"{{keep}} must be >= 1, got {self.keep}")

    def adapter_indices(self, n_layers: int) -> list[int]:
        """The adapter's full-model block indices, checked against a model of ``n_layers`` blocks."""
        if self.adapter_blocks is None:
            if self.bottom + self.top >= n_layers:
                raise SplitError(f"{{bottom}} {self.bottom} plus {{top}} {self.top} must be less than the model's "
                                 f"{n_layers} blocks")
            return list(range(self.bottom)) + list(range(n_layers - self.top, n_layers))
        blocks = list(self.adapter_blocks)
        if blocks[-1] >= n_layers:
            raise SplitError(f"{{adapter_blocks}} {blocks[-1]} is out of range: the model has {n_layers} blocks")
        if len(blocks) >= n_layers:
            raise SplitError(f"{{adapter_blocks}} names all {n_layers} blocks: the emulator needs a middle")
        return blocks

    def plan(self, n_layers: int) -> LayerPlan:
        adapters = self.adapter_indices(n_layers)
        middle = [i for i in range(n_layers) if i not in set(adapters)]
        k = len(middle) if self.keep is None else self.keep
        if k > len(middle):
            raise SplitError(f"{{keep}} {k} exceeds the {len(middle)} middle blocks of this model")
        kept = [middle[i] for i in uniform_keep_indices(len(middle), k)]
        return LayerPlan.build(n_layers, adapters, [(i, i) for i in kept])


@dataclass(frozen=True)
class LayerEntry:
    emulator_index: int
    full_index: int  # the full-model block whose weights this slot holds
    role: str  # "bottom" | "middle" | "top" | "adapter"
    stands_for: int | None = None  # the full block whose place it takes, when that differs (a shared slot)

    @property
    def position(self) -> int:
        return self.full_index if self.stands_for is None else self.stands_for


def _adapter_roles(n_layers: int, adapters: list[int]) -> dict[int, str]:
    """bottom / top for a prefix + suffix of the model (the original layout), else ``adapter`` for every block."""
    bottom = next((i for i, a in enumerate(adapters) if a != i), len(adapters))  # length of the 0.. prefix
    top_blocks = adapters[bottom:]
    if top_blocks == list(range(n_layers - len(top_blocks), n_layers)):
        return {a: "bottom" if j < bottom else "top" for j, a in enumerate(adapters)}
    return {a: "adapter" for a in adapters}


@dataclass(frozen=True)
class LayerPlan:
    """The emulator's blocks: which full block each slot holds, its role, and (shared slots) whose place it takes.

    Entries are in full-model order of their positions. The old attributes (``bottom``, ``middle``, ``kept_middle``,
    ``top``) are derived; ``middle_slots`` gives the emulator indices of the middle, whatever the layout.
    """

    n_layers: int
    entries: list[LayerEntry]

    def __post_init__(self) -> None:
        if [e.emulator_index for e in self.entries] != list(range(len(self.entries))):
            raise SplitError("{layer_map} emulator indices must run 0, 1, ... in order")
        for e in self.entries:
            if e.role not in ROLES:
                raise SplitError(f"{{layer_map}} role must be one of {', '.join(ROLES)}, got {e.role!r}")
            if not (0 <= e.full_index < self.n_layers and 0 <= e.position < self.n_layers):
                raise SplitError(f"{{layer_map}} block {e.full_index} is outside the model's {self.n_layers} blocks")
        positions = [e.position for e in self.entries]
        if positions != sorted(positions):
            raise SplitError("{layer_map} entries must follow full-model order")
        adapters = self.adapter_blocks
        if len(set(adapters)) != len(adapters) or set(adapters) & set(self.kept_middle):
            raise SplitError("{layer_map} an adapter block appears twice or also as a middle block")
        if not adapters:
            raise SplitError("{layer_map} has no adapter block")

    @classmethod
    def build(cls, n_layers: int, adapters: list[int], middle: list[tuple[int, int]]) -> LayerPlan:
        """A plan from the adapter blocks and the middle slots as ``(source, stands_for)``, merged in full order."""
        roles = _adapter_roles(n_layers, adapters)
        slots = [(a, a, roles[a]) for a in adapters] + [(pos, src, "middle") for src, pos in middle]
        slots.sort(key=lambda slot: slot[0])  # stable: shared slots keep their order
        return cls(n_layers, [LayerEntry(j, src, role, None if pos == src else pos)
                              for j, (pos, src, role) in enumerate(slots)])

    def with_middle(self, middle: list[tuple[int, int]]) -> LayerPlan:
        """The same adapter with new middle slots ``(source, stands_for)``: what a compressor returns."""
        return LayerPlan.build(self.n_layers, self.adapter_blocks, middle)

    def _full(self, role: str) -> list[int]:
        return [e.full_index for e in self.entries if e.role == role]

    @property
    def bottom(self) -> list[int]:
        return self._full("bottom")

    @property
    def top(self) -> list[int]:
        return self._full("top")

    @property
    def adapter_blocks(self) -> list[int]:
        return sorted(e.full_index for e in self.entries if e.role in ADAPTER_ROLES)

    @property
    def middle(self) -> list[int]:
        """Every full-model block that is not an adapter block: the frozen middle the emulator stands in for."""
        adapters = set(self.adapter_blocks)
        return [i for i in range(self.n_layers) if i not in adapters]

    @property
    def kept_middle(self) -> list[int]:
        """The source block of each middle slot, in emulator order (a shared source repeats)."""
        return self._full("middle")

    @property
    def distinct_middle(self) -> list[int]:
        """The middle blocks whose weights the emulator holds: what a data owner gets to see."""
        return sorted(set(self.kept_middle))

    @property
    def middle_slots(self) -> list[int]:
        """Emulator indices of the middle slots (interleaved with adapter slots when the adapter is spread)."""
        return [e.emulator_index for e in self.entries if e.role == "middle"]

    @property
    def middle_targets(self) -> list[tuple[int, int]]:
        """(emulator, full) hidden-state indices each middle slot's output should match (``hidden_states[i]`` is
        block i's input): a slot stands in for the full blocks up to where the next emulator slot takes over."""
        ends = [e.position for e in self.entries[1:]] + [self.n_layers]
        return [(slot + 1, ends[slot]) for slot in self.middle_slots]

    @property
    def shared(self) -> dict[int, list[int]]:
        """Source full block -> the emulator slots holding copies of it, for sources held more than once."""
        groups: dict[int, list[int]] = {}
        for e in self.entries:
            if e.role == "middle":
                groups.setdefault(e.full_index, []).append(e.emulator_index)
        return {source: slots for source, slots in groups.items() if len(slots) > 1}

    @property
    def is_spread(self) -> bool:
        return any(e.role == "adapter" for e in self.entries)

    @property
    def emulator_sources(self) -> list[int]:
        """Full-model block index of each emulator block, in emulator order."""
        return [entry.full_index for entry in self.entries]

    @property
    def n_emulator_layers(self) -> int:
        return len(self.entries)

    def to_json(self) -> list[dict[str, int | str]]:
        out: list[dict[str, int | str]] = []
        for e in self.entries:
            item: dict[str, int | str] = {"emulator_index": e.emulator_index, "full_index": e.full_index,
                                          "role": e.role}
            if e.stands_for is not None:
                item["stands_for"] = e.stands_for
            out.append(item)
        return out

    @classmethod
    def from_json(cls, n_layers: int, layer_map: list[dict[str, int | str]]) -> LayerPlan:
        """A plan from a manifest's layer map (old or new layout); a map without ``stands_for`` reads as unshared
        slots in place of their sources."""
        entries = [LayerEntry(int(e["emulator_index"]), int(e["full_index"]), str(e["role"]),
                              int(e["stands_for"]) if e.get("stands_for") is not None else None)
                   for e in sorted(layer_map, key=lambda e: int(e["emulator_index"]))]
        return cls(n_layers, entries)

