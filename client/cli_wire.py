"""``offsite-client keys init | join | submit``: the data owner's side of the wire."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console

from client.transport import CoordinatorClient, TransportError
from protos import crypto
from protos.bundle import BundleError
from protos.messages import ManifestError
from protos.sealed import SealedDeltaError, read_sealed

keys_app = typer.Typer(help="The data owner's Ed25519 signing keys.", no_args_is_help=True)
console = Console()
OWNER_KEY, OWNER_PUB = "owner.key", "owner.pub"

CoordinatorOption = Annotated[str, typer.Option("--coordinator", help="Coordinator address HOST:PORT.")]
CoordinatorKeyOption = Annotated[Path, typer.Option(help="The coordinator's public key (coordinator.pub), pinned.")]
JobOption = Annotated[str, typer.Option("--job", help="Job id.")]
CaOption = Annotated[Path | None, typer.Option(help="CA certificate for the coordinator's TLS certificate.")]
InsecureOption = Annotated[bool, typer.Option(help="Plain text, no TLS (localhost only).")]
DirOption = Annotated[Path | None, typer.Option("--dir", help="Key directory [default: $OFFSITE_HOME/client].")]


def default_client_dir() -> Path:
    return Path(os.environ.get("OFFSITE_HOME", Path.home() / ".offsite")).expanduser() / "client"


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def _client(coordinator: str, coordinator_key: Path, ca_cert: Path | None, insecure: bool) -> CoordinatorClient:
    if not insecure and ca_cert is None:
        raise _fail("give --ca-cert (TLS) or --insecure (plain text on localhost)")
    return CoordinatorClient(coordinator, coordinator_key=crypto.load_public_key(coordinator_key),
                             root_certificates=ca_cert.read_bytes() if ca_cert else None, insecure=insecure)


@keys_app.command("init")
def keys_init(directory: DirOption = None,
              force: Annotated[bool, typer.Option(help="Overwrite an existing key pair.")] = False) -> None:
    """Create the owner's Ed25519 key pair (owner.key, mode 0600, and owner.pub); print its key id."""
    directory = directory or default_client_dir()
    key = crypto.generate_signing_key()
    try:
        crypto.write_private_key(key, directory / OWNER_KEY, force=force)
        crypto.write_public_key(key.public_key(), directory / OWNER_PUB, force=force)
    except FileExistsError as error:
        raise _fail(str(error)) from error
    console.print(f"signing key {directory / OWNER_KEY}\npublic key  {directory / OWNER_PUB}\n"
                  f"key id      {crypto.key_id(key.public_key())}  (send owner.pub to the coordinator)")


def join(coordinator: CoordinatorOption, job: JobOption, coordinator_key: CoordinatorKeyOption,
         out: Annotated[Path, typer.Option(help="Where to keep the job's bundle.")] = Path("offsite-job"),
         ca_cert: CaOption = None, insecure: InsecureOption = False) -> None:
    """Fetch and verify the signed job manifest and the bundle (resumes a partial download)."""
    try:
        with _client(coordinator, coordinator_key, ca_cert, insecure) as client:
            info = client.get_job(job)
            bundle = client.download_bundle(info, out)
    except (grpc.RpcError, TransportError, ManifestError, BundleError, crypto.KeyFileError) as error:
        raise _fail(f"{getattr(error, 'details', lambda: '')() or error}") from error
    (out / "job.json").write_text(json.dumps({"job_id": info.job_id, "round": info.round,
                                              "bundle_digest": info.bundle_digest}, indent=2) + "\n")
    console.print(f"job {info.job_id} round {info.round} ({info.round_state}): bundle verified at {bundle.root}, "
                  f"{len(info.adapter_spec.tensors)} adapter tensors", highlight=False)


def submit(delta: Annotated[Path, typer.Argument(help="The adapter delta as .safetensors.")],
           coordinator: CoordinatorOption, job: JobOption, coordinator_key: CoordinatorKeyOption,
           round: Annotated[int, typer.Option("--round", help="Round number.")],
           num_examples: Annotated[int, typer.Option(help="Training examples behind the delta (its weight).")],
           owner_id: Annotated[str | None, typer.Option(help="Owner id [default: the key id].")] = None,
           upload_id: Annotated[str | None, typer.Option(help="Upload id [default: random]; reuse it to retry: the "
                                                              "sealed bytes are kept as DELTA.<id>.sealed.")]
           = None,
           key: Annotated[Path | None, typer.Option(help="Owner signing key [default: owner.key].")] = None,
           ca_cert: CaOption = None, insecure: InsecureOption = False) -> None:
    """Seal the delta to the coordinator's key, sign it, and upload it; print the signed receipt."""
    try:
        owner_key = crypto.load_private_key(key or default_client_dir() / OWNER_KEY)
        with _client(coordinator, coordinator_key, ca_cert, insecure) as client:
            info = client.get_job(job)
            upload_id = upload_id or uuid.uuid4().hex
            # The sealed bytes are kept, so a retry with the same upload id resends exactly them.
            kept = delta.with_name(f"{delta.name}.{upload_id}.sealed")
            if kept.is_file():
                sealed = read_sealed(kept)
            else:
                sealed = client.seal(info, round, delta.read_bytes(), owner_key, num_examples, upload_id,
                                     owner_id=owner_id)
                sealed.write(kept)
            receipt = client.submit_sealed(sealed)
    except (grpc.RpcError, TransportError, ManifestError, crypto.KeyFileError, OSError, SealedDeltaError) as error:
        detail = error.details() if isinstance(error, grpc.RpcError) else str(error)  # type: ignore[attr-defined]
        raise _fail(f"{detail} (retry with --upload-id {upload_id})" if upload_id else str(detail)) from error
    state = "already accepted" if receipt.already_accepted else "accepted"
    console.print(f"{state}: upload {receipt.upload_id}, blob {receipt.blob_sha256[:16]}, "
                  f"{receipt.num_examples} examples", highlight=False)
