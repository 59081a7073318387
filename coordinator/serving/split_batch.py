"""Split batching for ``layers`` adapters: one batch, many adapters, the frozen middle run once.

A layers adapter replaces whole blocks (and maybe a head). Each module that owns a replaced parameter (a Linear, a
norm, an embedding) is wrapped in a :class:`RoutedModule`; before a forward pass the engine tells the
:class:`RowRouter` which rows belong to which adapter, and each routed module runs once per adapter group on that
group's rows, with that adapter's tensors (``torch.func.functional_call``: no module copies), and once on all other
rows with the base's. Everything without parameters (attention's softmax, RoPE, the KV cache) and every module no
adapter replaces runs once over the whole batch. These modules act row-wise, so the result equals running each
adapter's plugged model alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from emulator.errors import EmulatorError


class SplitBatchError(EmulatorError):
    """An adapter's tensor has no module to route it to, or does not fit it."""


Partition = tuple[list[tuple[str, torch.Tensor]], torch.Tensor | None]


class RowRouter:
    """Which adapter each row of the current batch belongs to, and, per set of adapters a module has variants
    for, the rows of each of those adapters and the rows left to the base (computed once per batch)."""

    def __init__(self) -> None:
        self.rows: list[str] | None = None
        self._partitions: dict[frozenset[str], Partition] = {}

    @contextmanager
    def route(self, row_adapters: list[str]) -> Iterator[None]:
        self.rows, self._partitions = list(row_adapters), {}
        try:
            yield
        finally:
            self.rows, self._partitions = None, {}

    def partition(self, batch: int, adapters: frozenset[str]) -> Partition | None:
        """``([(adapter, its rows)], the other rows or None when none)`` for a module with variants for
        ``adapters``; None outside a routed batch."""
        if self.rows is None:
            return None
        if batch != len(self.rows):
            raise SplitBatchError(f"a routed module got {batch} rows in a batch of {len(self.rows)}")
        cached = self._partitions.get(adapters)
        if cached is None:
            groups: dict[str, list[int]] = {}
            rest: list[int] = []
            for row, adapter in enumerate(self.rows):
                (groups.setdefault(adapter, []) if adapter in adapters else rest).append(row)
            cached = ([(a, torch.tensor(rows, dtype=torch.long)) for a, rows in groups.items()],
                      torch.tensor(rest, dtype=torch.long) if rest else None)
            self._partitions[adapters] = cached
        return cached


class RoutedModule(nn.Module):
    """A module whose own parameters differ per adapter; rows run with their adapter's values."""

    def __init__(self, base: nn.Module, router: RowRouter) -> None:
        super().__init__()
        self.base = base
        self.router = router
        self.variants: dict[str, dict[str, torch.Tensor]] = {}  # adapter id -> this module's parameters
        self._keys: frozenset[str] = frozenset()

    def set_variant(self, adapter_id: str, params: dict[str, torch.Tensor] | None) -> None:
        if params is None:
            self.variants.pop(adapter_id, None)
        else:
            self.variants[adapter_id] = params
        self._keys = frozenset(self.variants)

    def _run(self, adapter: str, x: torch.Tensor, args: tuple[torch.Tensor, ...],
             kwargs: dict[str, object]) -> torch.Tensor:
        params = self.variants[adapter]
        if type(self.base) is nn.Linear:  # most routed modules: skip functional_call's parameter swapping
            return F.linear(x, params["weight"], params.get("bias"))
        return functional_call(self.base, params, (x, *args), kwargs)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        split = self.router.partition(x.shape[0], self._keys) if self._keys else None
        if split is None or not split[0]:
            return self.base(x, *args, **kwargs)  # type: ignore[no-any-return]
        groups, rest = split
        if rest is None and len(groups) == 1:
            return self._run(groups[0][0], x, args, kwargs)
        parts = [(rows, self._run(adapter, x[rows], args, kwargs))
                 for adapter, rows in groups]  # x: (batch, ...) -> each group's rows: (rows, ...)
        if rest is not None:
            parts.append((rest, self.base(x[rest], *args, **kwargs)))
        out = parts[0][1].new_empty((x.shape[0], *parts[0][1].shape[1:]))
        for rows, part in parts:
            out[rows] = part
        return out


class SplitBatcher:
    """Installs routed modules on a model and adds or removes layers adapters (tensors keyed by full names)."""

    def __init__(self, model: nn.Module, router: RowRouter) -> None:
        self.model = model
        self.router = router
        self.routed: dict[str, RoutedModule] = {}  # module path -> its routed wrapper

    def _routed(self, path: str) -> RoutedModule:
        """The routed wrapper of the module at ``path``, made on first use."""
        if path in self.routed:
            return self.routed[path]
        try:
            module = self.model.get_submodule(path)
        except AttributeError as error:
            raise SplitBatchError(f"tensor's module {path!r} is not in the base model") from error
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapper = RoutedModule(module, self.router)
        setattr(parent, child, wrapper)
        self.routed[path] = wrapper
        return wrapper

    def add(self, adapter_id: str, tensors: dict[str, torch.Tensor]) -> None:
        """Check every tensor against the base before anything changes, then install the adapter's variants."""
        staged: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            path, _, leaf = name.rpartition(".")
            try:
                module = self.routed[path].base if path in self.routed else self.model.get_submodule(path)
            except AttributeError as error:
                raise SplitBatchError(f"{name}: module {path!r} is not in the base model") from error
            own = dict(module.named_parameters(recurse=False))
            if leaf not in own:
                raise SplitBatchError(f"{name}: {path} has no parameter {leaf!r}")
            if tuple(own[leaf].shape) != tuple(value.shape):
                raise SplitBatchError(f"{name}: shape {tuple(value.shape)}, the base has {tuple(own[leaf].shape)}")
            staged.setdefault(path, {})[leaf] = value.to(own[leaf].dtype).to(own[leaf].device)
        for path, params in staged.items():
            wrapper = self._routed(path)
            base_params = dict(wrapper.base.named_parameters(recurse=False))
            wrapper.set_variant(adapter_id, {**{k: v.detach() for k, v in base_params.items()}, **params})

    def remove(self, adapter_id: str) -> None:
        for wrapper in self.routed.values():
            wrapper.set_variant(adapter_id, None)
