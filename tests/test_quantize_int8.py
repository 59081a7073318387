"""Weight-only int8 middle blocks: accuracy, gradients to the bottom adapter, memory, and loading from a bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.bundles import build_bundle
from emulator.loading import embedded_model_path
from emulator.quantize import Int8Linear, load_emulator, model_bytes, quantize
from emulator.split import SplitConfig
from emulator.surgery import build_emulator
from protos.bundle import verify_bundle
from tests.distill_helpers import tiny_bert, tiny_gpt2

FACTORIES = {"gpt2": tiny_gpt2, "bert": tiny_bert}  # Conv1D and nn.Linear
IDS = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def final_hidden(model: torch.nn.Module) -> torch.Tensor:
    return model.base_model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).last_hidden_state


def test_int8_linear_round_trip_error_is_small() -> None:
    weight, bias = torch.randn(64, 48), torch.randn(64)
    module = Int8Linear.from_float(weight, bias)
    assert module.weight_int8.dtype == torch.int8 and module.weight_scale.shape == (64,)
    assert (module.weight - weight).abs().max() <= weight.abs().amax(dim=1).max() / 254 + 1e-6
    x = torch.randn(5, 48)
    exact = torch.nn.functional.linear(x, weight, bias)
    assert ((module(x) - exact).pow(2).mean() / exact.pow(2).mean()).item() < 1e-4


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_quantized_middle_keeps_outputs_close_and_passes_gradients_to_the_bottom(family: str) -> None:
    emulator = build_emulator(FACTORIES[family](), SplitConfig(1, 1, 2))
    reference = final_hidden(emulator.model).detach()
    fp32_bytes = model_bytes(emulator.model)
    record = quantize(emulator)
    assert record is not None and record.modules
    assert all(name.startswith((f"{emulator.location.prefix}.1.", f"{emulator.location.prefix}.2."))
               for name in record.modules)
    assert model_bytes(emulator.model) < fp32_bytes
    out = final_hidden(emulator.model)
    assert ((out - reference).pow(2).mean() / reference.pow(2).mean()).item() < 1e-3
    for param in emulator.model.parameters():
        param.requires_grad_(False)
    bottom = emulator.model.get_submodule(f"{emulator.location.prefix}.0")
    for param in bottom.parameters():
        param.requires_grad_(True)
    final_hidden(emulator.model).pow(2).mean().backward()
    grads = [p.grad for p in bottom.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads if g is not None)


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_int8_bundle_loads_back_with_load_emulator(family: str, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    full = FACTORIES[family]()
    tokenizer = str(embedded_model_path())
    build_bundle(full, tokenizer, "tiny", SplitConfig(1, 1, 2), tmp_path / "int8", key, quantize="int8")
    build_bundle(full, tokenizer, "tiny", SplitConfig(1, 1, 2), tmp_path / "plain", key)
    verified = verify_bundle(tmp_path / "int8", key.public_key())
    assert verified.manifest.emulator.quantization is not None
    assert verified.manifest.emulator.quantization.method == "int8-weight-only"
    loaded = load_emulator(verified)
    plain = load_emulator(verify_bundle(tmp_path / "plain", key.public_key()))
    assert any(isinstance(m, Int8Linear) for m in loaded.modules())
    assert not any(isinstance(m, Int8Linear) for m in plain.modules())
    expected = build_emulator(full, SplitConfig(1, 1, 2))
    quantize(expected)
    assert torch.equal(final_hidden(loaded), final_hidden(expected.model))
    assert torch.allclose(final_hidden(plain), final_hidden(build_emulator(full, SplitConfig(1, 1, 2)).model))
    assert model_bytes(loaded) < model_bytes(plain)
    assert (tmp_path / "int8" / "emulator" / "model.safetensors").stat().st_size < \
        sum(p.stat().st_size for p in (tmp_path / "plain" / "emulator").glob("*.safetensors"))


def test_int8_linear_backward_matches_the_dequantized_weight() -> None:
    """The custom backward (int8 weights saved, not an fp32 copy) gives F.linear's gradients exactly."""
    from emulator.quantize import Int8Linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 8)
    quantized = Int8Linear.from_float(dense.weight, dense.bias)
    quantized.bias.requires_grad_(True)  # type: ignore[union-attr]
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = quantized(x)
    reference = torch.nn.functional.linear(x, quantized.weight, quantized.bias)
    assert torch.equal(y, reference)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, quantized.bias), grad)
    want = torch.autograd.grad(reference, (x, quantized.bias), grad)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want, strict=True))


def test_a_data_owner_round_trains_on_an_int8_bundle(tmp_path: Path) -> None:
    """The ClientApp's round loads an int8 emulator from the signed bundle and tunes the adapter through it."""
    from safetensors.torch import load_file

    from client.owner import train_round
    from emulator.data import Example
    from emulator.loading import load_model
    from emulator.methods import MethodConfig, head_parameters
    from emulator.train import TrainConfig
    from tests.models import tiny_classifier_dir

    key = Ed25519PrivateKey.generate()
    model_dir = tiny_classifier_dir(tmp_path / "tiny")
    full = load_model(str(model_dir), "classification", num_labels=2)
    build_bundle(full, str(model_dir), "tiny", SplitConfig(1, 1, 2), tmp_path / "b", key, task="classification",
                 extra_adapter_tensors=head_parameters(full), quantize="int8")
    verified = verify_bundle(tmp_path / "b", key.public_key())
    assert verified.manifest.emulator.quantization is not None and verified.manifest.emulator.quantization.modules
    initial = load_file(str(verified.adapter_weights))
    examples = [Example(text, label=i % 2) for i, text in enumerate(["a cat", "an oak", "a fox", "a pine"] * 2)]
    result, spec = train_round(verified, initial, examples, examples[:2], MethodConfig("layers"),
                               TrainConfig(epochs=1, lr=1e-2, batch_size=4), show_progress=False)
    bottom = [t.name for t in spec.tensors if t.name.startswith("bert.encoder.layer.0.")]
    assert bottom and any(result.delta[name].abs().max() > 0 for name in bottom)
    assert result.num_examples == len(examples) and "val_accuracy" in result.metrics
