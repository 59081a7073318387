"""``offsite-coordinator export`` and ``verify-export``: a run's tuned adapter as signed files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.common import KeyOption, VerboseOption, console, fail_with
from coordinator.errors import CoordinatorError
from coordinator.export.api import EXPORT_FORMATS, PARITY_FILE, export_run
from coordinator.export.manifest import verify_export
from coordinator.quiet import quiet_libraries
from emulator.errors import EmulatorError
from protos import crypto
from protos.errors import ProtocolError

EXPECTED = (CoordinatorError, EmulatorError, ProtocolError, FileNotFoundError, FileExistsError)


def export_command(
    run: Annotated[Path, typer.Option(help="A finished run directory (simulate or demo).")],
    fmt: Annotated[str, typer.Option("--format", help=f"One of {', '.join(EXPORT_FORMATS)}.")],
    out: Annotated[Path, typer.Option(help="The export directory to write.")],
    key: KeyOption = None,
    force: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Export the run's final global adapter: safetensors (plugged model), peft (adapter; layers jobs: adapter
    blocks + layer map) or onnx, with a manifest signed by the coordinator."""
    quiet_libraries(verbose)
    try:
        signer = crypto.load_private_key(key) if key else None
        manifest = export_run(run, fmt, out, signer, force=force)
    except EXPECTED as error:
        fail_with(error, {"format": "--format", "out": "--out", "force": "--force"})
    console.print(f"exported {manifest.job_id} round {manifest.rounds} as {manifest.format}: {out} "
                  f"({len(manifest.files)} files, signed by {manifest.signer[:16]})")
    if (out / PARITY_FILE).is_file():
        for name, diff in json.loads((out / PARITY_FILE).read_text())["max_abs_diff"].items():
            console.print(f"onnxruntime vs torch logits ({name}): max_abs_diff={diff:.3g}")


def verify_export_command(
    export: Annotated[Path, typer.Argument(help="An export directory.")],
    coordinator_key: Annotated[Path, typer.Option("--coordinator-key", help="The coordinator's public key "
                                                                            "(coordinator.pub) to check against.")],
) -> None:
    """Check an export's signature and every file's digest against its signed manifest."""
    try:
        manifest = verify_export(export, crypto.load_public_key(coordinator_key))
    except EXPECTED as error:
        fail_with(error)
    console.print(f"verified: {manifest.format} export of {manifest.job_id} round {manifest.rounds}, "
                  f"{len(manifest.files)} files, adapter {manifest.adapter_sha256[:16]}, "
                  f"base {manifest.base_model_sha256[:16]}")
