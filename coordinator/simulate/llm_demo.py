"""``demo --model smollm2``: the LLM pipeline end to end on 2 CPU cores in under 15 minutes.

SmolLM2-135M-Instruct (30 LLaMA blocks) split 3-12-3 (the sweep's best setting), a shipped multiple-choice task
(WordNet, kept apart from the docstrings emulators are healed on), 2 data owners x 2 rounds, and the report with the
paper's five settings, the attacker who heals and tunes the whole emulator, and the cost rows. The task files are cut to
``train_items`` and ``eval_items`` (the first lines, written into the run directory) so the run fits the budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coordinator.simulate.config import SimulateConfig
from emulator.shipped_tasks import task_dir
from protos.files import atomic_write
from protos.round_config import RoundConfig

LLM_DEMO_TASK = "wordnet-definitions"
# The sweep's choice for SmolLM2 (README: "The real LLM"): adapter placement and the compression plan's JSON.
LLM_DEMO_BOTTOM, LLM_DEMO_TOP = 3, 3
LLM_DEMO_COMPRESSION: list[dict[str, Any]] = [{"name": "layer_drop", "config": {"keep": 12}}]


def _head(source: Path, target: Path, lines: int) -> Path:
    return atomic_write(target, "".join(source.read_text().splitlines(keepends=True)[:lines]))


def llm_demo_config(workdir: Path, *, task: str = LLM_DEMO_TASK, baseline: str | None = "full-ft",
                    train_items: int = 400, eval_items: int = 200) -> SimulateConfig:
    source = task_dir(task)
    data = workdir / "data"
    train = _head(source / "train.jsonl", data / f"{task}-train.jsonl", train_items)
    evaluation = _head(source / "eval.jsonl", data / f"{task}-eval.jsonl", eval_items)
    return SimulateConfig(
        model="smollm2", task="multiple-choice", train_file=train, eval_file=evaluation, workdir=workdir,
        clients=2, rounds=2, bottom=LLM_DEMO_BOTTOM, top=LLM_DEMO_TOP, keep=None, compression=LLM_DEMO_COMPRESSION,
        training=RoundConfig(lr=1e-4, batch_size=8, max_length=64, epochs=1), baseline=baseline, attacker=True,
        heal_steps=40, cost_steps=3, node_wait=60.0,
    )
