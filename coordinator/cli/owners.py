"""``offsite-coordinator owners``: register, approve and revoke data owners."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.cli.common import StateOption, console, fail_with
from coordinator.cli.store_access import run
from protos import crypto

owners_app = typer.Typer(help="Register, approve and revoke data owners.", no_args_is_help=True)
OwnerIdArgument = Annotated[str, typer.Argument(help="Owner id.")]


@owners_app.command("add")
def owners_add(
    public_key: Annotated[Path, typer.Option(help="The owner's Ed25519 public key (owner.pub).")],
    owner_id: Annotated[str | None, typer.Option(help="Owner id (default: the key id).")] = None,
    approve: Annotated[bool, typer.Option(help="Approve right away.")] = False,
    state: StateOption = None,
) -> None:
    """Register a data owner's public key (pending until approved)."""
    try:
        key = crypto.load_public_key(public_key)
    except crypto.KeyFileError as error:
        fail_with(error)
    owner = run(state, lambda s: s.store.add_owner(owner_id or crypto.key_id(key), key, approved=approve))
    console.print(f"owner {owner.owner_id} ({owner.status})")


@owners_app.command("approve")
def owners_approve(owner_id: OwnerIdArgument, state: StateOption = None) -> None:
    """Approve a registered owner."""
    run(state, lambda s: s.store.set_owner_status(owner_id, "approved"))
    console.print(f"owner {owner_id} approved")


@owners_app.command("revoke")
def owners_revoke(owner_id: OwnerIdArgument, state: StateOption = None) -> None:
    """Revoke an owner: its uploads are refused from now on."""
    run(state, lambda s: s.store.set_owner_status(owner_id, "revoked"))
    console.print(f"owner {owner_id} revoked")


@owners_app.command("list")
def owners_list(state: StateOption = None) -> None:
    """List owners with their key ids and status."""
    table = Table(title="owners")
    for column in ("owner id", "key id", "status"):
        table.add_column(column)
    for owner in run(state, lambda s: s.store.owners()):
        table.add_row(owner.owner_id, owner.key_id, owner.status)
    console.print(table)
