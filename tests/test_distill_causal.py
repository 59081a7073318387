"""Distillation of a tiny random GPT-2 (with the LM loss): exact resume, and a report with three perplexities."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file

from coordinator.bundles import build_bundle
from coordinator.distill import distill_bundle
from coordinator.fidelity_report import fidelity_report
from emulator.distill import DistillConfig
from emulator.split import SplitConfig
from protos.bundle import verify_bundle
from tests.distill_helpers import corpus_file, save_model_dir, tiny_gpt2

CONFIG = DistillConfig(steps=6, lr=1e-3, batch_size=4, seq_len=24, eval_every=2, eval_docs=8, held_out_percent=20)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("causal")
    model_dir = save_model_dir(tiny_gpt2(), root / "tiny-gpt2")
    key = Ed25519PrivateKey.generate()
    from emulator.loading import load_model

    full = load_model(str(model_dir), "causal-lm")
    build_bundle(full, str(model_dir), str(model_dir), SplitConfig(1, 1, 2), root / "bundle", key, task="causal-lm")
    corpus = corpus_file(root)
    straight = distill_bundle(root / "bundle", None, [corpus], root / "straight", CONFIG, key, progress=False)
    return {"root": root, "key": key, "corpus": corpus, "full": full, "straight": straight}


def emulator_weights(bundle: Path) -> dict[str, torch.Tensor]:
    return load_file(str(bundle / "emulator" / "model.safetensors"))


def test_killed_and_resumed_run_equals_the_uninterrupted_one(setup: dict) -> None:
    root, key, corpus = setup["root"], setup["key"], setup["corpus"]
    first = distill_bundle(root / "bundle", None, [corpus], root / "resumed", CONFIG, key, progress=False,
                           stop_after=3)
    assert not first.finished and not (root / "resumed").exists()
    assert (root / "resumed.work" / "checkpoint" / "state.json").is_file()
    second = distill_bundle(root / "bundle", None, [corpus], root / "resumed", CONFIG, key, progress=False,
                            resume=True)
    assert second.finished and second.steps_run == CONFIG.steps - 3
    straight, resumed = emulator_weights(root / "straight"), emulator_weights(root / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert second.curve == setup["straight"].curve
    assert not (root / "resumed.work").exists()  # checkpoints are removed once the bundle is written


def test_causal_distillation_trains_with_the_lm_loss_and_the_report_has_three_perplexities(setup: dict) -> None:
    root, key = setup["root"], setup["key"]
    result = setup["straight"]
    assert all("lm_loss" in point for point in result.curve)
    manifest = verify_bundle(root / "straight", key.public_key()).manifest
    assert manifest.compression.distillation is not None
    assert manifest.compression.distillation.settings["lm_weight"] == 1.0
    report = fidelity_report(root / "straight", key.public_key(), full=setup["full"], corpus=[setup["corpus"]])
    for variant in ("full", "layer_drop", "distilled", "layer_drop_int8", "distilled_int8"):
        assert math.isfinite(report[variant]["perplexity"]) and report[variant]["perplexity"] > 1
        assert "normalized_error" not in report[variant]
    assert report["distilled_int8"]["memory"]["param_bytes"] < report["distilled"]["memory"]["param_bytes"]
