"""``offsite-client join | submit | status``: the data owner's side of the wire."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.table import Table

from client.cli.common import (
    OWNER_KEY,
    RECEIPTS_DIR,
    CaOption,
    CoordinatorKeyOption,
    CoordinatorOption,
    InsecureOption,
    JobOption,
    console,
    default_client_dir,
    fail,
)
from client.receipts import load_receipts, save_receipt
from client.transport import CoordinatorClient, TransportError
from protos import crypto
from protos.bundle import BundleError
from protos.errors import ExitCode, describe
from protos.messages import ManifestError
from protos.sealed import SealedDeltaError, read_sealed


def _remote_failure(error: BaseException) -> tuple[str, ExitCode]:
    """A gRPC status is the coordinator's refusal (a failed check); anything else is described as usual."""
    if isinstance(error, grpc.RpcError):
        return str(error.details()), ExitCode.FAILED  # type: ignore[attr-defined]
    return describe(error)


OwnerIdOption = Annotated[str | None, typer.Option(help="Owner id (default: the key id).")]
OwnerKeyOption = Annotated[Path | None, typer.Option("--key", help="Owner signing key (default: "
                                                                  "$OFFSITE_HOME/client/owner.key).")]


def _client(coordinator: str, coordinator_key: Path, ca_cert: Path | None, insecure: bool, key: Path | None,
            owner_id: str | None) -> CoordinatorClient:
    """A client whose every call is signed with the owner's key."""
    if not insecure and ca_cert is None:
        fail("give --ca-cert (TLS) or --insecure (plain text on localhost)")
    return CoordinatorClient(coordinator, coordinator_key=crypto.load_public_key(coordinator_key),
                             owner_key=crypto.load_private_key(key or default_client_dir() / OWNER_KEY),
                             owner_id=owner_id, root_certificates=ca_cert.read_bytes() if ca_cert else None,
                             insecure=insecure)


def join(coordinator: CoordinatorOption, job: JobOption, coordinator_key: CoordinatorKeyOption,
         out: Annotated[Path, typer.Option(help="Where to keep the job's bundle.")] = Path("offsite-job"),
         owner_id: OwnerIdOption = None, key: OwnerKeyOption = None,
         ca_cert: CaOption = None, insecure: InsecureOption = False) -> None:
    """Fetch and verify the signed job manifest and the bundle (resumes a partial download)."""
    try:
        with _client(coordinator, coordinator_key, ca_cert, insecure, key, owner_id) as client:
            info = client.get_job(job)
            bundle = client.download_bundle(info, out)
    except (grpc.RpcError, TransportError, ManifestError, BundleError, crypto.KeyFileError) as error:
        fail(*_remote_failure(error))
    (out / "job.json").write_text(json.dumps({"job_id": info.job_id, "round": info.round,
                                              "bundle_digest": info.bundle_digest}, indent=2) + "\n")
    console.print(f"job {info.job_id} round {info.round} ({info.round_state}): bundle verified at {bundle.root}, "
                  f"{len(info.adapter_spec.tensors)} adapter tensors", highlight=False)


def submit(delta: Annotated[Path, typer.Argument(help="The adapter delta as .safetensors.")],
           coordinator: CoordinatorOption, job: JobOption, coordinator_key: CoordinatorKeyOption,
           round: Annotated[int, typer.Option("--round", help="Round number.")],
           num_examples: Annotated[int, typer.Option(help="Training examples behind the delta (its weight).")],
           owner_id: OwnerIdOption = None,
           upload_id: Annotated[str | None, typer.Option(help="Upload id (default: random); reuse it to retry: the "
                                                              "sealed bytes are kept as DELTA.<id>.sealed.")]
           = None,
           key: OwnerKeyOption = None,
           ca_cert: CaOption = None, insecure: InsecureOption = False) -> None:
    """Seal the delta to the coordinator's key, sign it, and upload it; print the signed receipt."""
    try:
        with _client(coordinator, coordinator_key, ca_cert, insecure, key, owner_id) as client:
            info = client.get_job(job)
            upload_id = upload_id or uuid.uuid4().hex
            # The sealed bytes are kept, so a retry with the same upload id resends exactly them.
            kept = delta.with_name(f"{delta.name}.{upload_id}.sealed")
            if kept.is_file():
                sealed = read_sealed(kept)
            else:
                sealed = client.seal(info, round, delta.read_bytes(), client.owner_key, num_examples, upload_id,
                                     owner_id=client.owner_id)
                sealed.write(kept)
            receipt = client.submit_sealed(sealed)
        save_receipt(default_client_dir() / RECEIPTS_DIR, receipt)
    except (grpc.RpcError, TransportError, ManifestError, crypto.KeyFileError, OSError, SealedDeltaError) as error:
        detail, code = _remote_failure(error)
        fail(f"{detail} (retry with --upload-id {upload_id})" if upload_id else detail, code)
    state = "already accepted" if receipt.already_accepted else "accepted"
    console.print(f"{state}: upload {receipt.upload_id}, blob {receipt.blob_sha256[:16]}, "
                  f"{receipt.num_examples} examples", highlight=False)


def status(coordinator: CoordinatorOption, job: JobOption, coordinator_key: CoordinatorKeyOption,
           owner_id: OwnerIdOption = None, key: OwnerKeyOption = None,
           receipts: Annotated[Path | None, typer.Option(help="Saved receipts (default: $OFFSITE_HOME/client/"
                                                              "receipts; a SuperNode's: CACHE/receipts).")] = None,
           ca_cert: CaOption = None, insecure: InsecureOption = False) -> None:
    """Show the job (its latest round and bundle), that round's progress, and this owner's saved receipts."""
    try:
        with _client(coordinator, coordinator_key, ca_cert, insecure, key, owner_id) as client:
            info = client.get_job(job)
            progress = client.round_status(job, info.round) if info.round else None
    except (grpc.RpcError, TransportError, ManifestError, crypto.KeyFileError) as error:
        fail(*_remote_failure(error))
    console.print(f"job {info.job_id}: round {info.round} ({info.round_state}), bundle {info.bundle_digest[:16]}, "
                  f"{len(info.adapter_spec.tensors)} adapter tensors, at most {info.limits.max_num_examples} "
                  f"examples per upload", highlight=False)
    if progress is not None:
        console.print(f"round {progress.round}: {progress.state}, {progress.accepted_uploads} accepted upload(s), "
                      f"{progress.total_examples} examples", highlight=False)
    table = Table(title=f"your receipts for job {job}")
    for column in ("round", "upload id", "examples", "accepted at", "blob"):
        table.add_column(column)
    for receipt in load_receipts(receipts or default_client_dir() / RECEIPTS_DIR, job):
        table.add_row(str(receipt.round), receipt.upload_id, str(receipt.num_examples), receipt.accepted_at,
                      receipt.blob_sha256[:16])
    console.print(table)
