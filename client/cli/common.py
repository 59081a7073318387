"""What the data owner's CLI modules share: the console, failing with the shared exit codes, common options."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from protos.errors import ExitCode, describe
from protos.files import offsite_home

console = Console()
OWNER_KEY, OWNER_PUB = "owner.key", "owner.pub"
RECEIPTS_DIR = "receipts"  # under $OFFSITE_HOME/client: one JSON per accepted upload, by job

CoordinatorOption = Annotated[str, typer.Option("--coordinator", help="Coordinator address HOST:PORT.")]
CoordinatorKeyOption = Annotated[Path, typer.Option(help="The coordinator's public key (coordinator.pub), pinned.")]
JobOption = Annotated[str, typer.Option("--job", help="Job id.")]
CaOption = Annotated[Path | None, typer.Option(help="CA certificate for the coordinator's TLS certificate.")]
InsecureOption = Annotated[bool, typer.Option(help="Plain text, no TLS (localhost only).")]
DirOption = Annotated[Path | None, typer.Option("--dir", help="Key directory (default: $OFFSITE_HOME/client).")]


def default_client_dir() -> Path:
    return offsite_home() / "client"


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(int(code))


def fail_with(error: BaseException, flags: Mapping[str, str] | None = None) -> NoReturn:
    """Exit with the shared code for ``error``'s kind, its config fields named as this CLI's flags."""
    message, code = describe(error, flags)
    fail(message, code)
