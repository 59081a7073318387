"""The batched LoRA bank against peft itself: rows of one batch, each with its own adapter (different ranks, an
rsLoRA one, GPT-2's Conv1D), give what each adapter's ``PeftModel`` gives alone; removing an adapter leaves the
others exact; a layers adapter routed on the same module keeps the LoRA rows right."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from coordinator.serving.adapters import AdapterRefusedError
from coordinator.serving.lora_bank import LoraBank, read_lora
from coordinator.serving.split_batch import RowRouter, SplitBatcher
from tests.models import VOCAB, tiny_model

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
CONFIGS = {"r4": {"r": 4, "lora_alpha": 8}, "r8": {"r": 8, "lora_alpha": 16},
           "rs": {"r": 2, "lora_alpha": 4, "use_rslora": True}}


def trained_adapter(base: torch.nn.Module, family: str, name: str, seed: int, out: Path) -> PeftModel:
    """A peft LoRA adapter with random (nonzero) factors, saved as an export would hold it."""
    config = LoraConfig(target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2", **CONFIGS[name])
    model = get_peft_model(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out)
    return model


def bank_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): v
            for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_mixed_rows_equal_each_peft_adapter_alone(family: str, tmp_path: Path) -> None:
    base = tiny_model(family, seed=0).eval()
    served = copy.deepcopy(base)
    bank = LoraBank(served)
    references = {}
    for seed, name in enumerate(CONFIGS):
        references[name] = trained_adapter(base, family, name, seed + 1, tmp_path / name)
        bank.add(name, read_lora(name, tmp_path / name, bank_tensors(tmp_path / name)))
    assert set(bank.slots) == set(CONFIGS) and all(s.a.shape[1] == 8 for s in bank.stacks.values())

    ids = torch.randint(3, VOCAB, (6, 7), generator=torch.Generator().manual_seed(9))  # (batch, seq)
    rows = ["r4", "rs", "base", "r8", "r4", "rs"]
    with torch.inference_mode():
        with bank.route(rows):
            mixed = served(input_ids=ids).logits
        for row, name in enumerate(rows):
            want = (references[name] if name != "base" else base)(input_ids=ids[row:row + 1]).logits
            assert torch.allclose(mixed[row:row + 1], want, atol=1e-5), (family, name)
        with bank.route(["r8"] * 2):  # every row one adapter: the single-slot path
            assert torch.allclose(served(input_ids=ids[:2]).logits, references["r8"](input_ids=ids[:2]).logits,
                                  atol=1e-5)
        assert torch.allclose(served(input_ids=ids).logits, base(input_ids=ids).logits)  # outside a route: base

        bank.remove("r4")
        assert bank.slots == {"r8": 1, "rs": 2} or bank.slots == {"rs": 1, "r8": 2}
        with bank.route(["rs", "r8", "r4"]):  # an adapter no longer loaded gets no LoRA term
            after = served(input_ids=ids[:3]).logits
        assert torch.allclose(after[0], references["rs"](input_ids=ids[:1]).logits[0], atol=1e-5)
        assert torch.allclose(after[1], references["r8"](input_ids=ids[1:2]).logits[0], atol=1e-5)
        assert torch.allclose(after[2], base(input_ids=ids[2:3]).logits[0], atol=1e-5)


def test_lora_rows_stay_right_beside_a_layers_adapter_on_the_same_module(tmp_path: Path) -> None:
    base = tiny_model("llama", seed=0).eval()
    served = copy.deepcopy(base)
    router = RowRouter()
    split, bank = SplitBatcher(served, router), LoraBank(served)
    lora = trained_adapter(base, "llama", "r4", 1, tmp_path / "r4")
    bank.add("r4", read_lora("r4", tmp_path / "r4", bank_tensors(tmp_path / "r4")))
    name = "model.layers.0.self_attn.q_proj.weight"
    replaced = {name: torch.randn_like(dict(base.named_parameters())[name])}
    split.add("layers", replaced)
    bank.rehook()
    plugged = copy.deepcopy(base)
    with torch.no_grad():
        dict(plugged.named_parameters())[name].copy_(replaced[name])

    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    rows = ["layers", "r4", "base"]
    with torch.inference_mode(), router.route(rows), bank.route(rows):
        mixed = served(input_ids=ids).logits
    with torch.inference_mode():
        assert torch.allclose(mixed[0], plugged(input_ids=ids[:1]).logits[0], atol=1e-5)
        assert torch.allclose(mixed[1], lora(input_ids=ids[1:2]).logits[0], atol=1e-5)
        assert torch.allclose(mixed[2], base(input_ids=ids[2:3]).logits[0], atol=1e-5)


def test_a_lora_adapter_that_does_not_fit_the_base_is_refused(tmp_path: Path) -> None:
    base = tiny_model("llama", seed=0).eval()
    trained_adapter(base, "llama", "r4", 1, tmp_path / "r4")
    tensors = bank_tensors(tmp_path / "r4")
    bank = LoraBank(copy.deepcopy(base))
    wrong = {k: (v[:, :-1] if k.endswith("lora_A.weight") else v) for k, v in tensors.items()}
    with pytest.raises(AdapterRefusedError, match="map"):
        bank.add("bad", read_lora("bad", tmp_path / "r4", wrong))
    moved = {k.replace("layers.0.", "layers.99."): v for k, v in tensors.items()}
    with pytest.raises(AdapterRefusedError, match="not in the base"):
        bank.add("bad", read_lora("bad", tmp_path / "r4", moved))
    unpaired = {k: v for k, v in tensors.items() if not k.endswith("lora_B.weight")}
    with pytest.raises(AdapterRefusedError, match="do not pair up"):
        read_lora("bad", tmp_path / "r4", unpaired)
    assert bank.slots == {} and bank.stacks == {}
