"""``offsite-coordinator app sign``: approve a Flower app bundle for the owners' nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.app_signing import sign_app
from coordinator.cli.common import console, fail_with
from coordinator.errors import CoordinatorError
from protos import crypto
from protos.errors import ProtocolError

app_app = typer.Typer(help="Flower app bundles the owners' nodes may run.", no_args_is_help=True)


@app_app.command("sign")
def app_sign(
    trusted: Annotated[list[Path], typer.Argument(help="trusted-apps.json files to add the approval to (one per "
                                                       "owner directory, e.g. deploy/owner-*/trusted-apps.json).")],
    key: Annotated[Path, typer.Option("--key", help="The coordinator's signing key (coordinator.key).")],
    app: Annotated[Path, typer.Option("--app", help="The Flower app directory `flwr run` will start.")] = Path("."),
) -> None:
    """Sign the sha256 of the app bundle `flwr run APP` uploads; owners' nodes run no other bundle."""
    try:
        approval = sign_app(crypto.load_private_key(key), app, trusted)
    except (CoordinatorError, ProtocolError, OSError) as error:
        fail_with(error, {"app": "--app"})
    console.print(f"approved {approval.name}: bundle sha256 {approval.fab_sha256} in {len(trusted)} file(s)",
                  highlight=False)
