"""``emulator sweep``: settings (placement x compressors) on a tiny LLaMA and a multiple-choice task, each with its
owner-tuned, plug-in and attacker scores; resumable; the frontier as JSON and PNG; bad configs named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.sweep import SweepResult
from protos.errors import ExitCode
from tests.models import tiny_llama_dir

SETTINGS = [
    {"name": "drop", "bottom": 1, "top": 1, "compression": [{"name": "layer_drop", "config": {"keep": 2}}]},
    {"name": "share-spread", "adapter_blocks": [0, 3, 7],
     "compression": [{"name": "share", "config": {"clusters": 2, "calibration_batches": 1, "batch_size": 2,
                                                  "seq_len": 16}}]},
    {"name": "drop-rank", "bottom": 1, "top": 1,
     "compression": [{"name": "layer_drop", "config": {"keep": 3}},
                     {"name": "rank", "config": {"rank_fraction": 0.25}}]},
]


def write_task(path: Path, count: int, offset: int = 0) -> Path:
    rows = [{"prompt": f"Item {i}: the colour word number {i % 3} is", "choices": [" red", " green", " blue"],
             "answer": i % 3} for i in range(offset, offset + count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_sweep_writes_the_frontier_and_resumes(tmp_path: Path) -> None:
    model = tiny_llama_dir(tmp_path / "llama", n_layers=8)
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps({"settings": SETTINGS, "epochs": 1, "batch_size": 8, "max_length": 32,
                                   "heal_steps": 2, "lr": 1e-3}))
    args = ["emulator", "sweep", "--model", str(model), "--task", "multiple-choice", "--configs", str(configs),
            "--train", str(write_task(tmp_path / "train.jsonl", 24)),
            "--eval", str(write_task(tmp_path / "eval.jsonl", 9, offset=100)), "--out", str(tmp_path / "sweep")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    result = SweepResult.from_json(json.loads((tmp_path / "sweep" / "sweep.json").read_text()))
    assert [s.name for s in result.settings] == ["drop", "share-spread", "drop-rank"]
    assert result.best in {"drop", "share-spread", "drop-rank"} and result.best_reason
    assert set(result.baseline) == {"full_initial", "full_tuned"}
    for setting in result.settings:
        assert set(setting.scores) == {"emulator_initial", "emulator_tuned", "plugin_tuned", "attacker_tuned"}
        assert all(0.0 <= s["acc"] <= 1.0 and "acc_stderr" in s for s in setting.scores.values())
    share = result.settings[1]
    assert share.adapter_blocks == [0, 3, 7] and share.emulator_blocks == 8  # full depth ...
    assert share.distinct_emulator_blocks == 3 + 2  # ... from the adapter blocks and two shared middle blocks
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0

    saved = (tmp_path / "sweep" / "settings" / "drop.json").read_text()
    (tmp_path / "sweep" / "settings" / "drop-rank.json").unlink()
    again = CliRunner().invoke(app, args)  # resumes: only drop-rank runs again
    assert again.exit_code == 0, again.output
    assert (tmp_path / "sweep" / "settings" / "drop.json").read_text() == saved
    assert (tmp_path / "sweep" / "settings" / "drop-rank.json").is_file()


@pytest.mark.parametrize(("settings", "named"), [
    ([], "distinct names"),
    ([SETTINGS[0], SETTINGS[0]], "distinct names"),
    ([{"name": "x", "compression": [{"name": "squeeze", "config": {}}]}], "squeeze"),
    ([{"name": "x", "adapter_blocks": [5, 1], "compression": [{"name": "layer_drop", "config": {}}]}],
     "adapter_blocks"),
])
def test_bad_configs_are_named(tmp_path: Path, settings: list[object], named: str) -> None:
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps({"settings": settings}))
    (tmp_path / "d.jsonl").write_text("")
    result = CliRunner().invoke(app, ["emulator", "sweep", "--configs", str(configs), "--train",
                                      str(tmp_path / "d.jsonl"), "--eval", str(tmp_path / "d.jsonl")])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "--configs" in result.output and named in result.output, result.output
