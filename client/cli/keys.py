"""``offsite-client keys``: the data owner's Ed25519 signing keys."""

from __future__ import annotations

from typing import Annotated

import typer

from client.cli.common import OWNER_KEY, OWNER_PUB, DirOption, console, default_client_dir, fail_with
from protos import crypto

keys_app = typer.Typer(help="The data owner's Ed25519 signing keys.", no_args_is_help=True)


@keys_app.command("init")
def keys_init(directory: DirOption = None,
              force: Annotated[bool, typer.Option(help="Overwrite an existing key pair.")] = False) -> None:
    """Create the owner's Ed25519 key pair (owner.key, mode 0600, and owner.pub); print its key id."""
    directory = directory or default_client_dir()
    key = crypto.generate_signing_key()
    try:
        crypto.write_private_key(key, directory / OWNER_KEY, force=force)
        crypto.write_public_key(key.public_key(), directory / OWNER_PUB, force=force)
    except FileExistsError as error:
        fail_with(error)
    console.print(f"signing key {directory / OWNER_KEY}\npublic key  {directory / OWNER_PUB}\n"
                  f"key id      {crypto.key_id(key.public_key())}  (send owner.pub to the coordinator)")
