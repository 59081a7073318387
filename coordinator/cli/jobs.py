"""``offsite-coordinator job``: create jobs from signed bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.common import JobOption, KeyOption, StateOption, console, fail_with
from coordinator.cli.store_access import run
from coordinator.jobs import create_job
from coordinator.paths import load_or_create_signing_key
from coordinator.state import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_UPLOAD
from protos import crypto

job_app = typer.Typer(help="Create jobs from signed bundles.", no_args_is_help=True)


@job_app.command("create")
def job_create(
    bundle: Annotated[Path, typer.Option(help="Signed bundle directory.")],
    job: JobOption,
    max_delta_norm_ratio: Annotated[float, typer.Option(help="Delta L2 norm bound, relative to the adapter's.")]
    = 1.0,
    max_upload_bytes: Annotated[int, typer.Option(help="Cap on one sealed delta.")] = DEFAULT_MAX_UPLOAD,
    chunk_size: Annotated[int, typer.Option(help="Sealing chunk size advertised to owners.")] = DEFAULT_CHUNK_SIZE,
    state: StateOption = None,
    key: KeyOption = None,
) -> None:
    """Create a job from a signed bundle (verified with the coordinator's key)."""
    try:
        signing_key = load_or_create_signing_key(key)[0]
    except crypto.KeyFileError as error:
        fail_with(error)
    created = run(state, lambda s: create_job(s, job, bundle, signing_key.public_key(),
                                              max_delta_norm_ratio=max_delta_norm_ratio,
                                              max_upload_bytes=max_upload_bytes, chunk_size=chunk_size))
    console.print(f"job {created.job_id}: bundle {created.bundle_digest[:16]}, {created.bundle_size:,} bytes, "
                  f"{len(created.adapter_spec.tensors)} adapter tensors")
