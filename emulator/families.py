"""Where each model family keeps its transformer blocks, registered in one place.

A family is found by ``config.model_type``. A model of an unregistered family still works when its block list can
be found by structure: the longest ``nn.ModuleList`` of identical blocks, whose length a config field holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from emulator.errors import EmulatorError

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class UnsupportedModelError(EmulatorError):
    """The model's transformer blocks cannot be located."""


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    blocks_path: str  # dotted path of the block ModuleList, relative to ``model.base_model``
    n_layers_field: str  # the config field holding the block count


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register_family(ModelFamily("gpt2", ("gpt2",), "h", "n_layer"))
register_family(ModelFamily("opt", ("opt",), "decoder.layers", "num_hidden_layers"))
register_family(
    ModelFamily("llama", ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "phi3"), "layers",
                "num_hidden_layers")
)
register_family(ModelFamily("bloom", ("bloom",), "h", "n_layer"))
register_family(ModelFamily("gpt_neox", ("gpt_neox",), "layers", "num_hidden_layers"))
register_family(ModelFamily("bert", ("bert", "roberta", "xlm-roberta", "electra"), "encoder.layer",
                            "num_hidden_layers"))


def supported_families() -> list[str]:
    return sorted({family.name for family in FAMILIES.values()})


@dataclass(frozen=True)
class BlockLocation:
    family: str  # a registered family name, or "structural"
    prefix: str  # state-dict prefix of the block list in the root model, e.g. "transformer.h"
    n_layers_field: str
    n_layers: int


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise UnsupportedModelError("block list is not a submodule of the model")


def _registered_location(model: PreTrainedModel, family: ModelFamily) -> BlockLocation:
    blocks: nn.Module = model.base_model
    for part in family.blocks_path.split("."):
        blocks = getattr(blocks, part)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedModelError(f"{family.name}: {family.blocks_path} is not an nn.ModuleList")
    return BlockLocation(family.name, _module_name(model, blocks), family.n_layers_field, len(blocks))


def _structural_location(model: PreTrainedModel) -> BlockLocation:
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) >= 2
        and len({type(child) for child in module}) == 1
    ]
    if candidates:
        name, blocks = max(candidates, key=lambda item: len(item[1]))
        for field in LAYER_COUNT_FIELDS:
            if getattr(model.config, field, None) == len(blocks):
                return BlockLocation("structural", name, field, len(blocks))
    raise UnsupportedModelError(
        f"cannot locate the transformer blocks of model_type {model.config.model_type!r}; "
        f"supported families: {', '.join(supported_families())}"
    )


def locate_blocks(model: PreTrainedModel) -> BlockLocation:
    family = FAMILIES.get(model.config.model_type)
    if family is not None:
        return _registered_location(model, family)
    return _structural_location(model)


def block_list(model: PreTrainedModel, location: BlockLocation) -> nn.ModuleList:
    module = model.get_submodule(location.prefix)
    assert isinstance(module, nn.ModuleList)
    return module
