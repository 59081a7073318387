"""Exactness of split, layer drop and plug-in, over every supported family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emulator.families import UnsupportedModelError, locate_blocks
from emulator.split import SplitConfig
from emulator.surgery import PlugInError, adapter_spec, build_emulator, extract_adapter, plug_adapter
from tests.models import FAMILIES, N_LAYERS, VOCAB, model_output, tiny_model

INPUT = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_block_reproduces_the_full_model(family: str) -> None:
    full = tiny_model(family)
    emulator = build_emulator(full, SplitConfig(bottom=2, top=2, keep=None))
    assert emulator.plan.n_emulator_layers == N_LAYERS
    diff = (model_output(full, INPUT) - model_output(emulator.model, INPUT)).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_drop_builds_an_ordinary_smaller_model(family: str, tmp_path) -> None:
    full = tiny_model(family)
    emulator = build_emulator(full, SplitConfig(bottom=1, top=1, keep=2))
    location = emulator.location
    assert emulator.plan.emulator_sources == [0, 1, 4, 5]
    assert len(emulator.model.get_submodule(location.prefix)) == 4
    assert getattr(emulator.model.config, location.n_layers_field) == 4
    full_state, emu_state = full.state_dict(), emulator.model.state_dict()
    for j, source in enumerate(emulator.plan.emulator_sources):
        for key, value in emu_state.items():
            if key.startswith(f"{location.prefix}.{j}."):
                rest = key[len(f"{location.prefix}.{j}.") :]
                assert torch.equal(value, full_state[f"{location.prefix}.{source}.{rest}"])
    # It saves and loads with plain transformers, and its output changes with the dropped blocks.
    emulator.model.save_pretrained(tmp_path)
    reloaded = type(full).from_pretrained(tmp_path).eval()
    assert torch.equal(model_output(reloaded, INPUT), model_output(emulator.model, INPUT))
    assert not torch.allclose(model_output(full, INPUT), model_output(emulator.model, INPUT))


@pytest.mark.parametrize("family", FAMILIES)
def test_plugging_an_unchanged_adapter_is_bit_identical(family: str) -> None:
    full = tiny_model(family)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    emulator = build_emulator(full, SplitConfig(2, 2, 1))
    spec = adapter_spec(full, emulator.location, emulator.plan)
    plug_adapter(full, spec, extract_adapter(emulator.model, spec, from_emulator=True))
    after = full.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_plugging_a_tuned_adapter_changes_only_adapter_blocks(family: str) -> None:
    full = tiny_model(family)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    emulator = build_emulator(full, SplitConfig(1, 2, 2))
    spec = adapter_spec(full, emulator.location, emulator.plan)
    with torch.no_grad():
        for param in emulator.model.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # "training" touches the whole emulator
    plug_adapter(full, spec, extract_adapter(emulator.model, spec, from_emulator=True))

    prefix = emulator.location.prefix
    emu_state, after = emulator.model.state_dict(), full.state_dict()
    adapter_names = set(spec.names)
    assert adapter_names and all(name.startswith(prefix) for name in adapter_names)
    for tensor in spec.tensors:
        assert torch.equal(after[tensor.name], emu_state[tensor.emulator_name])
        assert not torch.equal(after[tensor.name], before[tensor.name])
    for name in before:
        if name not in adapter_names and not any(after[name] is after[a] for a in adapter_names):
            assert torch.equal(after[name], before[name]), name
    blocks_touched = {int(name[len(prefix) + 1 :].split(".")[0]) for name in adapter_names}
    assert blocks_touched == {0, N_LAYERS - 2, N_LAYERS - 1}


def test_registered_and_structural_families() -> None:
    assert locate_blocks(tiny_model("qwen2")).family == "llama"
    structural = locate_blocks(tiny_model("gptj"))
    assert (structural.family, structural.prefix) == ("structural", "transformer.h")
    assert structural.n_layers_field in ("num_hidden_layers", "n_layer")  # GPT-J maps one onto the other


def test_a_model_without_blocks_names_the_supported_families() -> None:
    full = tiny_model("gpt2")
    full.config.model_type = "mystery"
    full.transformer.h = nn.ModuleList([nn.Linear(2, 2)])  # nothing block-like left
    with pytest.raises(UnsupportedModelError, match="supported families: bert, bloom, gpt2"):
        locate_blocks(full)


def test_plug_in_rejects_a_wrong_adapter() -> None:
    full = tiny_model("gpt2")
    emulator = build_emulator(full, SplitConfig(1, 1, 2))
    spec = adapter_spec(full, emulator.location, emulator.plan)
    adapter = extract_adapter(emulator.model, spec, from_emulator=True)
    name = spec.names[0]
    with pytest.raises(PlugInError, match="missing tensors"):
        plug_adapter(full, spec, {k: v for k, v in adapter.items() if k != name})
    with pytest.raises(PlugInError, match="unknown tensors: transformer.h.2.attn"):
        plug_adapter(full, spec, {**adapter, "transformer.h.2.attn.c_attn.weight": adapter[name]})
    with pytest.raises(PlugInError, match="shape"):
        plug_adapter(full, spec, {**adapter, name: adapter[name][..., :1]})
    with pytest.raises(PlugInError, match="dtype"):
        plug_adapter(full, spec, {**adapter, name: adapter[name].half()})
