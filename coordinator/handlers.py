"""Pure request handlers: protobuf request and server state in, protobuf response out, domain errors raised."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.access import Caller
from coordinator.errors import MalformedRequestError, NotEnrolledError, OutOfRangeError
from coordinator.intake import receive_delta
from coordinator.jobs import bundle_tar
from coordinator.state import StateStore, now
from coordinator.storage import Storage
from protos import serde
from protos.crypto import key_id, public_key_bytes
from protos.delta_keys import x25519_key_id, x25519_public_bytes
from protos.manifests import BundleRef, JobManifest, KeyRef, Limits
from protos.messages import JOB_MANIFEST_CONTEXT, BundleChunkInfo, RoundStatusInfo, SignedDocument
from protos.offsite.v1 import coordinator_pb2 as pb

DEFAULT_BUNDLE_CHUNK = 1 << 20  # larger chunks measured slower over loopback gRPC
MAX_BUNDLE_CHUNK = 16 << 20


@dataclass
class ServerState:
    storage: Storage
    signing_key: Ed25519PrivateKey
    clock: Callable[[], float] = time.time

    @property
    def store(self) -> StateStore:
        return self.storage.store


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def job_manifest(state: ServerState, job_id: str) -> SignedDocument:
    job = state.store.job(job_id)
    round, round_state = state.store.latest_round(job_id)
    delta_key = state.storage.keyring.current().public_key()
    coordinator_key = state.signing_key.public_key()
    manifest = JobManifest(
        job_id=job.job_id, round=round, round_state=round_state,
        bundle=BundleRef(digest=job.bundle_digest, tar_sha256=job.bundle_tar_sha256, size=job.bundle_size),
        adapter_spec=job.adapter_spec,
        coordinator=KeyRef(key_id=key_id(coordinator_key), public_key=_b64(public_key_bytes(coordinator_key))),
        delta_key=KeyRef(key_id=x25519_key_id(delta_key), public_key=_b64(x25519_public_bytes(delta_key))),
        limits=Limits(max_upload_bytes=job.max_upload_bytes, max_plaintext_bytes=job.max_plaintext_bytes,
                      chunk_size=job.chunk_size, max_delta_norm_ratio=repr(job.max_delta_norm_ratio),
                      max_num_examples=job.max_num_examples),
        issued_at=now(),
    )
    return SignedDocument.create(manifest.to_json(), state.signing_key, JOB_MANIFEST_CONTEXT)


def _same_job(requested: str, caller: Caller) -> None:
    if requested != caller.job_id:  # the signature covers the caller's job, not the request's
        raise NotEnrolledError(f"owner {caller.owner.owner_id!r} signed for job {caller.job_id!r}, asked for "
                               f"{requested!r}")


def get_job(request: pb.GetJobRequest, state: ServerState, caller: Caller) -> pb.SignedJobManifest:
    _same_job(request.job_id, caller)
    return serde.signed_manifest_to_pb(job_manifest(state, request.job_id))


def download_bundle(request: pb.DownloadBundleRequest, state: ServerState, caller: Caller) -> Iterator[pb.BundleChunk]:
    _same_job(request.job_id, caller)
    path = bundle_tar(state.storage, request.job_id)
    chunk_size = min(request.chunk_size or DEFAULT_BUNDLE_CHUNK, MAX_BUNDLE_CHUNK)
    with open(path, "rb") as stream:
        size = path.stat().st_size
        if request.offset > size:
            raise OutOfRangeError(f"offset {request.offset} is past the bundle's {size} bytes")
        stream.seek(request.offset)
        offset = request.offset
        # No per-chunk digest: the client checks the whole tar against the signed manifest's sha256 and size.
        while offset < size and (data := stream.read(min(chunk_size, size - offset))):
            yield serde.bundle_chunk_to_pb(BundleChunkInfo(offset, data, size))
            offset += len(data)


def _chunks(requests: Iterator[pb.SubmitDeltaRequest | None]) -> Iterator[bytes]:
    for message in requests:
        chunk = serde.chunk_from_pb(message) if message is not None else None
        if chunk is None:
            raise MalformedRequestError("expected a ciphertext chunk after the preamble")
        yield chunk


def submit_delta(requests: Iterator[pb.SubmitDeltaRequest | None], state: ServerState,
                 caller: Caller) -> pb.SignedReceipt:
    """``caller`` was authenticated from the call's metadata before the first message was read."""
    first = next(requests, None)
    preamble = serde.preamble_from_pb(first) if first is not None else None
    if preamble is None:
        raise MalformedRequestError("the first message of SubmitDelta must be a well-formed preamble")
    accepted = receive_delta(state.storage, state.signing_key, caller, preamble, _chunks(requests))
    return serde.receipt_to_pb(accepted.receipt, accepted.already_accepted)


def round_status(request: pb.GetRoundStatusRequest, state: ServerState, caller: Caller) -> pb.RoundStatus:
    _same_job(request.job_id, caller)
    status, reason, uploads, examples = state.store.round_status(request.job_id, request.round)
    return serde.round_status_to_pb(RoundStatusInfo(request.job_id, request.round, status, reason, uploads, examples))
