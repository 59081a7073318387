"""``offsite-coordinator round``: open, close, abort and inspect rounds."""

from __future__ import annotations

from typing import Annotated

import typer

from coordinator.cli.common import JobOption, StateOption, console
from coordinator.cli.store_access import run

round_app = typer.Typer(help="Open, close and inspect rounds.", no_args_is_help=True)
RoundOption = Annotated[int, typer.Option("--round", help="Round number (from 1).")]


@round_app.command("open")
def round_open(job: JobOption, round: RoundOption, state: StateOption = None) -> None:
    """Open a round for uploads."""
    run(state, lambda s: s.store.open_round(job, round))
    console.print(f"job {job} round {round} OPEN")


@round_app.command("close")
def round_close(job: JobOption, round: RoundOption, state: StateOption = None) -> None:
    """Close a round: no more uploads."""
    run(state, lambda s: s.store.close_round(job, round))
    console.print(f"job {job} round {round} CLOSED")


@round_app.command("abort")
def round_abort(job: JobOption, round: RoundOption, reason: Annotated[str, typer.Option(help="Why.")],
                state: StateOption = None) -> None:
    """Abort a round, with a reason."""
    run(state, lambda s: s.store.abort_round(job, round, reason))
    console.print(f"job {job} round {round} ABORTED")


@round_app.command("status")
def round_status(job: JobOption, round: RoundOption, state: StateOption = None) -> None:
    """Show a round's state and its accepted uploads."""
    status, reason, uploads, examples = run(state, lambda s: s.store.round_status(job, round))
    console.print(f"job {job} round {round}: {status}{f' ({reason})' if reason else ''}, {uploads} accepted "
                  f"upload(s), {examples} examples")
