"""Adapter methods, registered in one place: what trains on the emulator, what travels, how it plugs in.

Every method derives its spec from the bundle's ``layers`` spec (every parameter of the adapter blocks, plus a task
head), which maps full-model names to emulator names; so coordinator and data owner compute the same spec, and the
data owner never needs the full model. LoRA tensors are named ``<full module>.lora_A.weight`` / ``.lora_B.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from emulator.errors import EmulatorConfigError
from emulator.surgery import check_adapter, plug_adapter
from protos.adapter_spec import AdapterSpec, TensorSpec
from protos.round_config import RoundConfig
from protos.tensors import TORCH_DTYPES

PEFT_PREFIX = "base_model.model."


class MethodError(EmulatorConfigError):
    """An adapter method cannot be used as asked; the message names the field or the reason."""


@dataclass(frozen=True)
class MethodConfig:
    name: str = "layers"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise MethodError(f"{{method}} must be one of {', '.join(sorted(METHODS))}, got {self.name!r}")
        if self.lora_r < 1:
            raise MethodError(f"{{lora_r}} must be >= 1, got {self.lora_r}")
        if self.lora_alpha < 1:
            raise MethodError(f"{{lora_alpha}} must be >= 1, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MethodError(f"{{lora_dropout}} must be in [0, 1), got {self.lora_dropout}")

    @classmethod
    def from_round(cls, config: RoundConfig) -> MethodConfig:
        return cls(config.method, lora_r=config.lora_r, lora_alpha=config.lora_alpha)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their plain model name, whether or not peft wraps the model."""
    return {name.removeprefix(PEFT_PREFIX).replace(".default.", "."): p for name, p in model.named_parameters()}


def head_parameters(model: PreTrainedModel) -> tuple[str, ...]:
    """Parameters outside the base model (a classification head, say): the adapter carries them."""
    if model.base_model is model:
        return ()
    prefix = model.base_model_prefix + "."
    return tuple(name for name, _ in model.named_parameters() if not name.startswith(prefix))


def _heads(spec: AdapterSpec) -> tuple[TensorSpec, ...]:
    return tuple(t for t in spec.tensors if t.role == "head")


# --- specs: (layers spec, emulator, config) -> the spec of what trains and travels -----------------------------

def _layers_spec(base: AdapterSpec, emulator: nn.Module, config: MethodConfig) -> AdapterSpec:
    return AdapterSpec(method="layers", tensors=base.tensors)


def _bitfit_spec(base: AdapterSpec, emulator: nn.Module, config: MethodConfig) -> AdapterSpec:
    biases = tuple(t for t in base.tensors if t.role == "block" and t.name.endswith(".bias"))
    if not biases:
        model_type = getattr(getattr(emulator, "config", None), "model_type", "this model's")
        raise MethodError(f"{{method}} bitfit needs bias terms, and {model_type} blocks have none; "
                          "use lora or layers")
    return AdapterSpec(method="bitfit", tensors=biases + _heads(base))


def _lora_spec(base: AdapterSpec, emulator: nn.Module, config: MethodConfig) -> AdapterSpec:
    tensors: list[TensorSpec] = []
    for t in base.tensors:
        if t.role != "block" or not t.emulator_name.endswith(".weight"):
            continue
        module = emulator.get_submodule(t.emulator_name.removesuffix(".weight"))
        if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
            in_features, out_features = module.weight.shape
        elif isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        else:
            continue
        full_module, emulator_module = t.name.removesuffix(".weight"), t.emulator_name.removesuffix(".weight")
        tensors.append(TensorSpec(f"{full_module}.lora_A.weight", f"{emulator_module}.lora_A.weight",
                                  (config.lora_r, int(in_features)), "F32"))
        tensors.append(TensorSpec(f"{full_module}.lora_B.weight", f"{emulator_module}.lora_B.weight",
                                  (int(out_features), config.lora_r), "F32"))
    if not tensors:
        raise MethodError("{method} lora found no Linear layers in the adapter blocks")
    return AdapterSpec(method="lora", tensors=tuple(tensors) + _heads(base))


# --- wrapping: make only the spec's tensors trainable (in place) ----------------------------------------------

def _lora_modules(spec: AdapterSpec, *, emulator: bool) -> list[str]:
    return [(t.emulator_name if emulator else t.name).removesuffix(".lora_A.weight")
            for t in spec.tensors if t.name.endswith(".lora_A.weight")]


def _peft_config(config: MethodConfig, model: nn.Module, modules: list[str]) -> LoraConfig:
    conv1d = any(isinstance(model.get_submodule(m), Conv1D) for m in modules)  # GPT-2 stores weights (in, out)
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="^(" + "|".join(re.escape(m) for m in modules) + ")$", bias="none",
                      fan_in_fan_out=conv1d)


