"""``--engine ort``: classification adapters on one base, mixed in batches, give the torch engine's probabilities on
onnxruntime (two LoRA adapters on one shared base graph, two layers adapters on their own graphs); graphs are cached
on disk and reused after a restart; a causal-LM base is refused."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import InvalidSettingError
from coordinator.serving.adapters import ServingState
from coordinator.serving.batching import EngineConfig, Job
from coordinator.serving.engine import TorchEngine
from coordinator.serving.metrics import ServingMetrics
from coordinator.serving.onnx_runner import OrtRunner
from coordinator.serving.ort_engine import make_engine
from emulator.loading import load_model, load_tokenizer
from tests.models import tiny_classifier_dir
from tests.runs import tiny_run

TEXTS = ["a small dog that barks", "an apple", "the tall oak tree in the garden behind the old house", "a chair",
         "someone who teaches children at a school", "bread"]
RUNS = {"lora-a": ("lora", 1), "lora-b": ("lora", 2), "layers-c": ("layers", 3), "layers-d": ("layers", 4)}
LORA, LAYERS = ("lora-a", "lora-b"), ("layers-c", "layers-d")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServingState]]:
    """Four classification runs on one base, signed by one coordinator key, imported into one serving state."""
    root = tmp_path_factory.mktemp("serving-ort")
    model = tiny_classifier_dir(root / "model")
    state = ServingState(root / "serving")
    first: Path | None = None
    for adapter_id, (method, seed) in RUNS.items():
        run = tiny_run(root / adapter_id, method=method, task="classification", seed=seed, report=False,
                       model_dir=model, keys_from=first)
        first = first or run
        state.import_run(run, adapter_id)
    assert first is not None
    yield first / "full-model", state


def classify_all(engine: TorchEngine, adapters: tuple[str, ...]) -> dict[tuple[str, int], dict[str, Any]]:
    """Every text for every adapter, submitted interleaved so that batches mix adapters; the final events."""
    results: dict[tuple[str, int], dict[str, Any]] = {}
    finished = threading.Semaphore(0)

    def collect(key: tuple[str, int]) -> Callable[[dict[str, Any]], None]:
        def emit(event: dict[str, Any]) -> None:
            if event["type"] != "token":
                results[key] = event
                finished.release()

        return emit

    jobs = [Job("classify", adapter, engine.tokenizer(text)["input_ids"], emit=collect((adapter, i)))
            for i, text in enumerate(TEXTS) for adapter in adapters]
    held: list[str] = []
    try:
        for adapter in adapters:  # loaded before the first job, so one batch can hold every adapter
            engine.cache.acquire(adapter, engine.state.record(adapter).size_bytes())
            held.append(adapter)
        for job in jobs:
            engine.submit(job)
        for _ in jobs:
            assert finished.acquire(timeout=60), "a classification job never finished"
    finally:
        for adapter in held:
            engine.cache.release(adapter)
    return results


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check_parity(state: ServingState, adapters: tuple[str, ...], base: Path) -> dict[tuple[str, int], Any]:
    """ORT and torch engines over the same state: the same probabilities, metrics, and adapters that differ."""
    # a batch runs once it holds every job (or after 5 s), so the batches mix adapters however loaded the machine is
    config = EngineConfig(max_wait_s=5, max_batch_size=len(TEXTS) * len(adapters))
    ort = make_engine("ort", base, state, config).start()
    torch_engine = make_engine("torch", base, state, config).start()
    try:
        assert ort.ort is not None and torch_engine.ort is None
        got, want = classify_all(ort, adapters), classify_all(torch_engine, adapters)
        assert ort.ort.prepared() == sorted(adapters)
        assert ort.metrics.batch_size.count() < len(got)  # batches held several requests, of both adapters
        for key, event in got.items():
            assert event["type"] == "done", event
            expected = want[key]
            assert expected["type"] == "done", expected
            assert event.keys() == expected.keys()
            assert event["prompt_tokens"] == expected["prompt_tokens"] and event["completion_tokens"] == 0
            labels = state.record(key[0]).manifest.labels or []
            assert len(event["probabilities"]) == len(labels) == len(expected["probabilities"]) > 1
            assert all(type(p) is float for p in event["probabilities"])
            assert max_diff(event["probabilities"], expected["probabilities"]) < 1e-4, key
            assert abs(sum(event["probabilities"]) - 1) < 1e-5
        for i in range(len(TEXTS)):
            assert max_diff(got[(adapters[0], i)]["probabilities"], got[(adapters[1], i)]["probabilities"]) > 1e-3
        for adapter in adapters:
            assert ort.metrics.prompt_tokens.value(adapter) == torch_engine.metrics.prompt_tokens.value(adapter) > 0
            assert ort.metrics.latency.count(adapter) == torch_engine.metrics.latency.count(adapter) == len(TEXTS)
        ort.ort.drop(adapters[0])
        assert ort.ort.prepared() == [adapters[1]]
    finally:
        ort.stop()
        torch_engine.stop()
    return got


def test_ort_engine_matches_torch_for_mixed_lora_adapters_on_one_graph(served: tuple[Path, ServingState]) -> None:
    base, state = served
    got = check_parity(state, LORA, base)

    cache = state.dir / "onnx"
    shared = [p.parent for p in cache.glob("lora-*/base.onnx")]
    assert len(shared) == 1  # one base graph, an adapter file each
    assert sorted(p.name for p in shared[0].glob("*.onnx_adapter")) == sorted(
        f"{state.record(a).manifest.adapter_sha256}.onnx_adapter" for a in LORA)
    assert not list(cache.rglob("*.tmp")) and not list(cache.rglob(".*"))
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}

    again = make_engine("ort", base, state, EngineConfig(max_wait_s=0.02)).start()  # a restart reuses the graphs
    try:
        for key, event in classify_all(again, LORA).items():
            assert max_diff(event["probabilities"], got[key]["probabilities"]) < 1e-5
    finally:
        again.stop()
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == files


def test_ort_engine_matches_torch_for_mixed_layers_adapters(served: tuple[Path, ServingState]) -> None:
    base, state = served
    check_parity(state, LAYERS, base)
    for adapter in LAYERS:
        directory = state.dir / "onnx" / state.record(adapter).manifest.adapter_sha256
        assert sorted(p.name for p in directory.iterdir()) == ["key.json", "model.onnx"]


def test_a_lora_adapter_plugged_into_its_own_graph_matches_the_shared_graph(
        served: tuple[Path, ServingState], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback for LoRA adapters that cannot share a graph (B @ A * alpha / r merged into each weight)."""
    base, state = served
    record = state.record(LORA[0])
    tokenizer = load_tokenizer(str(base))
    ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    runners = {"shared": OrtRunner(load_model(str(base), "classification"), tmp_path / "shared", threads=1),
               "plugged": OrtRunner(load_model(str(base), "classification"), tmp_path / "plugged", threads=1)}
    monkeypatch.setattr(runners["plugged"], "_shareable", lambda lora: False)
    results: dict[str, list[list[float]]] = {}
    for name, runner in runners.items():
        runner.prepare(record, record.tensors())
        events: list[dict[str, Any]] = []
        runner.classify([Job("classify", LORA[0], row, emit=events.append) for row in ids], tokenizer,
                        ServingMetrics())
        results[name] = [e["probabilities"] for e in events]
    assert (tmp_path / "plugged" / record.manifest.adapter_sha256 / "model.onnx").is_file()
    assert list((tmp_path / "shared").glob("lora-*/base.onnx"))
    for shared, plugged in zip(results["shared"], results["plugged"], strict=True):
        assert max_diff(shared, plugged) < 1e-4


def test_ort_engine_matches_torch_for_lora_and_layers_mixed(served: tuple[Path, ServingState]) -> None:
    base, state = served
    check_parity(state, (LORA[0], LAYERS[0]), base)


def test_ort_engine_refuses_a_causal_lm_base(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "mc", method="lora", task="multiple-choice", report=False)
    with pytest.raises(InvalidSettingError, match="causal LM") as refused:
        make_engine("ort", run / "full-model", ServingState(tmp_path / "serving"), EngineConfig())
    assert refused.value.fields == ("engine",)
