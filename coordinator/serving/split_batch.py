"""Split batching for ``layers`` adapters: one batch, many adapters, the frozen middle run once.

A layers adapter replaces whole blocks (and maybe a head). Each module that owns a replaced parameter (a Linear, a
norm, an embedding) is wrapped in a :class:`RoutedModule`; before a forward pass the engine tells the
:class:`RowRouter` which rows belong to which adapter, and each routed module runs once per adapter group on that
group's rows, with that adapter's tensors (``torch.func.functional_call``: no module copies). Everything without
parameters (attention's softmax, RoPE, the KV cache) and every module no adapter replaces runs once over the
whole batch. These modules act row-wise, so the result equals running each adapter's plugged model alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from emulator.errors import EmulatorError

BASE = "__base__"  # rows of the base model (or of a LoRA adapter, which peft applies on top)


class SplitBatchError(EmulatorError):
    """An adapter's tensor has no module to route it to, or does not fit it."""


class RowRouter:
    """Which rows of the current batch go to which adapter: ``[(adapter_id, row indices)]``.

    peft's modules_to_save wrapper runs its original module on the sub-batch of ``__base__`` rows only, so the
    router also keeps the groups renumbered within that sub-batch (``base_rows``: those rows, in order).
    """

    def __init__(self) -> None:
        self.groups: list[tuple[str, torch.Tensor]] | None = None
        self.sub_groups: list[tuple[str, torch.Tensor]] | None = None
        self.batch = self.sub_batch = 0

    @staticmethod
    def _group(row_adapters: list[str], rows: list[int]) -> list[tuple[str, torch.Tensor]]:
        order: dict[str, list[int]] = {}
        for position, row in enumerate(rows):
            order.setdefault(row_adapters[row], []).append(position)
        return [(adapter, torch.tensor(members, dtype=torch.long)) for adapter, members in order.items()]

    @contextmanager
    def route(self, row_adapters: list[str], base_rows: list[int] | None = None) -> Iterator[None]:
        self.batch = len(row_adapters)
        self.groups = self._group(row_adapters, list(range(self.batch)))
        if base_rows is not None:
            self.sub_batch, self.sub_groups = len(base_rows), self._group(row_adapters, base_rows)
        try:
            yield
        finally:
            self.groups = self.sub_groups = None
            self.batch = self.sub_batch = 0

    def groups_for(self, rows: int) -> list[tuple[str, torch.Tensor]] | None:
        if self.groups is not None and rows == self.batch:
            return self.groups
        if self.sub_groups is not None and rows == self.sub_batch:
            return self.sub_groups
        if self.groups is not None:
            raise SplitBatchError(f"a routed module got {rows} rows in a batch of {self.batch}")
        return None


class RoutedModule(nn.Module):
    """A module whose own parameters differ per adapter; rows run with their adapter's values."""

    def __init__(self, base: nn.Module, router: RowRouter) -> None:
        super().__init__()
        self.base = base
        self.router = router
        self.variants: dict[str, dict[str, torch.Tensor]] = {}  # adapter id -> this module's parameters

    def _run(self, adapter: str, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        params = self.variants.get(adapter)
        if params is None:
            return self.base(*args, **kwargs)  # type: ignore[no-any-return]
        return functional_call(self.base, params, args, kwargs)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        groups = self.router.groups_for(x.shape[0])
        if not groups:
            return self._run(BASE, x, *args, **kwargs)
        if len(groups) == 1:
            return self._run(groups[0][0], x, *args, **kwargs)
        out: torch.Tensor | None = None
        for adapter, rows in groups:  # x: (batch, ...) -> each group's rows: (rows, ...)
            part = self._run(adapter, x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        assert out is not None
        return out


class RoutingHook:
    """The same routing as a forward hook, for a module that must stay what it is: peft's modules_to_save wrapper
    accepts only plain Linear/Embedding/Conv modules as its original module. The base output is computed for every
    row, then each adapter group's rows are recomputed with its tensors."""

    def __init__(self, base: nn.Module, router: RowRouter) -> None:
        self.base, self.router = base, router
        self.variants: dict[str, dict[str, torch.Tensor]] = {}
        self._inside = False
        self.handle = base.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, object],
                 output: torch.Tensor) -> torch.Tensor:
        groups = self.router.groups_for(args[0].shape[0]) if args else None
        if self._inside or not groups:
            return output
        self._inside = True
        try:
            for adapter, rows in groups:
                if adapter in self.variants:
                    output[rows] = functional_call(self.base, self.variants[adapter], (args[0][rows], *args[1:]),
                                                   kwargs)
        finally:
            self._inside = False
        return output


