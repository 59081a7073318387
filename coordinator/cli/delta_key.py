"""``offsite-coordinator delta-key``: the coordinator's X25519 delta-encryption key."""

from __future__ import annotations

import typer

from coordinator.cli.common import StateOption, console
from coordinator.cli.store_access import run

delta_key_app = typer.Typer(help="The coordinator's X25519 delta-encryption key.", no_args_is_help=True)


@delta_key_app.command("rotate")
def delta_key_rotate(state: StateOption = None) -> None:
    """Make a new delta-encryption key current (older keys still open deltas sealed to them)."""
    console.print(f"current delta key {run(state, lambda s: s.keyring.rotate())}")
