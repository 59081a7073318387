"""Atomic, pickle-free training checkpoints: tensors in safetensors, scalars in a JSON sidecar."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoint"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``"optim/<param index>/<name>"`` for every per-parameter state tensor (AdamW: step, exp_avg, exp_avg_sq)."""
    state = optimizer.state_dict()["state"]
    return {f"optim/{i}/{name}": value.detach().clone().contiguous()
            for i, slots in state.items() for name, value in slots.items() if isinstance(value, torch.Tensor)}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(work_dir: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``work_dir/checkpoint/`` so that a crash at any moment leaves the previous checkpoint readable."""
    final, tmp, old = work_dir / CHECKPOINT_DIR, work_dir / f"{CHECKPOINT_DIR}.tmp", work_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(work_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint under ``work_dir``, or None."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        path = work_dir / name
        if (path / STATE_FILE).is_file() and (path / TENSORS_FILE).is_file():
            return load_file(str(path / TENSORS_FILE)), json.loads((path / STATE_FILE).read_text())
    return None
