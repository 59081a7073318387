"""``offsite-coordinator keys``: the coordinator's signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.common import console, fail_with
from coordinator.paths import default_coordinator_dir, init_keys
from protos import crypto

keys_app = typer.Typer(help="The coordinator's signing keys.", no_args_is_help=True)


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path | None, typer.Option("--dir", help="Key directory (default: "
                                                                 "$OFFSITE_HOME/coordinator).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing key pair.")] = False,
) -> None:
    """Create the coordinator's Ed25519 signing key pair (coordinator.key, mode 0600, and coordinator.pub)."""
    directory = directory or default_coordinator_dir()
    try:
        key_path, pub_path = init_keys(directory, force=force)
    except FileExistsError as error:
        fail_with(error)
    console.print(f"signing key  {key_path}\npublic key   {pub_path}\n"
                  f"key id       {crypto.key_id(crypto.load_public_key(pub_path))}")
