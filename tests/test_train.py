"""Training on the emulator: deterministic given a seed; causal-LM loss only on the completion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from emulator.data import Example
from emulator.loading import embedded_model_path, load_model
from emulator.methods import MethodConfig, extract, make_trainable, method_spec
from emulator.split import SplitConfig
from emulator.surgery import adapter_spec, build_emulator
from emulator.train import IGNORE_INDEX, TrainConfig, TrainConfigError, collate, evaluate, train
from tests.models import tiny_classifier_dir

TEXTS = ["a small cat", "an oak tree", "a red fox", "a pine", "wild dog", "tall fern", "lynx", "moss on stone"]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(embedded_model_path())


def tuned_adapter(model_dir: Path, seed: int, tokenizer) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    full = load_model(str(model_dir), "classification", num_labels=2)
    emulator = build_emulator(full, SplitConfig(1, 1, 1))
    base = adapter_spec(full, emulator.location, emulator.plan, extra_tensors=("classifier.weight", "classifier.bias"))
    config = MethodConfig("layers")
    spec = method_spec(base, emulator.model, config)
    model = make_trainable(emulator.model, spec, config)
    examples = [Example(text, label=i % 2) for i, text in enumerate(TEXTS)]
    train(model, examples, tokenizer, "classification", TrainConfig(epochs=2, lr=1e-2, batch_size=4, seed=seed),
          show_progress=False)
    assert 0.0 <= evaluate(model, examples, tokenizer, "classification", show_progress=False)["accuracy"] <= 1.0
    return extract(model, spec)


def test_training_is_deterministic_given_a_seed(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_classifier_dir(tmp_path / "tiny")
    first, again, other = (tuned_adapter(model_dir, s, tokenizer) for s in (1, 1, 2))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_completion_only_loss_masks_prompt_and_padding(tokenizer) -> None:  # type: ignore[no-untyped-def]
    batch = collate([Example("question one two", completion=" answer"), Example("hi there")], tokenizer,
                    "causal-lm", max_length=32)
    prompt_len = len(tokenizer("question one two", add_special_tokens=False)["input_ids"])
    completion = tokenizer(" answer", add_special_tokens=False)["input_ids"]
    row = batch["labels"][0].tolist()
    assert row[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert row[prompt_len : prompt_len + len(completion)] == completion
    plain = batch["labels"][1]
    n = int(batch["attention_mask"][1].sum())
    assert torch.equal(plain[:n], batch["input_ids"][1][:n]) and (plain[n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize(("kwargs", "field"), [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"),
                                               ({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length")])
def test_train_config_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(TrainConfigError, match=f"^{field} ") as error:
        TrainConfig(**kwargs)  # type: ignore[arg-type]
    assert error.value.field == field