class SplitBatcher:
    """Installs routed modules on a model and adds or removes layers adapters (tensors keyed by full names)."""

    def __init__(self, model: nn.Module, router: RowRouter) -> None:
        self.model = model
        self.router = router
        self.routed: dict[str, RoutedModule | RoutingHook] = {}  # routed module's path -> its router
        self.aliases: dict[str, str] = {}  # a tensor's module path -> the routed path (inside peft's wrappers)

    def _owner(self, name: str) -> tuple[str, str]:
        path, _, leaf = name.rpartition(".")
        return path, leaf

    def _routed(self, path: str) -> RoutedModule | RoutingHook:
        """The routed wrapper of the module at ``path`` (made on first use). Inside a peft LoRA layer the base
        layer is routed (peft adds the LoRA term); inside peft's modules_to_save wrapper the original module (the
        one peft's ``__base__`` rows run)."""
        if path in self.aliases:
            return self.routed[self.aliases[path]]
        try:
            module = self.model.get_submodule(path)
        except AttributeError as error:
            raise SplitBatchError(f"tensor's module {path!r} is not in the base model") from error
        target = path
        for inner_name in ("base_layer", "original_module"):
            inner = getattr(module, inner_name, None)
            if isinstance(inner, nn.Module):
                target, module = f"{path}.{inner_name}", inner
                break
        if isinstance(module, RoutedModule):
            self.aliases[path] = target
            return module
        router: RoutedModule | RoutingHook
        if target.endswith(".original_module"):
            router = RoutingHook(module, self.router)
        else:
            parent_path, _, child = target.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            router = RoutedModule(module, self.router)
            setattr(parent, child, router)
        self.routed[target] = router
        self.aliases[path] = target
        return router

    def add(self, adapter_id: str, tensors: dict[str, torch.Tensor]) -> None:
        staged: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            path, leaf = self._owner(name)
            wrapper = self._routed(path)
            own = dict(wrapper.base.named_parameters(recurse=False))
            if leaf not in own:
                raise SplitBatchError(f"{name}: {path} has no parameter {leaf!r}")
            if tuple(own[leaf].shape) != tuple(value.shape):
                raise SplitBatchError(f"{name}: shape {tuple(value.shape)}, the base has {tuple(own[leaf].shape)}")
            staged.setdefault(path, {})[leaf] = value.to(own[leaf].dtype).to(own[leaf].device)
        for path, params in staged.items():
            wrapper = self.routed[self.aliases[path]]
            base_params = dict(wrapper.base.named_parameters(recurse=False))
            wrapper.variants[adapter_id] = {**{k: v.detach() for k, v in base_params.items()}, **params}

    def remove(self, adapter_id: str) -> None:
        for wrapper in self.routed.values():
            wrapper.variants.pop(adapter_id, None)

    def unwrap_all(self) -> None:
        """Put the original modules back (peft must see plain Linears when it injects a LoRA adapter)."""
        for path, wrapper in self.routed.items():
            if isinstance(wrapper, RoutingHook):
                wrapper.handle.remove()
                continue
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, wrapper.base)

    def rewrap_all(self) -> None:
        """After peft injected LoRA layers: wrap each routed module again, at its new place when peft moved it."""
        old, aliases = self.routed, self.aliases
        self.routed, self.aliases = {}, {}
        for path, target in aliases.items():
            self._routed(path).variants = old[target].variants
