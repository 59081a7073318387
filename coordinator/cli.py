"""``offsite-coordinator``: the model owner's admin CLI."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from coordinator.bundles import build_bundle_from_model
from coordinator.cli_common import console, fail, print_summary
from coordinator.cli_emulator import emulator_app
from coordinator.cli_server import serve
from coordinator.cli_state import delta_key_app, job_app, owners_app, round_app
from coordinator.paths import PUBLIC_KEY_FILE, default_coordinator_dir, init_keys
from emulator.split import SplitConfig
from protos import crypto
from protos.bundle import BundleError, verify_bundle

app = typer.Typer(help="Offsite tuning, model owner's side: build bundles, run rounds, plug in, evaluate.",
                  no_args_is_help=True)
keys_app = typer.Typer(help="The coordinator's signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(emulator_app, name="emulator")
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


@app.command("demo")
def demo(
    out: Annotated[Path | None, typer.Option(help="Where to keep the demo's files [default: a temp dir].")] = None,
) -> None:
    """Run the embedded default end to end: build a MiniLM emulator bundle, sign it, and verify it."""
    workdir = out or Path(tempfile.mkdtemp(prefix="offsite-demo-"))
    keys_dir = workdir / "keys"
    if not (keys_dir / "coordinator.key").exists():
        init_keys(keys_dir)
    signing_key = crypto.load_private_key(keys_dir / "coordinator.key")
    bundle_dir = workdir / "bundle"
    with console.status("building the MiniLM emulator bundle (1-2-1 of 6 blocks)"):
        summary = build_bundle_from_model(None, SplitConfig(1, 1, 2), bundle_dir, signing_key, force=True)
    print_summary(summary, title="demo: all-MiniLM-L6-v2 emulator bundle")
    try:
        verified = verify_bundle(bundle_dir, crypto.load_public_key(keys_dir / PUBLIC_KEY_FILE))
    except BundleError as error:
        fail(f"the bundle just built does not verify: {error}", code=1)
    console.print(f"[green]verified[/] {len(verified.manifest['files'])} files, bundle digest {verified.digest[:16]}")
    if out is None:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    app()
