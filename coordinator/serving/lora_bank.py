"""Batched multi-adapter LoRA: every row of a batch gets its own adapter's LoRA term, in one pass per module.

For each module a loaded adapter targets, the bank keeps all loaded adapters' factors stacked, slot 0 all zeros
(rows of the base or of a layers adapter): A ``(slots, r, in)``, B ``(slots, out, r)`` and a scale per slot. A
forward hook on the module adds ``scale[s] * B[s] @ A[s] @ x`` for each row's slot ``s`` with two batched matmuls
over the gathered factors (Punica's and S-LoRA's BGMV, written in torch), so the work does not grow with the number
of adapters in a batch, where peft's mixed batch loops over them. Ranks that differ are zero-padded to the largest,
which changes no result.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.serving.adapters import AdapterRefusedError
from coordinator.serving.split_batch import RoutedModule
from coordinator.serving.tensors import zero_pad

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraFactors:
    """A LoRA adapter as served: per-module rank and scale, its factors, and the head tensors it replaces."""

    modules: list[str]
    ranks: dict[str, int]
    scales: dict[str, float]
    factors: dict[str, torch.Tensor]  # <module>.lora_A.weight (r, in) / .lora_B.weight (out, r)
    heads: dict[str, torch.Tensor]


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora(adapter_id: str, directory: Path, tensors: Mapping[str, torch.Tensor]) -> LoraFactors:
    """A peft LoRA export's factors, ranks and scales (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA)."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterRefusedError(f"adapter {adapter_id!r}: no readable adapter_config.json") from error
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterRefusedError(f"adapter {adapter_id!r}: adapter_config.json is not a LoRA config")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise AdapterRefusedError(f"adapter {adapter_id!r}: {flag} adapters cannot be served")
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))  # peft's defaults
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = sorted(name.removesuffix(LORA_A) for name in tensors if name.endswith(LORA_A))
    factors = {name: t for name, t in tensors.items() if name.endswith((LORA_A, LORA_B))}
    heads = {name: t for name, t in tensors.items() if name not in factors}
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    for module in modules:
        a, b = factors[module + LORA_A], factors.get(module + LORA_B)
        if b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise AdapterRefusedError(f"adapter {adapter_id!r}: LoRA factors of {module!r} do not pair up")
        rank = int(_pattern_value(rank_pattern, module, r))
        if rank != a.shape[0]:
            raise AdapterRefusedError(f"adapter {adapter_id!r}: {module!r} has rank {a.shape[0]}, its config "
                                      f"says {rank}")
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        ranks[module] = rank
        scales[module] = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    stray = sorted(name for name in factors if name.removesuffix(LORA_B).removesuffix(LORA_A) not in ranks)
    if stray:
        raise AdapterRefusedError(f"adapter {adapter_id!r}: LoRA tensors without a pair: {stray}")
    return LoraFactors(modules, ranks, scales, factors, heads)


@dataclass
class _Stack:
    a: torch.Tensor  # (slots, r, in)
    b: torch.Tensor  # (slots, out, r)
    scale: torch.Tensor  # (slots,)


