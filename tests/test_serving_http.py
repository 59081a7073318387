"""Export, verify, serve, query over HTTP: a LoRA and a layers adapter on one base, streaming, a hot-loaded
adapter, bad input, deadlines, metrics and admin calls, against a live uvicorn server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from coordinator.cli import app as cli
from coordinator.export.manifest import ExportVerifyError
from coordinator.export.run_source import load_run
from coordinator.serving.adapters import ServingState
from coordinator.serving.batching import EngineConfig, Job
from coordinator.serving.engine import TorchEngine
from coordinator.serving.http import build_app
from tests.models import tiny_llama_dir
from tests.runs import tiny_run
from tests.serving_support import live_server, sse_events

ADMIN = "admin-token-for-tests"
PROMPT = "Definition: a small dog\nWord:"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    model = tiny_llama_dir(root / "llama")
    lora = tiny_run(root / "lora", method="lora", task="multiple-choice", seed=0, report=False, model_dir=model)
    layers = tiny_run(root / "layers", method="layers", task="multiple-choice", seed=1, report=False,
                      model_dir=model, keys_from=lora)
    return {"lora": lora, "layers": layers, "root": root}


def reference_greedy(run: Path, prompt: str, max_new: int) -> list[int]:
    source = load_run(run)
    model = source.plugged_model()
    from emulator.loading import load_tokenizer

    ids = torch.tensor([load_tokenizer(str(source.full_model_dir))(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0, ids.shape[1]:]]


def test_exports_load_in_plain_transformers_and_peft(runs: dict[str, Path], tmp_path: Path) -> None:
    cli_runner = CliRunner()
    for fmt in ("peft", "safetensors"):
        result = cli_runner.invoke(cli, ["export", "--run", str(runs["lora"]), "--format", fmt,
                                         "--out", str(tmp_path / fmt)])
        assert result.exit_code == 0, result.output
    pub = runs["lora"] / "keys" / "coordinator.pub"
    verified = cli_runner.invoke(cli, ["verify-export", str(tmp_path / "peft"), "--coordinator-key", str(pub)])
    assert verified.exit_code == 0 and "verified" in verified.output

    source = load_run(runs["lora"])
    plugged = source.plugged_model()
    ids = torch.tensor([[5, 17, 230, 99, 4]])
    expected = plugged(input_ids=ids).logits
    with_peft = PeftModel.from_pretrained(source.full_model(), str(tmp_path / "peft")).eval()
    assert torch.allclose(with_peft(input_ids=ids).logits, expected, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "safetensors")).eval()
    assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)

    weights = tmp_path / "peft" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    tampered = cli_runner.invoke(cli, ["verify-export", str(tmp_path / "peft"), "--coordinator-key", str(pub)])
    assert tampered.exit_code != 0 and "adapter_model.safetensors" in tampered.output


def test_a_served_adapter_is_verified_once_and_again_after_an_edit(runs: dict[str, Path], tmp_path: Path) -> None:
    state = ServingState(tmp_path / "state")
    first = state.import_run(runs["layers"], "layers-x")
    assert state.record("layers-x") is first  # no re-hash per request while nothing changed
    weights = first.directory / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # same size, so only the change time shows the edit
    with pytest.raises(ExportVerifyError, match="adapter.safetensors"):
        state.record("layers-x")
    weights.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    assert state.record("layers-x") is not first and state.record("layers-x").manifest == first.manifest


@pytest.fixture(scope="module")
def served(runs: dict[str, Path]) -> Iterator[tuple[str, TorchEngine, ServingState]]:
    state = ServingState(runs["root"] / "serving-state")
    state.import_run(runs["lora"], "lora-a")
    engine = TorchEngine(runs["lora"] / "full-model", state, EngineConfig(max_wait_s=0.02, max_prompt_tokens=64,
                                                                          max_new_tokens=32)).start()
    with live_server(build_app(engine, admin_token=ADMIN)) as url:
        yield url, engine, state
    engine.stop()


def test_completions_streaming_and_a_hot_loaded_adapter(runs: dict[str, Path],
                                                        served: tuple[str, TorchEngine, ServingState]) -> None:
    url, engine, state = served
    answer = httpx.post(f"{url}/v1/completions", json={"model": "lora-a", "prompt": PROMPT, "max_tokens": 6},
                        timeout=60).json()
    expected = engine.tokenizer.decode(reference_greedy(runs["lora"], PROMPT, 6), skip_special_tokens=True)
    assert answer["choices"][0]["text"] == expected and answer["usage"]["completion_tokens"] == 6

    streamed = httpx.post(f"{url}/v1/completions", json={"model": "lora-a", "prompt": PROMPT, "max_tokens": 6,
                                                         "stream": True}, timeout=60)
    events = sse_events(streamed)
    assert streamed.headers["content-type"].startswith("text/event-stream") and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) >= 3

    unknown = httpx.post(f"{url}/v1/completions", json={"model": "layers-b", "prompt": PROMPT}, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    state.import_run(runs["layers"], "layers-b")  # while the server runs
    hot = httpx.post(f"{url}/v1/completions", json={"model": "layers-b", "prompt": PROMPT, "max_tokens": 5},
                     timeout=60).json()
    layers_expected = reference_greedy(runs["layers"], PROMPT, 5)
    assert hot["choices"][0]["text"] == engine.tokenizer.decode(layers_expected, skip_special_tokens=True)
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert {m["id"] for m in models} == {"lora-a", "layers-b"} and all(m["parent"] for m in models)

    chat = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "layers-b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}, timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_mixed_batch_equals_each_adapter_alone_and_a_bad_row_fails_alone(
        runs: dict[str, Path], served: tuple[str, TorchEngine, ServingState]) -> None:
    _, engine, state = served
    if "layers-b" not in state.adapter_ids():
        state.import_run(runs["layers"], "layers-b")
    ids = engine.tokenizer(PROMPT)["input_ids"]
    events: dict[int, dict[str, object]] = {}
    jobs = [Job("generate", adapter, list(prompt), max_new_tokens=4,
                emit=lambda e, i=i: events.__setitem__(i, e) if e["type"] != "token" else None)
            for i, (adapter, prompt) in enumerate([("lora-a", ids), ("layers-b", ids), ("lora-a", [10 ** 7]),
                                                   ("layers-b", ids[:3])])]
    for job in jobs:
        engine.submit(job)
    import time

    for _ in range(600):
        if len(events) == len(jobs):
            break
        time.sleep(0.05)
    assert events[0]["token_ids"] == reference_greedy(runs["lora"], PROMPT, 4)
    assert events[1]["token_ids"] == reference_greedy(runs["layers"], PROMPT, 4)
    assert events[2]["type"] == "error" and events[2]["status"] == 500  # an id outside the vocabulary
    assert events[3]["type"] == "done"


def test_bad_input_gets_a_4xx_naming_the_field(served: tuple[str, TorchEngine, ServingState]) -> None:
    url, _, _ = served
    cases = [
        ({"model": "lora-a", "prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "lora-a", "prompt": PROMPT, "max_tokens": 10_000}, 400, "max_tokens"),
        ({"model": "lora-a", "prompt": "word " * 500}, 400, "prompt"),
        ({"model": "lora-a"}, 400, "prompt"),
        ({"model": "nope", "prompt": PROMPT}, 404, "model"),
    ]
    for body, status, param in cases:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param and param in response.json()["error"]["message"]
    wrong_task = httpx.post(f"{url}/v1/classify", json={"model": "lora-a", "input": "x"}, timeout=30)
    assert wrong_task.status_code == 400 and "/v1/completions" in wrong_task.json()["error"]["message"]
    malformed = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30,
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    huge = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20), timeout=30,
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413
    late = httpx.post(f"{url}/v1/completions", json={"model": "lora-a", "prompt": PROMPT, "deadline_ms": 1},
                      timeout=30)
    assert late.status_code == 504 and late.json()["error"]["type"] == "deadline_exceeded"


def test_metrics_and_admin_calls(served: tuple[str, TorchEngine, ServingState]) -> None:
    url, engine, _ = served
    httpx.post(f"{url}/v1/completions", json={"model": "lora-a", "prompt": PROMPT, "max_tokens": 2}, timeout=60)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for series in ('offsite_request_latency_seconds_bucket{adapter="lora-a"', 'offsite_time_to_first_token_seconds',
                   'offsite_adapter_cache_events_total{adapter="lora-a",event="miss"}', "offsite_batch_size_bucket",
                   'offsite_deadline_misses_total{adapter="lora-a"}', "offsite_queue_seconds"):
        assert series in metrics, series
    assert httpx.post(f"{url}/admin/adapters/lora-a/unload", timeout=10).status_code == 401
    wrong = httpx.post(f"{url}/admin/adapters/lora-a/unload", headers={"authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{url}/admin/adapters/lora-a/unload", headers=auth, timeout=10).status_code == 200
    assert "lora-a" not in engine.cache.loaded()
    assert httpx.post(f"{url}/admin/adapters/lora-a/pin", headers=auth, timeout=30).status_code == 200
    listing = httpx.get(f"{url}/admin/adapters", headers=auth, timeout=10).json()
    assert listing["loaded"]["lora-a"]["pinned"] is True
    again = httpx.post(f"{url}/v1/completions", json={"model": "lora-a", "prompt": PROMPT, "max_tokens": 2},
                       timeout=60)
    assert again.status_code == 200


def test_adapters_import_cli_records_the_base_and_refuses_foreign_exports(runs: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    state = tmp_path / "state"
    cli_runner = CliRunner()
    imported = cli_runner.invoke(cli, ["adapters", "import", str(runs["lora"]), "--run", "--id", "mine",
                                       "--state", str(state)])
    assert imported.exit_code == 0, imported.output
    assert json.loads((state / "serving.json").read_text())["base_model"] == str(
        (runs["lora"] / "full-model").resolve())
    assert cli_runner.invoke(cli, ["adapters", "list", "--state", str(state)]).output.split()[:2] == ["mine", "lora"]
    foreign = tiny_run(tmp_path / "foreign", method="lora", task="multiple-choice", report=False,
                       model_dir=runs["root"] / "llama")  # another coordinator's key
    refused = cli_runner.invoke(cli, ["adapters", "import", str(foreign), "--run", "--id", "theirs",
                                      "--state", str(state)])
    assert refused.exit_code != 0 and "pinned" in refused.output
    bad_id = cli_runner.invoke(cli, ["adapters", "import", str(runs["lora"]), "--run", "--id", "../x",
                                     "--state", str(state)])
    assert bad_id.exit_code != 0 and "--id" in bad_id.output


def test_serve_models_process_imports_the_serving_stack_only() -> None:
    """A serving process must not carry the federation stack (Flower, gRPC) or onnxruntime it does not use."""
    import subprocess
    import sys

    code = ("import sys\nsys.argv = ['offsite-coordinator', 'serve-models', '--help']\n"
            "from coordinator.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('flwr', 'grpc', 'matplotlib', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "--http-port" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
