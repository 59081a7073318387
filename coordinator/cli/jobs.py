"""``offsite-coordinator job``: create jobs from signed bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.common import JobOption, KeyOption, StateOption, console, fail_with
from coordinator.cli.store_access import run
from coordinator.errors import InvalidSettingError
from coordinator.jobs import check_job_settings, create_job
from coordinator.paths import load_or_create_signing_key
from coordinator.records import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_NUM_EXAMPLES, DEFAULT_MAX_UPLOAD
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
    aggregator: Annotated[str, typer.Option(help="How deltas are combined: fedavg, trimmed-mean or median.")]
    = "fedavg",
    clip_norm: Annotated[float | None, typer.Option(help="Clip every delta to this L2 norm before aggregating "
                                                         "(default: the delta norm bound).")] = None,
    max_num_examples: Annotated[int, typer.Option(help="The most training examples one upload may claim.")]
    = DEFAULT_MAX_NUM_EXAMPLES,
    state: StateOption = None,
    key: KeyOption = None,
) -> None:
    """Create a job from a signed bundle (verified with the coordinator's key)."""
    try:  # settings first: a bad one creates no key and no state
        check_job_settings(max_delta_norm_ratio=max_delta_norm_ratio, aggregator=aggregator, clip_norm=clip_norm,
                           max_num_examples=max_num_examples)
        signing_key = load_or_create_signing_key(key)[0]
    except (InvalidSettingError, crypto.KeyFileError) as error:
        fail_with(error)
    created = run(state, lambda s: create_job(s, job, bundle, signing_key.public_key(),
                                              max_delta_norm_ratio=max_delta_norm_ratio,
                                              max_upload_bytes=max_upload_bytes, chunk_size=chunk_size,
                                              aggregator=aggregator, clip_norm=clip_norm,
                                              max_num_examples=max_num_examples))
    console.print(f"job {created.job_id}: bundle {created.bundle_digest[:16]}, {created.bundle_size:,} bytes, "
                  f"{len(created.adapter_spec.tensors)} adapter tensors")


@job_app.command("enroll")
def job_enroll(job: JobOption, owner: Annotated[list[str], typer.Option("--owner", help="Owner id (repeatable).")],
               state: StateOption = None) -> None:
    """Enroll owners in a job: only members may read the job, download its bundle and submit deltas."""
    for owner_id in owner:
        run(state, lambda s, owner_id=owner_id: s.store.enroll(job, owner_id))  # type: ignore[misc]
        console.print(f"owner {owner_id} enrolled in job {job}")


@job_app.command("unenroll")
def job_unenroll(job: JobOption, owner: Annotated[str, typer.Option("--owner", help="Owner id.")],
                 state: StateOption = None) -> None:
    """Remove an owner from a job: its calls about the job are refused from now on."""
    run(state, lambda s: s.store.unenroll(job, owner))
    console.print(f"owner {owner} removed from job {job}")


@job_app.command("members")
def job_members(job: JobOption, state: StateOption = None) -> None:
    """List the owners enrolled in a job."""
    members = run(state, lambda s: (s.store.job(job), s.store.members(job))[1])
    console.print(f"job {job}: {', '.join(members) if members else 'no members'}", highlight=False)
