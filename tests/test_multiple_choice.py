"""The multiple-choice task: data checks naming file, line and field; lm-eval-style scoring (acc, acc_norm,
standard errors) checked against a one-choice-at-a-time computation; and a simulate run whose report carries the
five settings, the attacker row and the cost rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from coordinator.simulate import SimulateConfig, simulate
from emulator.data import DataError, load_examples
from emulator.loading import load_model, load_tokenizer
from emulator.multiple_choice import ChoiceScores, score_choices, stderr
from protos.round_config import RoundConfig
from tests.models import tiny_llama_dir

ITEMS = [
    {"prompt": "Definition: a large feline of forests\nWord:", "choices": [" tiger", " spoon", " cloud"], "answer": 0},
    {"prompt": "The opposite of \"early\" is", "choices": [" late", " green", " loud", " under"], "answer": 0},
    {"prompt": "Definition: a utensil for eating soup\nWord:", "choices": [" hammer", " spoon"], "answer": 1},
]


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("row", "field"), [
    ({"prompt": "p", "choices": " a", "answer": 0}, "'choices'"),
    ({"prompt": "p", "choices": [" a"], "answer": 0}, "'choices'"),
    ({"prompt": "p", "choices": [" a", ""], "answer": 0}, "'choices'"),
    ({"prompt": "p", "choices": [" a", " b"], "answer": 2}, "'answer'"),
    ({"prompt": "p", "choices": [" a", " b"], "answer": True}, "'answer'"),
    ({"choices": [" a", " b"], "answer": 0}, "'prompt'"),
])
def test_bad_items_name_file_line_and_field(tmp_path: Path, row: dict[str, object], field: str) -> None:
    path = write(tmp_path / "mc.jsonl", [ITEMS[0], row])
    with pytest.raises(DataError) as caught:
        load_examples(path, "multiple-choice")
    assert f"{path}:2" in str(caught.value) and field in str(caught.value)


def test_items_train_on_the_right_choice(tmp_path: Path) -> None:
    examples = load_examples(write(tmp_path / "mc.jsonl", ITEMS), "multiple-choice")
    assert [e.completion for e in examples] == [" tiger", " late", " spoon"]
    assert examples[2].choices == (" hammer", " spoon") and examples[2].answer == 1


def naive_loglik(model: torch.nn.Module, tokenizer: object, prompt: str, choice: str) -> float:
    encode = tokenizer  # type: ignore[assignment]
    context = encode(prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    target = encode(choice, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(target))


def test_batched_scores_equal_one_choice_at_a_time(tmp_path: Path) -> None:
    directory = tiny_llama_dir(tmp_path / "llama")
    model, tokenizer = load_model(str(directory), "multiple-choice"), load_tokenizer(str(directory))
    examples = load_examples(write(tmp_path / "mc.jsonl", ITEMS), "multiple-choice")
    scores = score_choices(model, examples, tokenizer, batch_size=3, show_progress=False)  # padded, reordered
    for item, got in zip(ITEMS, scores.loglik, strict=True):
        expected = [naive_loglik(model, tokenizer, str(item["prompt"]), c) for c in item["choices"]]  # type: ignore[attr-defined]
        assert got == pytest.approx(expected, abs=1e-4)
    assert scores.lengths[0] == [6, 6, 6]


def test_acc_norm_divides_by_characters_and_stderr_is_lm_evals() -> None:
    # Item 1: raw favours the long wrong choice; per character the short right one wins.
    scores = ChoiceScores(loglik=[[-2.0, -3.0], [-1.0, -5.0]], answers=[0, 1], lengths=[[1, 10], [5, 5]])
    metrics = scores.metrics()
    assert metrics["acc"] == 0.5 and metrics["acc_norm"] == 0.0
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 * 2 / 1 / 2))
    assert stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(math.sqrt((0.75 * 0.25) * 4 / 3 / 4))
    assert stderr([1.0]) == 0.0


@pytest.mark.slow
def test_simulate_reports_five_settings_attacker_and_costs(tmp_path: Path) -> None:
    rows = [{"prompt": f"Question {i}: which word is number {i % 4}?", "choices": [" zero", " one", " two", " three"],
             "answer": i % 4} for i in range(48)]
    config = SimulateConfig(
        model=str(tiny_llama_dir(tmp_path / "llama")), task="multiple-choice",
        train_file=write(tmp_path / "train.jsonl", rows[:40]), eval_file=write(tmp_path / "eval.jsonl", rows[40:]),
        workdir=tmp_path / "run", clients=2, rounds=1, bottom=1, top=1, keep=2, baseline="full-ft",
        attacker=True, heal_steps=3, cost_steps=2, training=RoundConfig(lr=1e-3, max_length=32, batch_size=8),
        node_wait=5.0,
    )
    report = simulate(config, tmp_path / "report.json")
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["metric"] == "acc"
    for row in ("full_initial", "emulator_initial", "emulator_tuned", "plugin_tuned", "full_tuned", "attacker_tuned"):
        assert 0.0 <= written[row] <= 1.0 and written["stderr"][row] >= 0.0, row
        assert set(written["details"][row]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert written["privacy_gap_vs_attacker"] == pytest.approx(written["plugin_tuned"] - written["attacker_tuned"])
    assert report.notes["training"]["attacker_tuned"]["heal_steps"] == 3
    costs = written["costs"]
    assert costs["trainable_parameters_emulator"] < costs["trainable_parameters_full"]
    assert costs["emulator_mb"] < costs["full_mb"] and costs["adapter_mb"] > 0
    assert costs["emulator_tokens_per_s"] > 0 and costs["full_peak_rss_mb"] > 0
    assert (tmp_path / "report.png").stat().st_size > 0 and "attacker_tuned" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("task", ["wordnet-definitions", "wordnet-hypernyms"])
def test_shipped_tasks_load_and_stay_apart_from_the_public_corpus(task: str) -> None:
    from emulator.corpus import default_corpus
    from emulator.shipped_tasks import shipped_tasks, task_dir

    assert task in shipped_tasks()
    train = load_examples(task_dir(task) / "train.jsonl", "multiple-choice")
    evaluation = load_examples(task_dir(task) / "eval.jsonl", "multiple-choice")
    assert len(train) >= 1000 and len(evaluation) >= 300
    assert not {e.text for e in train} & {e.text for e in evaluation}, "an eval prompt is also a training prompt"
    answers = [e.answer for e in evaluation]
    assert max(answers.count(i) for i in range(4)) < 0.4 * len(answers), "the right answer's slot is guessable"
    public = default_corpus().read_text()
    leaked = [e.text for e in evaluation if e.text in public]
    assert not leaked, leaked[:3]


def test_unknown_shipped_task_is_named() -> None:
    from emulator.shipped_tasks import task_dir

    with pytest.raises(DataError, match="wordnet-definitions"):
        task_dir("wordnet-nonsense")


def test_llm_demo_config_is_a_valid_run(tmp_path: Path) -> None:
    from coordinator.simulate.llm_demo import llm_demo_config

    config = llm_demo_config(tmp_path / "run", train_items=10, eval_items=5)
    assert config.model == "smollm2" and config.task == "multiple-choice" and config.attacker
    assert len(load_examples(config.train_file, "multiple-choice")) == 10
    assert config.compression_plan is not None and config.split_config.bottom == 3
