"""Run directories for export, serving and marketplace tests, built fast: the real setup (keys, full model, signed
bundle, coordinator state, round 0), then rounds of seeded updates to the global adapter recorded as the
coordinator records aggregated rounds, with the owners' accepted uploads, and the real plug-in report."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.demo_data import demo_dataset
from coordinator.progress import Progress, RoundRecord, checkpoint_path, save_checkpoint
from coordinator.simulate import SimulateConfig, evaluate_run, setup
from coordinator.simulate.setup import share_coordinator_key
from emulator.shipped_tasks import task_dir
from protos.round_config import RoundConfig
from tests.models import subset, tiny_classifier_dir, tiny_llama_dir

TASK_DATA = {"classification": demo_dataset(), "multiple-choice": task_dir("wordnet-definitions")}


def tiny_run(root: Path, *, method: str = "lora", task: str = "classification", seed: int = 0,
             rounds: int = 2, report: bool = True, model_dir: Path | None = None,
             keys_from: Path | None = None) -> Path:
    """A finished run in ``root`` whose global adapter moved away from round 0 (seeded, so runs differ by seed).
    ``keys_from``: another run whose coordinator key signs this one too (one coordinator, many jobs)."""
    root.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = root / "model"
        if not (model_dir / "config.json").exists():
            (tiny_classifier_dir if task == "classification" else tiny_llama_dir)(model_dir)
    data = TASK_DATA[task]
    config = SimulateConfig(
        model=str(model_dir), task=task, train_file=subset(data / "train.jsonl", root / "train.jsonl", 48),
        eval_file=subset(data / "eval.jsonl", root / "eval.jsonl", 24), workdir=root / "run", clients=2,
        rounds=rounds, bottom=1, top=1, keep=1, training=RoundConfig(method=method, lora_r=4, lora_alpha=8, seed=0),
        cost_steps=0,
    )
    config.workdir.mkdir(parents=True, exist_ok=True)
    config.save()
    if keys_from is not None:
        share_coordinator_key(config.workdir, keys_from)
    prepared = setup(config)
    variant = prepared.variants[0]
    checkpoints = variant.checkpoints(config.workdir)
    adapter = load_file(str(checkpoint_path(checkpoints, 0)))
    progress = Progress()
    generator = torch.Generator().manual_seed(seed + 1)
    for round_number in range(1, rounds + 1):
        adapter = {name: value + 0.05 * torch.randn(value.shape, generator=generator)
                   for name, value in adapter.items()}
        progress.record(RoundRecord(round=round_number, state="AGGREGATED", replies=2, deltas=2))
        save_checkpoint(checkpoints, round_number, adapter, progress)
    if report:
        evaluate_run(config, prepared, config.workdir / "report.json")
    return config.workdir