class LoraBank:
    """The loaded LoRA adapters of one model, applied per row by forward hooks on the targeted modules. Only the
    stacks hold the factors: adding an adapter appends a slot, removing one drops its slot from every stack."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots: dict[str, int] = {}  # adapter id -> its slot (1-based; 0 is no LoRA)
        self.targets: dict[str, set[str]] = {}  # adapter id -> the modules it targets
        self.stacks: dict[str, _Stack] = {}  # module path -> factors of every slot
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._index: torch.Tensor | None = None  # (batch,) each row's slot, during a routed forward
        self._single: int | None = None  # the slot every row shares, if they do

    def add(self, adapter_id: str, lora: LoraFactors) -> None:
        """Check the factors against the base's modules, then append the adapter's slot to every stack."""
        for module in lora.modules:
            try:
                target = self.model.get_submodule(module)
            except AttributeError as error:
                raise AdapterRefusedError(f"adapter {adapter_id!r}: module {module!r} is not in the base") from error
            shape = _io_shape(target.base if isinstance(target, RoutedModule) else target)
            a, b = lora.factors[module + LORA_A], lora.factors[module + LORA_B]
            if shape is not None and (a.shape[1], b.shape[0]) != shape:
                raise AdapterRefusedError(f"adapter {adapter_id!r}: LoRA factors of {module!r} map "
                                          f"{a.shape[1]}->{b.shape[0]}, the module {shape[0]}->{shape[1]}")
        self.remove(adapter_id)
        slot = len(self.slots) + 1
        for module in lora.modules:
            a, b = lora.factors[module + LORA_A].float(), lora.factors[module + LORA_B].float()
            stack = self.stacks.get(module) or _Stack(a.new_zeros((slot, 0, a.shape[1])),
                                                      b.new_zeros((slot, b.shape[0], 0)), torch.zeros(slot))
            rank = max(stack.a.shape[1], a.shape[0])
            a_new, b_new = a.new_zeros((1, rank, a.shape[1])), b.new_zeros((1, b.shape[0], rank))
            a_new[0, :a.shape[0]], b_new[0, :, :a.shape[0]] = a, b
            self.stacks[module] = _Stack(torch.cat([zero_pad(stack.a, rank, 1, left=False), a_new]),
                                         torch.cat([zero_pad(stack.b, rank, 2, left=False), b_new]),
                                         torch.cat([stack.scale, torch.tensor([lora.scales[module]])]))
        for module, stack in self.stacks.items():  # modules this adapter leaves alone: a zero slot
            if module not in lora.modules:
                self.stacks[module] = _Stack(torch.cat([stack.a, stack.a[:1] * 0]),
                                             torch.cat([stack.b, stack.b[:1] * 0]), torch.cat([stack.scale,
                                                                                               stack.scale[:1] * 0]))
        self.slots[adapter_id], self.targets[adapter_id] = slot, set(lora.modules)
        self.rehook()

    def remove(self, adapter_id: str) -> None:
        if adapter_id not in self.slots:
            return
        del self.slots[adapter_id], self.targets[adapter_id]
        keep = torch.tensor([0, *sorted(self.slots.values())])
        order = sorted(self.slots, key=lambda i: self.slots[i])
        self.slots = {adapter: position for position, adapter in enumerate(order, start=1)}
        used = set().union(*self.targets.values()) if self.targets else set()
        self.stacks = {module: _Stack(s.a[keep], s.b[keep], s.scale[keep])
                       for module, s in self.stacks.items() if module in used}
        self.rehook()

    def rehook(self) -> None:
        """Hook the module now at each stacked path: a routed wrapper, once a layers adapter replaced that module
        (its output covers the whole batch, where the module inside it sees one group's rows)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = [self.model.get_submodule(module).register_forward_hook(self._hook(module))
                       for module in self.stacks]

    @contextmanager
    def route(self, row_adapters: list[str]) -> Iterator[None]:
        """Within the block, row ``i`` gets the LoRA term of ``row_adapters[i]`` (none for other adapters)."""
        slots = [self.slots.get(adapter, 0) for adapter in row_adapters]
        self._index = torch.tensor(slots, dtype=torch.long)
        self._single = slots[0] if len(set(slots)) == 1 else None
        try:
            yield
        finally:
            self._index = self._single = None

    def _hook(self, module: str) -> Any:
        def add_lora(_: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            index, single, stack = self._index, self._single, self.stacks[module]
            if index is None or single == 0:
                return output
            x = args[0]
            if x.shape[0] != index.shape[0]:
                raise AdapterRefusedError(f"LoRA module {module!r} got {x.shape[0]} rows in a batch of "
                                          f"{index.shape[0]}")
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # (batch, tokens, in)
            if single is not None:  # one adapter for every row: plain matmuls
                delta = flat @ stack.a[single].t() @ stack.b[single].t() * stack.scale[single]
            else:  # gather each row's factors: (batch, r, in) and (batch, out, r)
                a, b = stack.a[index], stack.b[index]
                delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))  # (batch, tokens, out)
                delta = delta * stack.scale[index].view(-1, 1, 1)
            return output + delta.reshape(output.shape).to(output.dtype)

        return add_lora


def _io_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear or a GPT-2 Conv1D (weight stored (in, out)); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[0]), int(weight.shape[1])
    return None
