"""Pure request handlers: protobuf request and server state in, protobuf response out, domain errors raised."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.access import AdminCaller, Caller
from coordinator.errors import AuthenticationError, MalformedRequestError, NotEnrolledError, OutOfRangeError
from coordinator.intake import receive_delta
from coordinator.jobs import bundle_tar
from coordinator.progress import RoundRecord
from coordinator.records import now
from coordinator.round_service import RoundKeeper
from coordinator.state import StateStore
from coordinator.storage import Storage
from protos import serde
from protos.crypto import key_id, public_key_bytes
from protos.delta_keys import x25519_key_id, x25519_public_bytes
from protos.documents import DocumentError
from protos.manifests import BundleRef, JobManifest, KeyRef, Limits
from protos.messages import (
    JOB_MANIFEST_CONTEXT,
    AggregatedRoundInfo,
    BundleChunkInfo,
    OpenedRoundInfo,
    RoundStatusInfo,
    SignedDocument,
)
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.round_config import RoundConfig, RoundConfigError
from protos.round_message import adapter_bytes, adapter_sha256

DEFAULT_BUNDLE_CHUNK = 1 << 20  # larger chunks measured slower over loopback gRPC
MAX_BUNDLE_CHUNK = 16 << 20


@dataclass
class ServerState:
    storage: Storage
    signing_key: Ed25519PrivateKey
    clock: Callable[[], float] = time.time
    checkpoint_root: Path | None = None  # each job's checkpoints in CHECKPOINT_ROOT/JOB_ID (default STATE/checkpoints)
    rounds_lock: threading.Lock = field(default_factory=threading.Lock)  # one admin round call at a time

    @property
    def store(self) -> StateStore:
        return self.storage.store

    @property
    def rounds(self) -> RoundKeeper:
        root = self.checkpoint_root if self.checkpoint_root is not None else self.storage.dir / "checkpoints"
        return RoundKeeper(self.storage, self.signing_key, root)


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


# -- admin calls (the ServerApp) ------------------------------------------------------------------------------

def _admin_job(requested: str, admin: AdminCaller) -> None:
    if requested != admin.job_id:
        raise AuthenticationError(f"admin key {admin.key_id!r} signed for job {admin.job_id!r}, asked for "
                                  f"{requested!r}")


def _document(raw: bytes, kind: type[RoundConfig] | type[RoundRecord], what: str) -> RoundConfig | RoundRecord:
    try:
        return kind.from_json(json.loads(raw), what)
    except (ValueError, DocumentError, RoundConfigError) as error:
        raise MalformedRequestError(f"{what} is not a valid document: {error}") from error


def open_round(request: pb.OpenRoundRequest, state: ServerState, admin: AdminCaller) -> pb.OpenedRound:
    _admin_job(request.job_id, admin)
    config = _document(request.round_config_json, RoundConfig, "round_config_json")
    assert isinstance(config, RoundConfig)
    with state.rounds_lock:
        opened = state.rounds.open_round(request.job_id, request.round, config)
    return serde.opened_round_to_pb(OpenedRoundInfo(
        opened.state, opened.done, opened.message, opened.signature,
        adapter_bytes(opened.adapter) if opened.adapter is not None else b""))


def aggregate_round(request: pb.AggregateRoundRequest, state: ServerState, admin: AdminCaller) -> pb.AggregatedRound:
    _admin_job(request.job_id, admin)
    report = _document(request.report_json, RoundRecord, "report_json") if request.report_json else None
    assert report is None or isinstance(report, RoundRecord)
    with state.rounds_lock:
        result = state.rounds.aggregate_round(request.job_id, request.round, max(1, request.min_deltas), report)
    return serde.aggregated_round_to_pb(AggregatedRoundInfo(
        json.dumps(result.record.to_json()).encode(), adapter_bytes(result.adapter), adapter_sha256(result.adapter)))
