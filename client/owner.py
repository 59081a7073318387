"""One data owner's round: bundle -> emulator -> train the adapter -> seal and submit the delta."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from client.errors import OwnerSettingsError
from emulator.aggregate import delta_of
from emulator.data import Example, load_examples
from emulator.device import pick_device
from emulator.methods import MethodConfig, extract, load, make_trainable, method_spec
from emulator.quantize import load_emulator
from emulator.train import TrainConfig, evaluate, train
from protos.adapter_spec import AdapterSpec
from protos.bundle import VerifiedBundle


def partition(examples: Sequence[Example], partition_id: int, num_partitions: int, scheme: str = "iid",
              seed: int = 0, alpha: float = 0.5) -> list[Example]:
    """This owner's share of a dataset: IID round-robin after a seeded shuffle, or Dirichlet over labels."""
    if not 0 <= partition_id < num_partitions:
        raise OwnerSettingsError(f"{{partition_id}} {partition_id} is outside 0..{num_partitions - 1}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if scheme == "iid":
        return [examples[i] for i in order[partition_id::num_partitions]]
    if scheme != "dirichlet":
        raise OwnerSettingsError(f"{{partition}} must be iid or dirichlet, got {scheme!r}")
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for i in order:
        by_label.setdefault(examples[i].label or 0, []).append(i)
    mine: list[int] = []
    for label in sorted(by_label):
        indices = by_label[label]
        shares = rng.dirichlet([alpha] * num_partitions)  # (num_partitions,): this label's split over owners
        bounds = [0, *np.round(np.cumsum(shares) * len(indices)).astype(int).tolist()]
        mine += indices[bounds[partition_id] : bounds[partition_id + 1]]
    return [examples[i] for i in sorted(mine)]


def split_validation(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic train / validation split of an owner's own data."""
    keyed = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}|{e.text}|{e.completion}".encode()).digest())
    cut = max(1, int(len(keyed) * fraction)) if len(keyed) > 1 else 0
    return keyed[cut:], keyed[:cut]


@dataclass(frozen=True)
class RoundResult:
    delta: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


def train_round(bundle: VerifiedBundle, global_adapter: Mapping[str, torch.Tensor], train_examples: list[Example],
                val_examples: list[Example], method: MethodConfig, config: TrainConfig, *,
                show_progress: bool = True, device: torch.device | None = None) -> tuple[RoundResult, AdapterSpec]:
    """Train the adapter on the emulator from the global adapter (on ``device``: CUDA when present, by default);
    return the delta and validation metrics."""
    task = bundle.manifest.task
    tokenizer = AutoTokenizer.from_pretrained(bundle.tokenizer_dir, trust_remote_code=False)
    emulator = load_emulator(bundle)  # plain or int8, with the head class the manifest names
    spec = method_spec(bundle.adapter_spec, emulator, method)
    torch.manual_seed(config.seed)
    model = make_trainable(emulator, spec, method)
    load(model, spec, global_adapter)
    model.to(device or pick_device())
    stats = train(model, train_examples, tokenizer, task, config, show_progress=show_progress)
    metrics: dict[str, float] = {"train_loss": stats["train_loss"]}
    if val_examples:
        for key, value in evaluate(model, val_examples, tokenizer, task, max_length=config.max_length,
                                   show_progress=show_progress).items():
            metrics[f"val_{key}"] = value
    model.to("cpu")  # the delta travels from host memory
    delta = delta_of(extract(model, spec), global_adapter)
    return RoundResult(delta, len(train_examples), metrics), spec


def owner_data(train_file: Path, task: str, labels: list[str] | None, partition_id: int, num_partitions: int,
               scheme: str, seed: int, val_fraction: float) -> tuple[list[Example], list[Example]]:
    examples = load_examples(train_file, task, labels)
    mine = partition(examples, partition_id, num_partitions, scheme, seed)
    return split_validation(mine, val_fraction, seed)
