"""Continuous batching: requests join a running decode batch between steps and leave when done, and each still
gets exactly the tokens of greedy decoding it alone without a cache; in the engine, a short request submitted while
a long one decodes finishes first."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.serving.adapters import ServingState
from coordinator.serving.batching import EngineConfig, Job
from coordinator.serving.decode import RunningBatch
from coordinator.serving.engine import TorchEngine
from coordinator.serving.metrics import ServingMetrics
from emulator.loading import load_model, load_tokenizer
from tests.models import VOCAB, tiny_llama_dir, tiny_model
from tests.runs import tiny_run


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("decode") / "llama")


def greedy_alone(model: torch.nn.Module, prompt: list[int], new: int, eos: int | None) -> list[int]:
    """The reference: the whole sequence through the model at every step, no cache, no padding."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
    return ids[len(prompt):]


def run_schedule(model: torch.nn.Module, tokenizer: Any, vocab: int) -> tuple[list[Job], dict[int, Any],
                                                                             list[int], list[int]]:
    """Six requests joining a running batch at different steps; their final events, batch sizes and widths."""
    running = RunningBatch(model, tokenizer, ServingMetrics(), lambda rows: nullcontext())
    generator = torch.Generator().manual_seed(3)
    lengths, news = [9, 3, 14, 5, 2, 7], [10, 2, 6, 8, 1, 5]
    prompts = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in lengths]
    results: dict[int, dict[str, Any]] = {}
    jobs = [Job("generate", "base", prompt, max_new_tokens=new,
                emit=lambda e, i=i: results.__setitem__(i, e) if e["type"] != "token" else None)
            for i, (prompt, new) in enumerate(zip(prompts, news, strict=True))]
    schedule = {0: [jobs[0]], 2: [jobs[1], jobs[2]], 3: [jobs[3]], 6: [jobs[4]], 9: [jobs[5]]}  # step -> joiners
    sizes, widths = [], []
    with torch.inference_mode():
        for step in range(40):
            if step in schedule:
                assert running.joinable()
                running.admit(schedule[step])
            if len(running):
                running.step()
            sizes.append(len(running))
            widths.append(running.width)
            if len(results) == len(jobs):
                break
    assert {job.adapter_id for job in running.collect()} == {"base"} and running.cache is None
    return jobs, results, sizes, widths


def check_against_alone(model: torch.nn.Module, jobs: list[Job], results: dict[int, Any], eos: int | None,
                        sizes: list[int], widths: list[int]) -> None:
    assert set(results) == set(range(len(jobs))), results
    for i, job in enumerate(jobs):
        expected = greedy_alone(model, job.input_ids, job.max_new_tokens, eos)
        assert results[i]["type"] == "done" and results[i]["token_ids"] == expected, i
    assert max(sizes) >= 3 and sizes[-1] == 0  # rows ran together, and all left
    peak = widths.index(max(widths))
    # a step adds a column; a width that did not grow means the columns no remaining row needs were cut
    assert any(0 < w <= widths[i - 1] for i, w in enumerate(widths) if i > peak), widths


def test_rows_join_and_leave_between_steps_and_match_decoding_alone(llama: Path) -> None:
    model, tokenizer = load_model(str(llama), "causal-lm").eval(), load_tokenizer(str(llama))
    jobs, results, sizes, widths = run_schedule(model, tokenizer, 30000)
    check_against_alone(model, jobs, results, tokenizer.eos_token_id, sizes, widths)


@pytest.mark.parametrize("family", ["bloom", "gpt2", "gpt_neox", "gptj", "opt", "qwen2"])
def test_joining_is_exact_for_every_family_with_a_plain_cache(family: str, llama: Path) -> None:
    model = tiny_model(family).eval()
    tokenizer = load_tokenizer(str(llama))  # a real tokenizer; the tiny models' ids are below its 128th
    tokenizer.eos_token = None
    jobs, results, sizes, widths = run_schedule(model, tokenizer, VOCAB)
    check_against_alone(model, jobs, results, None, sizes, widths)


def test_a_sliding_window_cache_takes_no_joiners(llama: Path) -> None:
    running = RunningBatch(tiny_model("mistral").eval(), load_tokenizer(str(llama)), ServingMetrics(),
                           lambda rows: nullcontext())
    with torch.inference_mode():
        running.admit([Job("generate", "base", [5, 6, 7], max_new_tokens=4)])
    assert len(running) == 1 and not running.joinable()


def test_a_short_request_joins_a_long_one_and_finishes_first(tmp_path: Path) -> None:
    model = tiny_llama_dir(tmp_path / "llama")
    run = tiny_run(tmp_path / "lora", method="lora", task="multiple-choice", seed=0, report=False, model_dir=model)
    state = ServingState(tmp_path / "state")
    state.import_run(run, "lora-a")
    engine = TorchEngine(run / "full-model", state, EngineConfig(max_wait_s=0.001, max_new_tokens=64)).start()
    order: list[str] = []
    finished = threading.Semaphore(0)
    prompt = engine.tokenizer("Definition: a small dog\nWord:")["input_ids"]

    joined: list[bool] = []

    def emit(name: str) -> Any:
        def on_event(event: dict[str, Any]) -> None:
            if event["type"] == "token" and name == "long" and not joined:  # the long one is decoding now
                joined.append(True)
                engine.submit(Job("generate", "lora-a", prompt, max_new_tokens=2, emit=emit("short")))
            elif event["type"] != "token":
                order.append(name)
                finished.release()
        return on_event

    try:
        engine.submit(Job("generate", "lora-a", prompt, max_new_tokens=40, emit=emit("long")))
        for _ in range(2):
            assert finished.acquire(timeout=120)
    finally:
        engine.stop()
    assert order == ["short", "long"]


def test_a_row_whose_consumer_raises_fails_alone(llama: Path) -> None:
    model, tokenizer = load_model(str(llama), "causal-lm").eval(), load_tokenizer(str(llama))
    running = RunningBatch(model, tokenizer, ServingMetrics(), lambda rows: nullcontext())
    prompt = tokenizer("Definition: a small dog\nWord:")["input_ids"]
    events: list[dict[str, Any]] = []
    settled: list[str] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("the consumer is gone")

    good = Job("generate", "base", prompt, max_new_tokens=5,
               emit=lambda e: events.append(e) if e["type"] != "token" else None)
    bad = Job("generate", "base", prompt, max_new_tokens=5, emit=broken, on_finish=[lambda: settled.append("bad")])
    with torch.inference_mode():
        running.admit([good, bad])
        while len(running):
            running.step()
    assert [e["type"] for e in events] == ["done"]
    assert events[0]["token_ids"] == greedy_alone(model, prompt, 5, tokenizer.eos_token_id)
    assert bad.finished and settled == ["bad"]  # its usage is settled once, and its cache pin is released once
    finished = running.collect()
    assert len(finished) == 2 and {id(j) for j in finished} == {id(good), id(bad)}
