"""``offsite-coordinator admin-key``: the admin key the ServerApp signs its calls to the coordinator's service with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.common import StateOption, console, fail_with, state_dir
from coordinator.paths import init_admin_key

admin_key_app = typer.Typer(help="Admin keys: what the ServerApp signs OpenRound and AggregateRound with.",
                            no_args_is_help=True)


@admin_key_app.command("init")
def admin_key_init(
    out: Annotated[Path, typer.Option(help="Where to write the admin private key (0600); its .pub goes beside it.")],
    state: StateOption = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing key at --out.")] = False,
) -> None:
    """Create an Ed25519 admin key pair (separate from the signing and delta keys) and register its public key in
    STATE/admin/KEY_ID.pub: the service accepts admin calls signed with it (no restart needed)."""
    try:
        identity = init_admin_key(state_dir(state), out, force=force)
    except FileExistsError as error:
        fail_with(error)
    console.print(f"admin key    {out}\nkey id       {identity}\nregistered   {state_dir(state) / 'admin'}",
                  highlight=False)
