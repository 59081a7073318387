"""One matrix over families and adapter methods: train on the emulator, plug into the full model, exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from emulator.aggregate import AggregationError, WeightedDelta, delta_of, fedavg
from emulator.methods import MethodConfig, MethodError, extract, load, make_trainable, method_spec, plug
from emulator.split import SplitConfig
from emulator.surgery import adapter_spec, build_emulator
from tests.models import VOCAB, model_output, tiny_model

FAMILIES = ["gpt2", "opt", "llama", "qwen2", "bloom", "gpt_neox", "bert"]
METHODS = ["layers", "lora", "bitfit"]
NO_BIAS = {"llama"}  # its blocks have no bias terms (Qwen2 has q/k/v biases): bitfit must refuse them
INPUT = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trained_adapter_plugs_in_exactly(family: str, method: str) -> None:
    full = tiny_model(family)
    emulator = build_emulator(full, SplitConfig(2, 2, None))  # keep every block: plug-in must match exactly
    base = adapter_spec(full, emulator.location, emulator.plan)
    config = MethodConfig(method, lora_r=4)
    if method == "bitfit" and family in NO_BIAS:
        with pytest.raises(MethodError, match="bitfit needs bias terms"):
            method_spec(base, emulator.model, config)
        return
    spec = method_spec(base, emulator.model, config)
    model = make_trainable(emulator.model, spec, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == spec.num_parameters()
    assert all(("lora_" in n) == (method == "lora") for n in trainable)

    # One real optimisation step through the emulator, then plug-in into the private full model.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(input_ids=INPUT)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
    optimizer.step()
    if method == "lora":  # B starts at zero; give A a say too
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    tuned = extract(model, spec)
    assert any(not torch.equal(tuned[n], base_value) for n, base_value in _initial(full, spec, method).items())
    merged = plug(copy.deepcopy(full), spec, tuned, config)
    assert (model_output(merged, INPUT) - model_output(model, INPUT)).abs().max() < 1e-4
    assert not torch.allclose(model_output(merged, INPUT), model_output(full, INPUT))


def _initial(full: torch.nn.Module, spec, method: str) -> dict[str, torch.Tensor]:
    state = full.state_dict()
    if method == "lora":
        return {t.name: torch.zeros(t.shape) for t in spec.tensors if "lora_B" in t.name}
    return {t.name: state[t.name] for t in spec.tensors}


def test_loaded_adapter_round_trips() -> None:
    full = tiny_model("gpt2")
    emulator = build_emulator(full, SplitConfig(1, 1, 2))
    config = MethodConfig("lora", lora_r=2)
    spec = method_spec(adapter_spec(full, emulator.location, emulator.plan), emulator.model, config)
    model = make_trainable(emulator.model, spec, config)
    values = {t.name: torch.randn(t.shape) for t in spec.tensors}
    load(model, spec, values)
    assert all(torch.equal(values[n], v) for n, v in extract(model, spec).items())
    with pytest.raises(MethodError, match="missing tensors"):
        load(model, spec, dict(list(values.items())[1:]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"name": "adam"}, "method"), ({"name": "lora", "lora_r": 0}, "lora_r"),
     ({"name": "lora", "lora_dropout": 1.0}, "lora_dropout")],
)
def test_method_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(MethodError, match=f"^{field} ") as error:
        MethodConfig(**kwargs)  # type: ignore[arg-type]
    assert error.value.field == field


def test_fedavg_weights_by_examples_in_a_fixed_order() -> None:
    start = {"w": torch.zeros(3), "b": torch.ones(1)}
    a = WeightedDelta("owner-b", 1, {"w": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0])})
    b = WeightedDelta("owner-a", 3, {"w": torch.tensor([0.0, 4.0, 0.0]), "b": torch.tensor([-1.0])})
    result = fedavg(start, [a, b])
    assert torch.allclose(result["w"], torch.tensor([0.75, 3.0, 0.0]))
    assert torch.allclose(result["b"], torch.tensor([0.5]))
    assert all(torch.equal(result[k], fedavg(start, [b, a])[k]) for k in result)
    with pytest.raises(AggregationError, match="no deltas"):
        fedavg(start, [])
    with pytest.raises(AggregationError, match="does not match"):
        fedavg(start, [WeightedDelta("x", 1, {"w": torch.zeros(3)})])
    with pytest.raises(AggregationError, match="positive"):
        fedavg(start, [WeightedDelta("x", 0, a.tensors)])


def test_delta_is_tuned_minus_start_in_fp32() -> None:
    start = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    tuned = {"w": torch.tensor([1.5, 1.0], dtype=torch.bfloat16)}
    delta = delta_of(tuned, start)
    assert delta["w"].dtype == torch.float32 and torch.equal(delta["w"], torch.tensor([0.5, -1.0]))
