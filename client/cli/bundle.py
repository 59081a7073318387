"""``offsite-client bundle``: inspect and verify bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from client.cli.common import console, fail
from protos import crypto
from protos.bundle import BundleError, verify_bundle
from protos.errors import describe

bundle_app = typer.Typer(help="Inspect and verify bundles.", no_args_is_help=True)


@bundle_app.command("verify")
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory or .tar.")],
    coordinator_key: Annotated[Path, typer.Option(help="The coordinator's public key (coordinator.pub).")],
) -> None:
    """Check every file's sha256 and the coordinator's signature; exit 0 with a summary when valid."""
    try:
        verified = verify_bundle(bundle, crypto.load_public_key(coordinator_key))
    except (BundleError, crypto.KeyFileError) as error:
        message, code = describe(error)
        fail(f"invalid bundle: {message}" if isinstance(error, BundleError) else message, code)
    manifest = verified.manifest
    compression = manifest.compression
    table = Table(title="verified bundle")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("base model", manifest.base_model.id)
    table.add_row("base weights sha256", manifest.base_model.weights_sha256[:16] + "...")
    table.add_row("task", manifest.task)
    table.add_row("split (bottom-keep-top)", f"{compression.bottom}-{compression.keep}-{compression.top}")
    table.add_row("kept middle blocks", ", ".join(map(str, compression.kept_middle)))
    table.add_row("adapter method / parameters", f"{manifest.adapter.method} / {manifest.adapter.num_parameters:,}")
    table.add_row("emulator parameters", f"{manifest.emulator.num_parameters:,}")
    table.add_row("files", str(len(manifest.files)))
    table.add_row("signer key id", manifest.signer.key_id if manifest.signer else "")
    table.add_row("bundle digest", verified.digest[:16] + "...")
    console.print(table)
