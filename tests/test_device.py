"""emulator.device: device choice, the autocast policy, and bf16 autocast fidelity on CPU (tiny LLaMA)."""

from __future__ import annotations

import pytest
import torch

from emulator.device import (
    DeviceError,
    autocast,
    autocast_dtype,
    cast_frozen,
    pick_device,
    to_device,
)
from emulator.errors import EmulatorConfigError
from tests.models import VOCAB, tiny_model


@pytest.fixture
def no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("emulator.device._mps_available", lambda: False)


def test_auto_falls_back_to_cpu(no_accelerators: None) -> None:
    assert pick_device() == torch.device("cpu")
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("emulator.device._mps_available", lambda: True)
    assert pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None).type == "cuda"


@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "mps"])
def test_unavailable_accelerator_is_a_config_error(no_accelerators: None, requested: str) -> None:
    with pytest.raises(DeviceError) as info:
        pick_device(requested)
    error = info.value
    assert isinstance(error, EmulatorConfigError)
    assert error.field == "device"
    assert "not available" in str(error) and requested in str(error)
    assert error.render(lambda field: f"--{field}").startswith("--device ")


def test_unknown_device_names_the_field() -> None:
    with pytest.raises(DeviceError) as info:
        pick_device("tpu-please")
    assert info.value.field == "device" and "auto, cpu, cuda" in str(info.value)


def test_autocast_policy_on_cpu() -> None:
    assert autocast_dtype("cpu") is None  # opt-in on CPU
    assert autocast_dtype(torch.device("cpu"), cpu_bf16=True) is torch.bfloat16
    assert autocast_dtype("meta") is None


def test_autocast_policy_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert autocast_dtype("cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert autocast_dtype("cuda:0") is None


def test_autocast_context() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", None):
        assert (a @ b).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32


def test_to_device_moves_every_tensor_into_a_new_dict() -> None:
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    moved = to_device(batch, "cpu")
    assert moved is not batch and moved.keys() == batch.keys()
    assert all(t.device.type == "cpu" for t in moved.values())
    assert to_device(batch, "meta")["input_ids"].device.type == "meta"


def test_cast_frozen_keeps_trainable_fp32() -> None:
    model = tiny_model("llama")
    for name, param in model.named_parameters():
        param.requires_grad_(".layers.0." in name)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert cast_frozen(model, torch.bfloat16) == frozen
    for param in model.parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16)
    assert cast_frozen(model, torch.bfloat16) == 0  # idempotent


def test_cpu_bf16_autocast_matches_fp32_on_tiny_llama() -> None:
    """A tiny LLaMA forward + loss under bf16 autocast stays close to fp32, also with frozen weights in bf16."""
    model = tiny_model("llama")
    input_ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)
    batch = to_device({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, pick_device("cpu"))

    def logits_and_loss() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), autocast("cpu", autocast_dtype("cpu", cpu_bf16=True)):
            out = model(**batch, labels=input_ids)
        assert out.logits.dtype == torch.bfloat16  # autocast really ran the head in bf16
        return out.logits.float(), out.loss.float()

    with torch.no_grad():
        reference = model(**batch, labels=input_ids)
    scale = reference.logits.abs().max()
    for cast in (False, True):
        if cast:  # the benchmark's bf16 mode: frozen weights stored in bf16
            model.requires_grad_(False)
            cast_frozen(model, torch.bfloat16)
        logits, loss = logits_and_loss()
        # measured: 0.5% (fp32 weights) and 1.0% (bf16 weights) of the largest logit
        assert (logits - reference.logits).abs().max() <= 0.03 * scale, cast
        assert torch.allclose(loss, reference.loss, rtol=0.005), (loss, reference.loss)
        assert (logits.argmax(-1) == reference.logits.argmax(-1)).float().mean() >= 0.9
