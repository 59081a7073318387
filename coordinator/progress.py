"""A job's federation progress on disk: one global-adapter checkpoint per round and ``progress.json`` naming the
last completed round, written in that order so a crash between the two only repeats the round's aggregation."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from protos.documents import Document
from protos.files import atomic_write

PROGRESS_FILE = "progress.json"


@dataclass(kw_only=True)
class RoundRecord(Document):
    round: int
    state: str = "OPEN"  # AGGREGATED or ABORTED once recorded
    replies: int | None = None  # replies without error (None: nothing was sent, e.g. on resume)
    errors: list[str] | None = None
    owner_metrics: list[dict[str, float]] | None = None
    deltas: int | None = None  # sealed deltas aggregated
    reason: str | None = None  # why the round was aborted
    eval: dict[str, float] | None = None


@dataclass(kw_only=True)
class Progress(Document):
    completed_round: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> Progress:
        path = Path(directory) / PROGRESS_FILE
        return cls.from_json(json.loads(path.read_text()), str(path)) if path.exists() else cls()

    def record(self, entry: RoundRecord) -> None:
        self.rounds.append(entry)
        self.completed_round = entry.round


def checkpoint_path(directory: Path, round_number: int) -> Path:
    return Path(directory) / f"round-{round_number:04d}.safetensors"


def save_checkpoint(directory: Path, round_number: int, adapter: Mapping[str, torch.Tensor],
                    progress: Progress) -> None:
    """The round's global adapter first, then the progress file that points at it: a crash between the two
    leaves the previous progress, and the round is aggregated again from the same stored uploads."""
    atomic_write(checkpoint_path(directory, round_number),
                 lambda p: save_file({k: v.contiguous() for k, v in adapter.items()}, str(p)))
    atomic_write(Path(directory) / PROGRESS_FILE, json.dumps(progress.to_json(), indent=2))
