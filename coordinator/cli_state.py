"""``offsite-coordinator owners|job|round|delta-key``: administer the coordinator's state."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer
from rich.table import Table

from coordinator.cli_common import console, fail
from coordinator.cli_server import KeyOption, StateOption, state_dir
from coordinator.errors import CoordinatorError
from coordinator.paths import load_or_create_signing_key
from coordinator.state import StateStore
from protos import crypto
from protos.bundle import BundleError

owners_app = typer.Typer(help="Register, approve and revoke data owners.", no_args_is_help=True)
job_app = typer.Typer(help="Create jobs from signed bundles.", no_args_is_help=True)
round_app = typer.Typer(help="Open, close and inspect rounds.", no_args_is_help=True)
delta_key_app = typer.Typer(help="The coordinator's X25519 delta-encryption key.", no_args_is_help=True)
JobOption = Annotated[str, typer.Option("--job", help="Job id.")]
RoundOption = Annotated[int, typer.Option("--round", help="Round number (from 1).")]


def _store(state: Path | None) -> StateStore:
    return StateStore(state_dir(state))


def _run(state: Path | None, action: str, *args: object, **kwargs: object) -> object:
    store = _store(state)
    try:
        return getattr(store, action)(*args, **kwargs)
    except (CoordinatorError, ValueError) as error:
        fail(str(error))
    finally:
        store.close()


@owners_app.command("add")
def owners_add(
    public_key: Annotated[Path, typer.Option(help="The owner's Ed25519 public key (owner.pub).")],
    owner_id: Annotated[str | None, typer.Option(help="Owner id [default: the key id].")] = None,
    approve: Annotated[bool, typer.Option(help="Approve right away.")] = False,
    state: StateOption = None,
) -> None:
    """Register a data owner's public key (pending until approved)."""
    try:
        key = crypto.load_public_key(public_key)
    except crypto.KeyFileError as error:
        fail(str(error))
    owner = _run(state, "add_owner", owner_id or crypto.key_id(key), key, approved=approve)
    console.print(f"owner {owner.owner_id} ({owner.status})")  # type: ignore[attr-defined]


@owners_app.command("approve")
def owners_approve(owner_id: Annotated[str, typer.Argument(help="Owner id.")], state: StateOption = None) -> None:
    """Approve a registered owner."""
    _run(state, "set_owner_status", owner_id, "approved")
    console.print(f"owner {owner_id} approved")


@owners_app.command("revoke")
def owners_revoke(owner_id: Annotated[str, typer.Argument(help="Owner id.")], state: StateOption = None) -> None:
    """Revoke an owner: its uploads are refused from now on."""
    _run(state, "set_owner_status", owner_id, "revoked")
    console.print(f"owner {owner_id} revoked")


@owners_app.command("list")
def owners_list(state: StateOption = None) -> None:
    """List owners with their key ids and status."""
    table = Table(title="owners")
    for column in ("owner id", "key id", "status"):
        table.add_column(column)
    for owner in _run(state, "owners"):  # type: ignore[attr-defined]
        table.add_row(owner.owner_id, owner.key_id, owner.status)
    console.print(table)


@job_app.command("create")
def job_create(
    bundle: Annotated[Path, typer.Option(help="Signed bundle directory.")],
    job: JobOption,
    max_delta_norm_ratio: Annotated[float, typer.Option(help="Delta L2 norm bound, relative to the adapter's.")]
    = 1.0,
    max_upload_bytes: Annotated[int, typer.Option(help="Cap on one sealed delta.")] = 1 << 31,
    chunk_size: Annotated[int, typer.Option(help="Sealing chunk size advertised to owners.")] = 1 << 20,
    state: StateOption = None,
    key: KeyOption = None,
) -> None:
    """Create a job from a signed bundle (verified with the coordinator's key)."""
    signing_key = load_or_create_signing_key(key)[0]
    store = _store(state)
    try:
        created = store.create_job(job, bundle, signing_key.public_key(), max_delta_norm_ratio=max_delta_norm_ratio,
                                   max_upload_bytes=max_upload_bytes, chunk_size=chunk_size)
    except (CoordinatorError, BundleError, ValueError) as error:
        fail(str(error))
    finally:
        store.close()
    console.print(f"job {created.job_id}: bundle {created.bundle_digest[:16]}, {created.bundle_size:,} bytes, "
                  f"{len(created.adapter_spec.tensors)} adapter tensors")


@round_app.command("open")
def round_open(job: JobOption, round: RoundOption, state: StateOption = None) -> None:
    """Open a round for uploads."""
    _run(state, "open_round", job, round)
    console.print(f"job {job} round {round} OPEN")


@round_app.command("close")
def round_close(job: JobOption, round: RoundOption, state: StateOption = None) -> None:
    """Close a round: no more uploads."""
    _run(state, "close_round", job, round)
    console.print(f"job {job} round {round} CLOSED")


@round_app.command("abort")
def round_abort(job: JobOption, round: RoundOption, reason: Annotated[str, typer.Option(help="Why.")],
                state: StateOption = None) -> None:
    """Abort a round, with a reason."""
    _run(state, "abort_round", job, round, reason)
    console.print(f"job {job} round {round} ABORTED")


@round_app.command("status")
def round_status(job: JobOption, round: RoundOption, state: StateOption = None) -> None:
    """Show a round's state and its accepted uploads."""
    result = cast(tuple[str, str, int, int], _run(state, "round_status", job, round))
    status, reason, uploads, examples = result
    console.print(f"job {job} round {round}: {status}{f' ({reason})' if reason else ''}, {uploads} accepted "
                  f"upload(s), {examples} examples")


@delta_key_app.command("rotate")
def delta_key_rotate(state: StateOption = None) -> None:
    """Make a new delta-encryption key current (older keys still open deltas sealed to them)."""
    store = _store(state)
    try:
        console.print(f"current delta key {store.keyring.rotate()}")
    finally:
        store.close()
