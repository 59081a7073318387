"""Split a model into adapter + emulator, and plug a tuned adapter back into the full model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from emulator.errors import EmulatorError
from emulator.families import BlockLocation, block_list, locate_blocks
from emulator.split import LayerPlan, SplitConfig
from protos.adapter_spec import AdapterSpec, TensorSpec
from protos.tensors import SAFETENSORS_DTYPES, AdapterMismatchError, check_adapter_tensors


class PlugInError(EmulatorError):
    """An adapter does not fit the full model."""


@dataclass(frozen=True)
class Emulator:
    model: PreTrainedModel
    plan: LayerPlan
    location: BlockLocation  # of the full model; the emulator's block list has the same prefix


def _block_index(key: str, prefix: str) -> tuple[int, str] | None:
    """``"transformer.h.3.attn.c_attn.weight"`` -> ``(3, "attn.c_attn.weight")``; None for non-block keys."""
    if not key.startswith(prefix + "."):
        return None
    index, _, rest = key[len(prefix) + 1 :].partition(".")
    return int(index), rest


def _subset_per_layer_fields(config: object, n_layers: int, picks: list[int]) -> None:
    """Config lists with one entry per block (Qwen2's ``layer_types``, say) follow the picked blocks."""
    for name, value in list(vars(config).items()):
        if isinstance(value, list | tuple) and len(value) == n_layers:
            setattr(config, name, type(value)(value[i] for i in picks))


def select_blocks(model: PreTrainedModel, location: BlockLocation, picks: list[int]) -> PreTrainedModel:
    """A new model of ``model``'s class whose block ``j`` is a copy of ``model``'s block ``picks[j]`` (repeats
    allowed: each slot gets its own copy); everything outside the blocks is copied as is. ``model`` is untouched."""
    blocks = len(block_list(model, location))
    config = copy.deepcopy(model.config)
    _subset_per_layer_fields(config, blocks, picks)
    setattr(config, location.n_layers_field, len(picks))
    new: PreTrainedModel = type(model)(config)
    nn.Module.to(new, dtype=model.dtype)

    state = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for key in new.state_dict():
        parsed = _block_index(key, location.prefix)
        new_state[key] = state[key if parsed is None else f"{location.prefix}.{picks[parsed[0]]}.{parsed[1]}"]
    new.load_state_dict(new_state, strict=True)
    return new.eval()


def emulator_from_plan(full: PreTrainedModel, plan: LayerPlan, location: BlockLocation | None = None) -> Emulator:
    """The emulator ``plan`` describes, its blocks copied from ``full`` (shared slots as separate copies)."""
    location = location or locate_blocks(full)
    return Emulator(select_blocks(full, location, plan.emulator_sources), plan, location)


def build_emulator(full: PreTrainedModel, split: SplitConfig) -> Emulator:
    """An ordinary model of the same class holding the adapter blocks and the kept middle blocks."""
    location = locate_blocks(full)
    return emulator_from_plan(full, split.plan(location.n_layers), location)


def tie_shared_slots(emulator: Emulator) -> int:
    """Make the slots that hold one source (CRaSh sharing) share its parameters, in place: one copy in memory.

    Parameters are tied, not modules: each slot keeps its own module (so LLaMA's ``self_attn.layer_idx`` stays
    right for KV caches). A bundle stores materialised copies (safetensors refuses undeclared shared tensors);
    a loader calls this to get the memory back. Training the tied slots is not supported: they are frozen middle.
    Returns the number of parameters tied.
    """
    blocks = block_list(emulator.model, emulator.location)
    tied = 0
    for slots in emulator.plan.shared.values():
        first = blocks[slots[0]]
        for slot in slots[1:]:
            for name, param in first.named_parameters():
                owner, _, leaf = name.rpartition(".")
                target = blocks[slot].get_submodule(owner) if owner else blocks[slot]
                if not torch.equal(getattr(target, leaf), param):
                    raise EmulatorError(f"slot {slot} does not hold the same weights as slot {slots[0]}")
                setattr(target, leaf, param)
                tied += 1
    return tied


def adapter_spec(full: PreTrainedModel, location: BlockLocation, plan: LayerPlan, method: str = "layers",
                 extra_tensors: tuple[str, ...] = ()) -> AdapterSpec:
    """Every parameter of the adapter blocks (plus ``extra_tensors``, such as a task head), full-model names."""
    emulator_index = {e.full_index: e.emulator_index for e in plan.entries if e.role != "middle"}
    adapter_blocks = set(plan.adapter_blocks)
    tensors = []
    for key, value in full.state_dict().items():
        parsed = _block_index(key, location.prefix)
        if parsed is not None and parsed[0] in adapter_blocks:
            emulator_key = f"{location.prefix}.{emulator_index[parsed[0]]}.{parsed[1]}"
        elif key in extra_tensors:
            emulator_key = key
        else:
            continue
        role = "head" if key in extra_tensors else "block"
        tensors.append(TensorSpec(key, emulator_key, tuple(value.shape), SAFETENSORS_DTYPES[value.dtype], role))
    return AdapterSpec(method=method, tensors=tuple(tensors))


def extract_adapter(model: PreTrainedModel, spec: AdapterSpec, *, from_emulator: bool) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by full-model names, copied out of a full model or an emulator."""
    state = model.state_dict()
    return {
        t.name: state[t.emulator_name if from_emulator else t.name].detach().clone().contiguous()
        for t in spec.tensors
    }


def check_adapter(spec: AdapterSpec, adapter: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`PlugInError` unless ``adapter`` has exactly the spec's names, shapes and dtypes."""
    try:
        check_adapter_tensors(spec, adapter)
    except AdapterMismatchError as error:
        raise PlugInError(str(error)) from error


@torch.no_grad()
def load_adapter_into(model: PreTrainedModel, spec: AdapterSpec, adapter: Mapping[str, torch.Tensor], *,
                      into_emulator: bool) -> None:
    """Copy ``adapter`` (full-model names) into a full model or an emulator, in place."""
    check_adapter(spec, adapter)
    state = model.state_dict()
    for tensor_spec in spec.tensors:
        target = state[tensor_spec.emulator_name if into_emulator else tensor_spec.name]
        target.copy_(adapter[tensor_spec.name])


def plug_adapter(full: PreTrainedModel, spec: AdapterSpec, adapter: Mapping[str, torch.Tensor]) -> None:
    """Write tuned adapter weights into the private full model; the middle blocks stay untouched."""
    load_adapter_into(full, spec, adapter, into_emulator=False)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
