"""Federated rounds in Flower's simulation runtime, with the coordinator's real gRPC service and SQLite state."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client.transport import CoordinatorClient
from coordinator.demo_data import demo_dataset
from coordinator.progress import Progress, checkpoint_path
from coordinator.server import start_server
from coordinator.simulate import SimulateConfig, setup, simulate
from coordinator.state import StateStore
from emulator.corpus import default_corpus
from protos import crypto
from protos.round_config import RoundConfig
from tests.models import subset, tiny_causal_dir, tiny_classifier_dir

DATA = demo_dataset()


@pytest.fixture(scope="module")
def base_config(tmp_path_factory: pytest.TempPathFactory) -> SimulateConfig:
    root = tmp_path_factory.mktemp("federation")
    return SimulateConfig(
        model=str(tiny_classifier_dir(root / "tiny-bert")), task="classification",
        train_file=subset(DATA / "train.jsonl", root / "train.jsonl", 96),
        eval_file=subset(DATA / "eval.jsonl", root / "eval.jsonl", 30), workdir=root / "unused", clients=2,
        rounds=2, bottom=1, top=1, keep=1, training=RoundConfig(lr=2e-3, max_length=32), node_wait=5.0,
    )


def uploads_per_round(work: Path, job_id: str, rounds: int) -> list[int]:
    store = StateStore(work / "state")
    try:
        return [len(store.accepted_uploads(job_id, r)) for r in range(1, rounds + 1)]
    finally:
        store.close()


@pytest.mark.slow
def test_rounds_report_and_resume_without_double_counting(base_config: SimulateConfig, tmp_path: Path) -> None:
    config = replace(base_config, workdir=tmp_path / "run")
    report = simulate(config, tmp_path / "report.json")
    written = json.loads((tmp_path / "report.json").read_text())
    for key in ("full_initial", "emulator_initial", "emulator_tuned", "plugin_tuned", "privacy_gap", "utility_gain"):
        assert isinstance(written[key], float), key
    assert written["metric"] == "accuracy" and (tmp_path / "report.png").stat().st_size > 0
    assert report.rows["emulator_tuned"] > report.rows["emulator_initial"]  # the owners really trained

    variant = setup(config).variants[0]
    checkpoints = variant.checkpoints(config.workdir)
    assert [r.state for r in Progress.load(checkpoints).rounds] == ["AGGREGATED", "AGGREGATED"]
    assert uploads_per_round(config.workdir, variant.job_id, 2) == [2, 2]
    round_two = checkpoint_path(checkpoints, 2).read_bytes()
    initial, final = load_file(str(checkpoint_path(checkpoints, 0))), load_file(str(checkpoint_path(checkpoints, 2)))
    assert any(not torch.equal(initial[n], final[n]) for n in initial)

    # Run again for 3 rounds: rounds 1-2 are not redone, round 3 is added, nothing is counted twice.
    more = replace(config, rounds=3)
    simulate(more, tmp_path / "report3.json")
    progress = Progress.load(checkpoints)
    assert [r.round for r in progress.rounds] == [1, 2, 3]
    assert checkpoint_path(checkpoints, 2).read_bytes() == round_two
    assert uploads_per_round(config.workdir, variant.job_id, 3) == [2, 2, 2]


@pytest.mark.slow
def test_restart_between_close_and_aggregation(base_config: SimulateConfig, tmp_path: Path) -> None:
    """The coordinator dies after closing round 2, with one delta stored: on restart it aggregates exactly that
    delta, once, and sends no new training messages for the closed round."""
    config = replace(base_config, workdir=tmp_path / "run", rounds=1, min_replies=1)
    simulate(config, tmp_path / "r1.json")
    prepared = setup(config)
    variant = prepared.variants[0]
    checkpoints = variant.checkpoints(config.workdir)
    after_one = load_file(str(checkpoint_path(checkpoints, 1)))

    store = StateStore(config.workdir / "state")
    store.open_round(variant.job_id, 2)
    store.close()
    server = start_server(config.workdir / "state", 0, insecure=True, signing_key=prepared.coordinator_key)
    delta = {name: torch.full_like(value, 0.01) for name, value in after_one.items()}
    owner_key = crypto.load_private_key(config.workdir / "owners" / "owner-0.key")
    try:
        with CoordinatorClient(server.address, coordinator_key=prepared.coordinator_key.public_key(),
                               owner_key=owner_key, insecure=True) as client:
            job = client.get_job(variant.job_id)
            client.submit_delta(job, 2, delta, owner_key, num_examples=40)
    finally:
        server.stop()
    store = StateStore(config.workdir / "state")
    store.close_round(variant.job_id, 2)  # ... and the coordinator is killed here
    store.close()

    simulate(replace(config, rounds=2), tmp_path / "r2.json")
    record = Progress.load(checkpoints).rounds[-1].to_json()
    assert record == {"round": 2, "state": "AGGREGATED", "deltas": 1}  # no "replies": nothing was sent
    final = load_file(str(checkpoint_path(checkpoints, 2)))
    for name in after_one:
        assert torch.allclose(final[name], after_one[name] + 0.01, atol=1e-6)


@pytest.mark.slow
def test_too_few_deltas_abort_the_round(base_config: SimulateConfig, tmp_path: Path) -> None:
    config = replace(base_config, workdir=tmp_path / "run", rounds=1, min_replies=3, node_wait=2.0)
    simulate(config, tmp_path / "report.json")
    variant = setup(config).variants[0]
    store = StateStore(config.workdir / "state")
    state, reason, uploads, _ = store.round_status(variant.job_id, 1)
    store.close()
    assert (state, uploads) == ("ABORTED", 2)
    assert "fewer than the minimum 3" in reason
    checkpoints = variant.checkpoints(config.workdir)
    initial, after = load_file(str(checkpoint_path(checkpoints, 0))), load_file(str(checkpoint_path(checkpoints, 1)))
    assert all(torch.equal(initial[n], after[n]) for n in initial)


@pytest.mark.slow
def test_causal_lm_with_lora(tmp_path: Path) -> None:
    """Prompt + completion data, LoRA on the adapter blocks, perplexity (lower is better) in the report."""
    docs = default_corpus().read_text()
    lines = [line for line in docs.splitlines() if len(line.split()) > 8][:80]
    rows = [json.dumps({"prompt": " ".join(line.split()[:4]), "completion": " " + " ".join(line.split()[4:24])})
            for line in lines]
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:64]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in lines[64:]) + "\n")
    config = SimulateConfig(
        model=str(tiny_causal_dir(tmp_path / "tiny-gpt2")), task="causal-lm", train_file=tmp_path / "train.jsonl",
        eval_file=tmp_path / "eval.jsonl", workdir=tmp_path / "run", clients=2, rounds=1, bottom=1, top=1, keep=1,
        training=RoundConfig(method="lora", lr=5e-3, max_length=48), node_wait=5.0,
    )
    report = simulate(config, tmp_path / "report.json")
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["metric"] == "perplexity" and written["higher_is_better"] is False
    assert "lower perplexity is better" in written["note"]
    assert report.rows["emulator_tuned"] < report.rows["emulator_initial"]  # LoRA really trained
    variant = setup(config).variants[0]
    store = StateStore(config.workdir / "state")
    spec = store.job(variant.job_id).adapter_spec
    store.close()
    assert spec.method == "lora" and all("lora_" in name for name in spec.names)  # no LM head in the adapter