def _freeze_all_but(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    trainable = {t.emulator_name for t in spec.tensors}
    for name, param in model.named_parameters():
        param.requires_grad_(name.removeprefix(PEFT_PREFIX).replace(".default.", ".") in trainable)
    return model


def _wrap_plain(emulator: PreTrainedModel, spec: AdapterSpec, config: MethodConfig) -> nn.Module:
    return _freeze_all_but(emulator, spec)


def _wrap_lora(emulator: PreTrainedModel, spec: AdapterSpec, config: MethodConfig) -> nn.Module:
    modules = _lora_modules(spec, emulator=True)
    model = get_peft_model(emulator, _peft_config(config, emulator, modules))
    return _freeze_all_but(model, spec)


# --- plug-in: write the tuned adapter into the full model --------------------------------------------------

def _plug_plain(full: PreTrainedModel, spec: AdapterSpec, adapter: Mapping[str, torch.Tensor],
                config: MethodConfig) -> PreTrainedModel:
    plug_adapter(full, spec, adapter)
    return full


def _plug_lora(full: PreTrainedModel, spec: AdapterSpec, adapter: Mapping[str, torch.Tensor],
               config: MethodConfig) -> PreTrainedModel:
    """Merge ``W += B @ A * alpha / r`` into each adapter-block Linear of the full model, and copy the head."""
    check_adapter(spec, adapter)
    modules = _lora_modules(spec, emulator=False)
    wrapped = get_peft_model(full, _peft_config(config, full, modules))
    named = _named_tensors(wrapped)
    with torch.no_grad():
        for t in spec.tensors:
            named[t.name].copy_(adapter[t.name])
    merged = wrapped.merge_and_unload()
    assert isinstance(merged, PreTrainedModel)
    return merged


@dataclass(frozen=True)
class AdapterMethod:
    name: str
    make_spec: Callable[[AdapterSpec, nn.Module, MethodConfig], AdapterSpec]
    wrap: Callable[[PreTrainedModel, AdapterSpec, MethodConfig], nn.Module]
    plug: Callable[[PreTrainedModel, AdapterSpec, Mapping[str, torch.Tensor], MethodConfig], PreTrainedModel]


METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    METHODS[method.name] = method
    return method


register_method(AdapterMethod("layers", _layers_spec, _wrap_plain, _plug_plain))
register_method(AdapterMethod("bitfit", _bitfit_spec, _wrap_plain, _plug_plain))
register_method(AdapterMethod("lora", _lora_spec, _wrap_lora, _plug_lora))


# --- the public API ----------------------------------------------------------------------------------------

def lora_config_for(config: MethodConfig, full: nn.Module, spec: AdapterSpec) -> LoraConfig:
    """The peft config that puts a LoRA spec's adapter on the full model (its head, if any, as modules_to_save)."""
    lora = _peft_config(config, full, _lora_modules(spec, emulator=False))
    heads = sorted({t.name.rsplit(".", 1)[0] for t in _heads(spec)})
    lora.modules_to_save = heads or None
    return lora


def peft_state_dict(spec: AdapterSpec, adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA adapter keyed as peft saves it (``base_model.model.<name>``: LoRA factors and head weights alike)."""
    check_adapter(spec, adapter)
    return {PEFT_PREFIX + t.name: adapter[t.name].to(TORCH_DTYPES[t.dtype]).contiguous() for t in spec.tensors}


def method_spec(base: AdapterSpec, emulator: nn.Module, config: MethodConfig) -> AdapterSpec:
    return METHODS[config.name].make_spec(base, emulator, config)


def make_trainable(emulator: PreTrainedModel, spec: AdapterSpec, config: MethodConfig) -> nn.Module:
    """Wrap the emulator (in place) so exactly the spec's tensors train; returns the model to train."""
    return METHODS[config.name].wrap(emulator, spec, config)


def extract(trainable: nn.Module, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """The adapter's current values, fp32, keyed by full-model names."""
    named = _named_tensors(trainable)
    return {t.name: named[t.emulator_name].detach().to(torch.float32).clone() for t in spec.tensors}


@torch.no_grad()
def load(trainable: nn.Module, spec: AdapterSpec, adapter: Mapping[str, torch.Tensor]) -> None:
    """Write an adapter (full-model names) into a wrapped emulator."""
    named = _named_tensors(trainable)
    missing = [t.name for t in spec.tensors if t.name not in adapter]
    if missing:
        raise MethodError(f"adapter is missing tensors: {', '.join(missing[:5])}")
    for t in spec.tensors:
        named[t.emulator_name].copy_(adapter[t.name])


def plug(full: PreTrainedModel, spec: AdapterSpec, adapter: Mapping[str, torch.Tensor],
         config: MethodConfig) -> PreTrainedModel:
    """The full model with the adapter plugged in (LoRA merged); use the returned model."""
    cast = {t.name: adapter[t.name].to(TORCH_DTYPES[t.dtype]) for t in spec.tensors if t.name in adapter}
    cast.update({k: v for k, v in adapter.items() if k not in cast})
    return METHODS[config.name].plug(full, spec, cast, config)

