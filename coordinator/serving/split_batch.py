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
    """Which rows of the current batch go to which adapter: ``[(adapter_id, row indices)]``."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, torch.Tensor]] | None = None

    @contextmanager
    def route(self, row_adapters: list[str]) -> Iterator[None]:
        order: dict[str, list[int]] = {}
        for row, adapter in enumerate(row_adapters):
            order.setdefault(adapter, []).append(row)
        self.groups = [(adapter, torch.tensor(rows, dtype=torch.long)) for adapter, rows in order.items()]
        try:
            yield
        finally:
            self.groups = None


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
        groups = self.router.groups
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


class SplitBatcher:
    """Installs routed modules on a model and adds or removes layers adapters (tensors keyed by full names)."""

    def __init__(self, model: nn.Module, router: RowRouter) -> None:
        self.model = model
        self.router = router
        self.routed: dict[str, RoutedModule] = {}  # module path -> its routed wrapper

    def _owner(self, name: str) -> tuple[str, str]:
        path, _, leaf = name.rpartition(".")
        return path, leaf

    def _routed(self, path: str) -> RoutedModule:
        if path in self.routed:
            return self.routed[path]
        try:
            module = self.model.get_submodule(path)
        except AttributeError as error:
            raise SplitBatchError(f"tensor's module {path!r} is not in the base model") from error
        if hasattr(module, "base_layer"):  # a peft LoRA layer: route its base weights, peft adds the LoRA term
            inner = module.base_layer
            assert isinstance(inner, nn.Module)
            path, module = f"{path}.base_layer", inner
            if path in self.routed:
                return self.routed[path]
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        wrapper = RoutedModule(module, self.router)
        setattr(parent, child, wrapper)
        self.routed[path] = wrapper
        return wrapper

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
            wrapper = self.routed[path] if path in self.routed else self.routed[f"{path}.base_layer"]
            base_params = dict(wrapper.base.named_parameters(recurse=False))
            wrapper.variants[adapter_id] = {**{k: v.detach() for k, v in base_params.items()}, **params}

    def remove(self, adapter_id: str) -> None:
        for wrapper in self.routed.values():
            wrapper.variants.pop(adapter_id, None)

    def unwrap_all(self) -> None:
        """Put the original modules back (peft must see plain Linears when it injects a LoRA adapter)."""
        for path, wrapper in self.routed.items():
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            setattr(parent, child, wrapper.base)

    def rewrap_all(self) -> None:
        """After peft injected LoRA layers: wrap each routed module again, at its new place when peft moved it."""
        old = self.routed
        self.routed = {}
        for path, wrapper in old.items():
            module_path = path.removesuffix(".base_layer")
            new = self._routed(module_path)
            new.variants = wrapper.variants
