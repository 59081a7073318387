"""Console helpers shared by the coordinator's CLI modules."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from coordinator.bundles import BuildSummary

console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def print_summary(summary: BuildSummary, title: str = "emulator bundle") -> None:
    table = Table(title=title)
    table.add_column("item")
    table.add_column("value", justify="right")
    for name, value in summary.rows():
        table.add_row(name, value)
    console.print(table)
