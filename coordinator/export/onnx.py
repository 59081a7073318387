"""ONNX export of a plugged model, and one LoRA-ready base graph with onnxruntime adapter files.

The exporter is torch's TorchScript one (``dynamo=False``): the dynamo exporter needs onnxscript, which the project
does not install. ``export_onnx_lora`` passes every overridable tensor (the LoRA A and B of each targeted Linear, and
any head parameter an adapter replaces) to the traced forward as an explicit input, so its graph input name is
exactly the tensor name, and then gives each such input an initializer of the same name: the default (zeros for
LoRA, the base value for a head) that an onnxruntime adapter overrides.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import numpy_helper
from transformers import PreTrainedModel

from coordinator.errors import CoordinatorError
from coordinator.export.onnx_optimize import eager_attention, fuse_bert

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
LORA_INPUTS_FILE = "lora_inputs.json"
_MAX_SINGLE_FILE = 2**31 - 2**24  # protobuf's 2 GiB limit, less headroom for the graph itself


class OnnxExportError(CoordinatorError):
    """An ONNX export or an adapter could not be built; the message names what was wrong."""


class _Logits(torch.nn.Module):
    """(input_ids, attention_mask, *overrides) -> logits, the named overrides replacing the model's tensors."""

    def __init__(self, model: PreTrainedModel, names: tuple[str, ...] = ()):
        super().__init__()
        self._offsite_model = model  # a prefix no tensor name in an adapter starts with
        self.names = names
        self.kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        self.current: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        self.current = dict(zip(self.names, extra, strict=True))
        heads = {name: t for name, t in self.current.items() if not _is_lora(name)}
        try:
            with _swapped(self._offsite_model, heads):  # torch.func.functional_call refuses to be traced
                out = self._offsite_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                                          **self.kwargs)
        finally:
            self.current = {}
        return out.logits

    def hook(self, name: str, scale: float) -> Callable[..., torch.Tensor]:
        """A forward hook adding ``((x A^T) B^T) * scale`` to the Linear ``name``, A and B from the inputs."""

        def add_lora(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            a, b = self.current[f"{name}.lora_A.weight"], self.current[f"{name}.lora_B.weight"]
            return output + torch.matmul(torch.matmul(args[0], a.t()), b.t()) * scale

        return add_lora


@contextlib.contextmanager
def _swapped(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Parameters named in ``tensors`` (and their tied aliases) read as those tensors inside the block."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for name, tensor in tensors.items():
            target = params[name]
            for alias in [n for n, p in params.items() if p is target]:
                owner_name, _, attr = alias.rpartition(".")
                owner = model.get_submodule(owner_name)
                saved.append((owner, attr, owner._parameters.pop(attr)))  # type: ignore[arg-type]
                setattr(owner, attr, tensor)
        yield
    finally:
        for owner, attr, param in reversed(saved):
            delattr(owner, attr)
            owner._parameters[attr] = param


def _is_lora(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def _check_fp32(model: PreTrainedModel) -> None:
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            raise OnnxExportError(f"ONNX export needs an fp32 model; parameter {name!r} is {param.dtype}")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_model(proto: onnx.ModelProto, path: Path) -> None:
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size < _MAX_SINGLE_FILE:
        _write_atomic(path, proto.SerializeToString())
        return
    data = f"{path.name}.data"  # over 2 GB: the weights go to one external file beside the graph
    (path.parent / data).unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _export(wrapper: _Logits, path: Path, extra: dict[str, torch.Tensor], opset: int, *, fuse: bool = False) -> None:
    """Trace ``wrapper`` to ``path``; each ``extra`` tensor becomes a graph input with itself as default.

    A BERT is traced with eager attention and, with ``fuse``, gets onnxruntime's fusions (:mod:`.onnx_optimize`).
    """
    model = wrapper._offsite_model
    _check_fp32(model)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    device = next(model.parameters()).device
    ids = (torch.arange(16, device=device).reshape(2, 8) * 7 + 3) % vocab
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # a padded position while tracing, so no all-ones shortcut can drop the mask
    args = (ids, mask, *(t.detach().to(device) for t in extra.values()))
    modes = {module: module.training for module in model.modules()}
    wrapper.eval()  # export restores the wrapper's mode on every submodule: dropout must stay off
    try:
        with eager_attention(model):
            with torch.no_grad():
                ndim = wrapper(*args).dim()
            seq_axes = {0: "batch", 1: "sequence"}
            axes = {name: seq_axes for name in INPUTS} | {OUTPUT: seq_axes if ndim == 3 else {0: "batch"}}
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = Path(tmp) / "model.onnx"
                torch.onnx.export(wrapper, args, str(traced), dynamo=False, opset_version=opset,
                                  input_names=[*INPUTS, *extra], output_names=[OUTPUT], dynamic_axes=axes)
                proto = onnx.load(str(traced))
        if fuse:
            proto = fuse_bert(proto, model) or proto
    except OnnxExportError:
        raise
    except Exception as e:
        raise OnnxExportError(f"ONNX export of {type(model).__name__} failed: {e}") from e
    finally:
        for module, training in modes.items():
            module.training = training
    inputs = {i.name for i in proto.graph.input}
    missing = [name for name in extra if name not in inputs]
    if missing:
        raise OnnxExportError(f"ONNX export dropped the inputs {missing}: the model never reads them")
    used = _used_names(proto.graph)
    kept = [t for t in proto.graph.initializer if t.name not in extra and t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    for name, tensor in extra.items():
        proto.graph.initializer.append(numpy_helper.from_array(tensor.detach().cpu().numpy(), name))
    _save_model(proto, path)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs reads, and the graph outputs."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                used |= _used_names(sub)
    return used


def export_onnx(model: PreTrainedModel, path: Path, *, opset: int = 18) -> None:
    """Export ``model`` (fp32): inputs input_ids and attention_mask (int64), output logits, dynamic batch and length."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _export(_Logits(model), path, {}, opset, fuse=True)


def _shapes(base: PreTrainedModel, lora_modules: list[str], r: int) -> dict[str, tuple[int, ...]]:
    modules = dict(base.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    twice = sorted({name for name in lora_modules if lora_modules.count(name) > 1})
    if twice:
        raise OnnxExportError(f"LoRA modules listed twice: {twice}")
    for name in lora_modules:
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            kind = "no such module" if module is None else type(module).__name__
            raise OnnxExportError(f"LoRA module {name!r} is not an nn.Linear of the model ({kind})")
        shapes[f"{name}.lora_A.weight"] = (r, module.in_features)
        shapes[f"{name}.lora_B.weight"] = (module.out_features, r)
    return shapes


def _check_adapter(adapter_id: str, tensors: Mapping[str, torch.Tensor], lora: Mapping[str, tuple[int, ...]],
                   params: Mapping[str, torch.Tensor]) -> None:
    if not adapter_id or adapter_id in (".", "..") or "/" in adapter_id or "\\" in adapter_id:
        raise OnnxExportError(f"adapter id {adapter_id!r} is not a plain file name")
    for name in lora:
        if name not in tensors:
            raise OnnxExportError(f"adapter {adapter_id!r} misses the tensor {name!r}")
    for name, tensor in tensors.items():
        if name in lora:
            want = lora[name]
        elif name in params and not _is_lora(name):
            want = tuple(params[name].shape)
        else:
            raise OnnxExportError(f"adapter {adapter_id!r}: tensor {name!r} is neither a LoRA tensor of the "
                                  "targeted modules nor a parameter of the model")
        if tuple(tensor.shape) != want:
            raise OnnxExportError(f"adapter {adapter_id!r}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {want}")


@contextlib.contextmanager
def _hooks(wrapper: _Logits, base: PreTrainedModel, lora_modules: list[str], scale: float) -> Iterator[None]:
    modules = dict(base.named_modules())
    handles = [modules[name].register_forward_hook(wrapper.hook(name, scale)) for name in lora_modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def export_onnx_lora(base: PreTrainedModel, lora_modules: list[str], r: int, alpha: int,
                     adapters: Mapping[str, Mapping[str, torch.Tensor]], out_dir: Path, *,
                     opset: int = 18) -> dict[str, Path]:
    """Write ``out_dir/base.onnx`` with zero LoRA on ``lora_modules`` and one ``<id>.onnx_adapter`` per adapter."""
    if r <= 0:
        raise OnnxExportError(f"LoRA rank r must be positive, got {r}")
    out_dir = Path(out_dir)
    lora = _shapes(base, lora_modules, r)
    params = dict(base.named_parameters(remove_duplicate=False))
    for adapter_id, tensors in adapters.items():
        _check_adapter(adapter_id, tensors, lora, params)
    heads = sorted({name for tensors in adapters.values() for name in tensors if name not in lora})
    extra = {name: torch.zeros(shape) for name, shape in lora.items()}
    extra |= {name: params[name].detach().clone() for name in heads}
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper = _Logits(base, tuple(extra))
    with _hooks(wrapper, base, lora_modules, alpha / r):
        _export(wrapper, out_dir / "base.onnx", extra, opset)
    names = {name: name for name in extra}  # graph input name of each tensor
    _write_atomic(out_dir / LORA_INPUTS_FILE, (json.dumps(names, indent=2, sort_keys=True) + "\n").encode())
    return {adapter_id: write_adapter(tensors, names, out_dir / f"{adapter_id}.onnx_adapter")
            for adapter_id, tensors in adapters.items()}


def write_adapter(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], path: Path) -> Path:
    """Write ``tensors`` as an onnxruntime adapter file, each under its graph input name from ``names``."""
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if name not in names:
            raise OnnxExportError(f"tensor {name!r} is not an overridable input of the base graph")
        arrays[names[name]] = np.ascontiguousarray(tensor.detach().to(torch.float32).cpu().numpy())
    fmt = onnxruntime.AdapterFormat()
    fmt.set_parameters({n: onnxruntime.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fmt.export_adapter(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
