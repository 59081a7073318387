"""``offsite-coordinator emulator ...``: build and inspect emulator bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.bundles import build_bundle_from_model
from coordinator.cli_common import console, fail, print_summary
from coordinator.paths import load_or_create_signing_key
from emulator.split import SplitConfig, SplitError
from protos import crypto
from protos.bundle import pack_bundle

emulator_app = typer.Typer(help="Build and inspect emulator bundles.", no_args_is_help=True)


@emulator_app.command("build")
def emulator_build(
    out: Annotated[Path, typer.Option(help="Output bundle directory.")],
    model: Annotated[str | None, typer.Option(help="Hugging Face id or local path [default: embedded "
                                                   "all-MiniLM-L6-v2].")] = None,
    bottom: Annotated[int, typer.Option(help="Adapter blocks at the bottom.")] = 2,
    top: Annotated[int, typer.Option(help="Adapter blocks at the top.")] = 2,
    keep: Annotated[int | None, typer.Option(help="Middle blocks the emulator keeps [default: all].")] = None,
    key: Annotated[Path | None, typer.Option(help="Signing key [default: the coordinator's, created on first "
                                                  "use].")] = None,
    task: Annotated[str, typer.Option(help="auto, base, causal-lm or classification.")] = "auto",
    tar: Annotated[bool, typer.Option(help="Also write OUT.tar.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle at OUT.")] = False,
) -> None:
    """Split a model into adapter + emulator (uniform layer drop) and write a signed bundle."""
    try:
        split = SplitConfig(bottom=bottom, top=top, keep=keep)
        signing_key, key_path = load_or_create_signing_key(key)
        with console.status("building the emulator bundle"):
            summary = build_bundle_from_model(model, split, out, signing_key, task=task, force=force)
    except (SplitError, FileExistsError, crypto.KeyFileError, ValueError) as error:
        fail(str(error))
    print_summary(summary)
    console.print(f"signed with {key_path} (key id {crypto.key_id(signing_key.public_key())})")
    if tar:
        console.print(f"archive {pack_bundle(out, out.with_name(out.name + '.tar'))}")
