"""Split a model into adapter + emulator, and plug a tuned adapter back into the full model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from emulator.errors import EmulatorError
from emulator.families import BlockLocation, locate_blocks
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


def _subset_per_layer_fields(config: object, n_layers: int, sources: list[int]) -> None:
    """Config lists with one entry per block (Qwen2's ``layer_types``, say) follow the kept blocks."""
    for name, value in list(vars(config).items()):
        if isinstance(value, list | tuple) and len(value) == n_layers and n_layers != len(sources):
            setattr(config, name, type(value)(value[i] for i in sources))


def build_emulator(full: PreTrainedModel, split: SplitConfig) -> Emulator:
    """An ordinary model of the same class holding the adapter blocks and the kept middle blocks."""
    location = locate_blocks(full)
    plan = split.plan(location.n_layers)
    sources = plan.emulator_sources

    config = copy.deepcopy(full.config)
    _subset_per_layer_fields(config, location.n_layers, sources)
    setattr(config, location.n_layers_field, plan.n_emulator_layers)
    emulator_model: PreTrainedModel = type(full)(config)
    nn.Module.to(emulator_model, dtype=full.dtype)

    full_state = full.state_dict()
    emulator_state: dict[str, torch.Tensor] = {}
    for key in emulator_model.state_dict():
        parsed = _block_index(key, location.prefix)
        source_key = key if parsed is None else f"{location.prefix}.{sources[parsed[0]]}.{parsed[1]}"
        emulator_state[key] = full_state[source_key]
    emulator_model.load_state_dict(emulator_state, strict=True)
    emulator_model.eval()
    return Emulator(emulator_model, plan, location)


def adapter_spec(full: PreTrainedModel, location: BlockLocation, plan: LayerPlan, method: str = "layers",
                 extra_tensors: tuple[str, ...] = ()) -> AdapterSpec:
    """Every parameter of the adapter blocks (plus ``extra_tensors``, such as a task head), full-model names."""
    emulator_index = {entry.full_index: entry.emulator_index for entry in plan.entries}
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
