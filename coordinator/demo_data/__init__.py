"""The demo dataset, shipped as package data: WordNet 3.0 noun glosses by lexicographer file (``train.jsonl``,
``eval.jsonl`` and the WordNet licence under ``wordnet-lexnames/``; regenerate with
``examples/wordnet-lexnames/make_dataset.py``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_DATASET = "wordnet-lexnames"


def demo_dataset() -> Path:
    """The installed directory holding the demo's ``train.jsonl`` and ``eval.jsonl``."""
    path = Path(str(files(__name__) / DEMO_DATASET))
    if not (path / "train.jsonl").is_file():
        raise FileNotFoundError(f"the demo dataset is missing: {path / 'train.jsonl'} (a broken install?)")
    return path
