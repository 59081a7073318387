"""What the coordinator's CLI modules share: the console, failing with the shared exit codes, common options."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from coordinator.bundles import BuildSummary
from coordinator.paths import default_coordinator_dir
from emulator.split import SplitError
from protos.errors import ExitCode, describe

console = Console()
# Config fields whose flag is not ``--`` + the field name with dashes.
FLAGS = {"train_file": "--train", "eval_file": "--eval", "num_rounds": "--rounds", "min_replies": "--min-replies",
         "run": "--run", "bundle": "BUNDLE"}

StateOption = Annotated[Path | None, typer.Option("--state", help="State directory (default: "
                                                                   "$OFFSITE_HOME/coordinator/state).")]
KeyOption = Annotated[Path | None, typer.Option("--key", help="Signing key (default: the coordinator's, "
                                                             "created on first use).")]
JobOption = Annotated[str, typer.Option("--job", help="Job id.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", help="Show library logs and warnings.")]


def state_dir(state: Path | None) -> Path:
    return state or default_coordinator_dir() / "state"


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(int(code))


def fail_with(error: BaseException, flags: Mapping[str, str] | None = None) -> NoReturn:
    """Exit with the shared code for ``error``'s kind, its config fields named as this CLI's flags."""
    message, code = describe(error, {**FLAGS, **(flags or {})})
    fail(message, code)


def print_summary(summary: BuildSummary, title: str = "emulator bundle") -> None:
    table = Table(title=title)
    table.add_column("item")
    table.add_column("value", justify="right")
    for name, value in summary.rows():
        table.add_row(name, value)
    console.print(table)


def block_list(text: str | None) -> tuple[int, ...] | None:
    """``"0,5,18,23"`` -> ``(0, 5, 18, 23)``."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise SplitError(f"{{adapter_blocks}} must be comma-separated block indices, got {text!r}") from error
