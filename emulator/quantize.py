"""Weight-only int8 for the emulator's frozen middle blocks, and loading an emulator (plain or int8) from a bundle.

Each ``nn.Linear`` (or GPT-2 style ``Conv1D``) of a kept middle block becomes an :class:`Int8Linear`: int8 weights
with one symmetric fp32 scale per output channel, dequantized on the fly, so gradients still flow through the
middle to the bottom adapter blocks. In the bundle the emulator is then ``config.json`` + ``model.safetensors``
holding the int8 tensors and their scales; the manifest's ``emulator.quantization`` lists the replaced modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from emulator.errors import EmulatorConfigError
from emulator.loading import UnsafeModelError, check_model_config, safe_model_class
from emulator.surgery import Emulator
from protos.bundle import EMULATOR_DIR, MANIFEST, VerifiedBundle, check_allowed_files
from protos.manifests import BundleManifest, QuantizationInfo

INT8 = "int8"


class QuantizeError(EmulatorConfigError):
    """An unknown quantization method."""

QUANTIZE_CHOICES = ("none", INT8)
WEIGHTS_FILE = "model.safetensors"


class _Int8Linear(torch.autograd.Function):
    """``x W^T + b`` that saves only the int8 weight and its scales for backward: ``F.linear`` on a dequantized
    weight would keep an fp32 copy of every frozen middle weight alive until backward, undoing the saving."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight_int8, scale)
        ctx.has_bias = bias is not None
        weight = weight_int8.to(x.dtype) * scale.to(x.dtype)[:, None]  # (out, in), freed after this call
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight_int8, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight_int8.to(grad_out.dtype) * scale.to(grad_out.dtype)[:, None])  # (..., in)
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] \
            else None
        return grad_x, None, None, grad_bias


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 (out, in) and one fp32 scale per output channel."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """weight: (out, in) float."""
        module = cls(weight.shape[1], weight.shape[0], bias is not None)
        scale = weight.detach().abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        module.weight_int8.copy_(torch.round(weight.detach() / scale[:, None]).clamp(-127, 127).to(torch.int8))
        module.weight_scale.copy_(scale)
        if bias is not None and module.bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        result: torch.Tensor = _Int8Linear.apply(x, self.weight_int8, self.weight_scale, bias)
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _float_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, Conv1D):  # GPT-2: weight (in, out), y = x W + b
        return module.weight.t(), module.bias
    assert isinstance(module, nn.Linear)
    return module.weight, module.bias


def quantizable_modules(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Names of the Linear / Conv1D modules under any of ``prefixes`` (block prefixes such as ``encoder.layer.2``)."""
    wanted = tuple(p + "." for p in prefixes)
    return [name for name, module in model.named_modules()
            if name.startswith(wanted) and isinstance(module, nn.Linear | Conv1D)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_modules(model: nn.Module, names: list[str]) -> None:
    """Replace each named Linear / Conv1D by its :class:`Int8Linear`, in place."""
    for name in names:
        weight, bias = _float_weight(model.get_submodule(name))
        _replace(model, name, Int8Linear.from_float(weight, bias))


def middle_prefixes(emulator: Emulator) -> list[str]:
    return [f"{emulator.location.prefix}.{j}" for j in emulator.plan.middle_slots]


def quantize(emulator: Emulator, method: str = INT8) -> QuantizationInfo | None:
    """Quantize the emulator's kept middle blocks in place; return the manifest's ``emulator.quantization``."""
    if method not in QUANTIZE_CHOICES:
        raise QuantizeError(f"{{quantize}} must be one of {', '.join(QUANTIZE_CHOICES)}, got {method!r}")
    if method == "none":
        return None
    names = quantizable_modules(emulator.model, middle_prefixes(emulator))
    quantize_modules(emulator.model, names)
    return QuantizationInfo(method="int8-weight-only", granularity="per-output-channel", modules=names)


def save_emulator(model: PreTrainedModel, directory: Path, quantization: QuantizationInfo | None) -> None:
    """A plain emulator with ``save_pretrained``; an int8 one as its config plus one safetensors file."""
    if quantization is None:
        model.save_pretrained(directory, safe_serialization=True)
        return
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    save_model(model, str(directory / WEIGHTS_FILE))


def load_emulator(bundle: Path | VerifiedBundle) -> PreTrainedModel:
    """The emulator of a bundle (verify it first and pass the :class:`VerifiedBundle`), plain or int8, in eval mode.

    A path is read as is, unverified: only for bundles the caller already trusts. Either way only safetensors
    weights and JSON are read, never custom code (``trust_remote_code=False``, ``use_safetensors=True``), and an
    :class:`~emulator.loading.UnsafeModelError` naming the field refuses a config with ``auto_map``, or a manifest
    ``base_model.class`` / config ``architectures`` / ``model_type`` outside the family registry.
    """
    if isinstance(bundle, VerifiedBundle):
        root, manifest = bundle.root, bundle.manifest  # its files are on the bundle allowlist, checked at verify
    else:
        root = Path(bundle)
        manifest = BundleManifest.from_json(json.loads((root / MANIFEST).read_text(encoding="utf-8")), "manifest")
        check_allowed_files(path.relative_to(root).as_posix() for path in root.rglob("*") if not path.is_dir())
    if manifest.emulator.dir != EMULATOR_DIR:
        raise UnsafeModelError(f"{MANIFEST} emulator.dir", f"must be {EMULATOR_DIR!r}, got {manifest.emulator.dir!r}")
    directory = root / EMULATOR_DIR
    config = check_model_config(directory, EMULATOR_DIR)
    if manifest.base_model.model_type != config["model_type"]:
        raise UnsafeModelError(f"{MANIFEST} base_model.model_type",
                               f"{manifest.base_model.model_type!r} differs from the emulator config's "
                               f"{config['model_type']!r}")
    model_class = safe_model_class(manifest.base_model.class_name, f"{MANIFEST} base_model.class",
                                   config["model_type"])
    quantization = manifest.emulator.quantization
    if quantization is None:
        model: PreTrainedModel = model_class.from_pretrained(directory, use_safetensors=True,
                                                             trust_remote_code=False)
    else:
        config_class = model_class.config_class  # the class's own config, not an Auto lookup
        assert config_class is not None  # safe_model_class found its model_type in the registry
        model = model_class(config_class.from_pretrained(directory))
        for name in quantization.modules:
            weight, bias = _float_weight(model.get_submodule(name))
            _replace(model, name, Int8Linear(weight.shape[1], weight.shape[0], bias is not None))
        load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    return model.eval()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def count_weights(model: nn.Module) -> int:
    """Parameters plus int8 weights: the emulator's parameter count whether or not it is quantized."""
    int8 = sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Linear))
    return sum(p.numel() for p in model.parameters()) + int8
