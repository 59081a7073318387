"""The multiple-choice tasks that ship as package data under ``emulator/tasks/NAME/`` (``train.jsonl``,
``eval.jsonl``), built offline from WordNet 3.0 (licence ``emulator/tasks/LICENSE-WordNet``; regenerate with
``examples/tasks/make_wordnet_tasks.py``). Their text is WordNet's, kept apart from the Python docstrings that
emulators are distilled and healed on, so distillation cannot leak a task."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from emulator.data import DataError

TASKS_DIR = "tasks"


def shipped_tasks() -> list[str]:
    root = Path(str(files("emulator") / TASKS_DIR))
    return sorted(p.name for p in root.iterdir() if (p / "train.jsonl").is_file()) if root.is_dir() else []


def task_dir(name: str) -> Path:
    """The installed directory of shipped task ``name``, holding ``train.jsonl`` and ``eval.jsonl``."""
    path = Path(str(files("emulator") / TASKS_DIR / name))
    if not (path / "train.jsonl").is_file() or not (path / "eval.jsonl").is_file():
        known = ", ".join(shipped_tasks()) or "none (a broken install?)"
        raise DataError(path, f"no shipped task {name!r}; shipped: {known}")
    return path
