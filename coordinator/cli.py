"""``offsite-coordinator``: the model owner's admin CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli_common import console, fail
from coordinator.cli_emulator import emulator_app
from coordinator.cli_run import demo_command, eval_command, simulate_command
from coordinator.cli_server import serve
from coordinator.cli_state import delta_key_app, job_app, owners_app, round_app
from coordinator.paths import default_coordinator_dir, init_keys
from protos import crypto

app = typer.Typer(help="Offsite tuning, model owner's side: build bundles, run rounds, plug in, evaluate.",
                  no_args_is_help=True)
keys_app = typer.Typer(help="The coordinator's signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(emulator_app, name="emulator")
app.command("simulate")(simulate_command)
app.command("eval")(eval_command)
app.command("serve")(serve)
app.add_typer(owners_app, name="owners")
app.add_typer(job_app, name="job")
app.add_typer(round_app, name="round")
app.add_typer(delta_key_app, name="delta-key")


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path | None, typer.Option("--dir", help="Key directory [default: $OFFSITE_HOME/coordinator]")]
    = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing key pair.")] = False,
) -> None:
    """Create the coordinator's Ed25519 signing key pair (coordinator.key, mode 0600, and coordinator.pub)."""
    directory = directory or default_coordinator_dir()
    try:
        key_path, pub_path = init_keys(directory, force=force)
    except FileExistsError as error:
        fail(str(error))
    console.print(f"signing key  {key_path}\npublic key   {pub_path}\n"
                  f"key id       {crypto.key_id(crypto.load_public_key(pub_path))}")


app.command("demo")(demo_command)


def main() -> None:
    app()
