"""Where training runs and in which precision: device choice, autocast dtype, and moving a batch there.

Pure helpers, no global state. The autocast policy is:

- CUDA: bf16 autocast when the GPU supports bf16 (``torch.cuda.is_bf16_supported()``), else none (fp32).
- CPU: none unless asked (``cpu_bf16=True``). Measured here (2 shared cores of a Xeon with avx512_bf16 + AMX,
  torch 2.13, SmolLM2-135M, batch 1 x 128 tokens, forward + backward, interleaved, median CPU seconds per step):
  full model, fp32 3.76 s vs bf16 autocast over fp32 weights 6.34 s (1.7x slower: every weight is re-cast each
  step, and autocast's cached bf16 copies raise the peak); 2-8-2 emulator + LoRA, fp32 1.41 s vs autocast over
  fp32 weights 1.34 s vs autocast with the frozen weights stored in bf16 1.11 s; emulator with trainable adapter
  blocks, fp32 1.33 s vs frozen-bf16 autocast 1.22 s. So bf16 pays on CPU only with frozen weights stored in bf16
  (:func:`cast_frozen`), and modestly, on a CPU with bf16 matrix units (CPUs without them are unmeasured and
  expected slower); bf16 activations also swallow small updates (a fresh LoRA's first steps barely move the loss
  in the forward pass, though its gradients match fp32). Hence opt-in.
- MPS: none (fp32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from emulator.errors import EmulatorConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(EmulatorConfigError):
    """The requested device is unknown or not available here; the message names the ``{device}`` field."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(requested: str | None = None) -> torch.device:
    """The device to train on.

    ``None`` or ``"auto"``: CUDA if available, else MPS if available, else CPU. An explicit ``"cuda"`` (or
    ``"cuda:N"``) or ``"mps"`` that is not available raises :class:`DeviceError` rather than silently falling back.
    """
    choice = (requested or "auto").strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as error:
        raise DeviceError(f"{{device}} must be one of {', '.join(DEVICE_CHOICES)}, got {requested!r}") from error
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{{device}} {requested} asked for, but CUDA is not available here "
                              f"(torch {torch.__version__}); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{{device}} {requested} asked for, but only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"{{device}} {requested} asked for, but MPS is not available here; use auto or cpu")
        return device
    raise DeviceError(f"{{device}} must be one of {', '.join(DEVICE_CHOICES)}, got {requested!r}")


def autocast_dtype(device: torch.device | str, *, cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for training on ``device``, or None for plain fp32.

    CUDA: ``torch.bfloat16`` when the GPU supports it, else None (fp16 would need a grad scaler). CPU:
    ``torch.bfloat16`` only when ``cpu_bf16`` is set (opt-in; see the module docstring). Anything else: None.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device``'s type in ``dtype``; a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A new dict with every tensor of ``batch`` on ``device`` (non-blocking where the source is pinned)."""
    device = torch.device(device)
    return {key: value.to(device, non_blocking=value.is_pinned()) for key, value in batch.items()}


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store every floating-point parameter that does not require grad in ``dtype`` (trainable ones stay as they are,
    e.g. fp32 master weights); buffers are untouched. Returns the number of parameters cast."""
    count = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += param.numel()
    return count

