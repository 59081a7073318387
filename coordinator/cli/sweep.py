"""``offsite-coordinator emulator sweep``: the privacy-utility frontier of several emulator settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.cli.common import VerboseOption, console, fail_with
from coordinator.errors import CoordinatorError
from coordinator.quiet import quiet_libraries
from coordinator.sweep import SettingResult, SweepConfig, run_sweep
from emulator.errors import EmulatorError
from protos.errors import ProtocolError


def sweep_command(
    configs: Annotated[Path, typer.Option(help="JSON: {\"settings\": [{\"name\", \"bottom\"|\"adapter_blocks\", "
                                               "\"compression\": [{\"name\", \"config\"}]}], training settings}.")],
    train: Annotated[Path, typer.Option(help="Task training data (JSONL).")],
    eval_file: Annotated[Path, typer.Option("--eval", help="Held-out evaluation data (JSONL).")],
    out: Annotated[Path, typer.Option(help="Directory for settings/*.json, sweep.json, sweep.png; a rerun "
                                           "resumes.")] = Path("offsite-sweep"),
    model: Annotated[str | None, typer.Option(help="Hugging Face id, path, or smollm2 (default: the embedded "
                                                   "all-MiniLM-L6-v2).")] = None,
    task: Annotated[str, typer.Option(help="multiple-choice, causal-lm or classification.")] = "multiple-choice",
    verbose: VerboseOption = False,
) -> None:
    """Run each (adapter placement, compressor) setting: owner tuning, plug-in, attacker; write the frontier."""
    quiet_libraries(verbose)

    def show(done: SettingResult) -> None:
        console.print(f"{done.name}: plug-in {done.value('plugin_tuned'):.3f}, attacker "
                      f"{done.value('attacker_tuned'):.3f}, emulator-tuned {done.value('emulator_tuned'):.3f}",
                      highlight=False)

    try:
        config = SweepConfig.load(configs)
        result = run_sweep(model, task, train, eval_file, config, out, on_setting=show)
    except (EmulatorError, ProtocolError, CoordinatorError, FileNotFoundError) as error:
        fail_with(error, {"configs": "--configs"})
    table = Table(title=f"privacy-utility frontier ({result.metric})")
    for column in ("setting", "plug-in", "attacker", "emulator tuned", "plug-in - attacker", "blocks"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for setting in result.settings:
        plugin = setting.value("plugin_tuned")
        table.add_row(setting.name + (" *" if setting.name == result.best else ""), f"{plugin:.3f}",
                      f"{setting.value('attacker_tuned'):.3f}", f"{setting.value('emulator_tuned'):.3f}",
                      f"{plugin - setting.value('attacker_tuned'):+.3f}",
                      f"{setting.distinct_emulator_blocks}/{setting.emulator_blocks}")
    console.print(table)
    for row, scores in result.baseline.items():
        console.print(f"{row}: {scores[result.metric]:.3f}", highlight=False)
    console.print(f"best: {result.best} ({result.best_reason}); frontier: {out / 'sweep.png'}", highlight=False)
