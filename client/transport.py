"""The data owner's side of the wire: fetch and verify the job, download the bundle, seal and submit deltas.

Every answer that matters is verified against the pinned coordinator key: the job manifest, the bundle (its size and
whole-tar sha256 from the signed job manifest, hashed once as it is written, then its own signed manifest) and
upload receipts. gRPC errors other than UNAVAILABLE surface as
``grpc.RpcError`` with the server's status code and message.
"""

from __future__ import annotations

import hashlib
import hmac
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from client.errors import ClientError
from protos import serde
from protos.bundle import VerifiedBundle, verify_bundle
from protos.crypto import key_id, sha256_file
from protos.messages import JOB_MANIFEST_CONTEXT, RECEIPT_CONTEXT, JobInfo, Receipt, RoundStatusInfo
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.offsite.v1.coordinator_pb2_grpc import CoordinatorStub
from protos.request_auth import request_metadata
from protos.sealed import SealedDelta, is_sha256_hex, seal_delta

MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
           # the largest HTTP/2 frames we accept: bundle chunks arrive in far fewer frames (faster downloads)
           ("grpc.http2.max_frame_size", (1 << 24) - 1)]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class TransportError(ClientError):
    """The coordinator's answer failed verification (manifest, bundle chunk, bundle, receipt)."""


def _store_chunk(out: BinaryIO, whole: hashlib._Hash, data: bytes) -> None:
    """Write a chunk and hash it: the download's one pass over its bytes (both release the GIL)."""
    out.write(data)
    whole.update(data)


def _check_digests(job: JobInfo) -> None:
    """The manifest's digests name files and directories: nothing but 64 lowercase hex characters is used."""
    for name, value in (("bundle digest", job.bundle_digest), ("bundle tar sha256", job.bundle_tar_sha256)):
        if not is_sha256_hex(value):
            raise TransportError(f"the job manifest's {name} {value!r} is not 64 lowercase hex characters")


class CoordinatorClient:
    """One data owner's connection: every call is signed with ``owner_key`` (see :mod:`protos.request_auth`);
    ``owner_id`` defaults to the key id (what ``owners add`` registers by default)."""

    def __init__(self, address: str, *, coordinator_key: Ed25519PublicKey, owner_key: Ed25519PrivateKey,
                 owner_id: str | None = None, root_certificates: bytes | None = None,
                 insecure: bool = False, client_key: bytes | None = None, client_cert: bytes | None = None,
                 retries: int = 5, backoff_s: float = 0.2) -> None:
        if insecure:
            self.channel = grpc.insecure_channel(address, options=OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            self.channel = grpc.secure_channel(address, credentials, options=OPTIONS)
        self.stub = CoordinatorStub(self.channel)
        self.coordinator_key = coordinator_key
        self.owner_key, self.owner_id = owner_key, owner_id or key_id(owner_key.public_key())
        self.retries, self.backoff_s = retries, backoff_s

    def _auth(self, method: str, job_id: str) -> list[tuple[str, str | bytes]]:
        """Fresh signed metadata for one call (a retry signs again: nonces are single use)."""
        return request_metadata(self.owner_key, self.owner_id, method, job_id, time.time())

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _pause(self, attempt: int, error: grpc.RpcError) -> None:
        if error.code() not in RETRYABLE or attempt >= self.retries:
            raise error
        time.sleep(self.backoff_s * 2**attempt)

    def get_job(self, job_id: str) -> JobInfo:
        """The job manifest, verified with the pinned coordinator key."""
        doc = serde.signed_manifest_from_pb(self.stub.GetJob(pb.GetJobRequest(job_id=job_id),
                                                             metadata=self._auth("GetJob", job_id)))
        job = JobInfo.from_manifest(doc.open(self.coordinator_key, JOB_MANIFEST_CONTEXT), self.coordinator_key)
        if job.job_id != job_id:
            raise TransportError(f"asked for job {job_id!r}, got a manifest for {job.job_id!r}")
        return job

    def download_bundle(self, job: JobInfo, dest_dir: Path, *, chunk_size: int = 0) -> VerifiedBundle:
        """Download (resuming a partial ``bundle.tar.part``), check the whole against the signed job manifest,
        verify, extract."""
        _check_digests(job)
        tar = self.fetch_verified_tar(job, dest_dir, chunk_size=chunk_size)
        extract = Path(dest_dir) / "bundle"
        shutil.rmtree(extract, ignore_errors=True)
        extract.mkdir()
        verified = verify_bundle(tar, self.coordinator_key, extract_to=extract)
        if not hmac.compare_digest(verified.digest, job.bundle_digest):
            raise TransportError("the bundle's manifest digest differs from the signed job manifest's")
        return verified

    def fetch_verified_tar(self, job: JobInfo, dest_dir: Path, *, chunk_size: int = 0) -> Path:
        """``dest_dir/bundle.tar``, its sha256 matching the signed job manifest (downloaded only if needed)."""
        _check_digests(job)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        tar, part = dest_dir / "bundle.tar", dest_dir / "bundle.tar.part"
        if tar.is_file() and hmac.compare_digest(sha256_file(tar), job.bundle_tar_sha256):
            return tar
        try:
            digest = self._fetch(job, part, chunk_size)
        except TransportError:
            part.unlink(missing_ok=True)  # nothing kept from a coordinator that broke the contract
            raise
        if not hmac.compare_digest(digest, job.bundle_tar_sha256):
            part.unlink()
            raise TransportError("the downloaded bundle's sha256 differs from the signed job manifest's")
        part.replace(tar)
        return tar

    def _fetch(self, job: JobInfo, part: Path, chunk_size: int) -> str:
        """Resume ``part`` up to the bundle's size; return the sha256 of the whole, each byte hashed once, as it is
        written. A coordinator that sends more than the manifest's ``bundle_size`` is cut off at once."""
        if part.exists() and part.stat().st_size > job.bundle_size:
            part.unlink()
        whole = hashlib.sha256()
        if part.exists():
            with open(part, "rb") as prefix:
                while block := prefix.read(1 << 22):
                    whole.update(block)
        for attempt in range(self.retries + 1):
            offset = part.stat().st_size if part.exists() else 0
            if offset == job.bundle_size:
                break
            request = pb.DownloadBundleRequest(job_id=job.job_id, offset=offset, chunk_size=chunk_size)
            call = self.stub.DownloadBundle(request, metadata=self._auth("DownloadBundle", job.job_id))
            try:
                # Chunks are written and hashed on a second thread while the next one arrives; one in flight.
                with open(part, "ab") as out, ThreadPoolExecutor(max_workers=1) as writer:
                    pending: Future[None] | None = None
                    try:
                        for message in call:
                            chunk = serde.bundle_chunk_from_pb(message)
                            if chunk.offset != offset:
                                raise TransportError(f"chunk at offset {chunk.offset}, expected {offset}")
                            if offset + len(chunk.data) > job.bundle_size:
                                raise TransportError(f"the coordinator sent more than the bundle's {job.bundle_size} "
                                                     f"bytes (the signed job manifest's bundle size)")
                            if chunk.total_size != job.bundle_size:
                                raise TransportError(f"the coordinator announces a bundle of {chunk.total_size} bytes, "
                                                     f"the signed job manifest {job.bundle_size}")
                            if pending is not None:
                                pending.result()
                            pending = writer.submit(_store_chunk, out, whole, chunk.data)
                            offset += len(chunk.data)
                    finally:
                        if pending is not None:
                            pending.result()
                break
            except grpc.RpcError as error:
                self._pause(attempt, error)
            finally:
                call.cancel()  # stop reading (a no-op once the stream has ended)
        return whole.hexdigest()

    def seal(self, job: JobInfo, round: int, delta: dict[str, torch.Tensor] | bytes, owner_key: Ed25519PrivateKey,
             num_examples: int, upload_id: str | None = None, *, owner_id: str | None = None) -> SealedDelta:
        return seal_delta(delta, job_id=job.job_id, round=round, owner_id=owner_id or key_id(owner_key.public_key()),
                          upload_id=upload_id or uuid.uuid4().hex, adapter_spec_digest=job.adapter_spec.digest(),
                          num_examples=num_examples, owner_key=owner_key, recipient_public=job.delta_public_key,
                          chunk_size=job.limits.chunk_size)

    def submit_delta(self, job: JobInfo, round: int, delta: dict[str, torch.Tensor] | bytes,
                     owner_key: Ed25519PrivateKey, num_examples: int, upload_id: str | None = None, *,
                     owner_id: str | None = None) -> Receipt:
        """Seal once, then upload; on UNAVAILABLE, resend the same bytes with the same upload id.

        ``owner_id`` defaults to the owner's key id (what ``owners add`` registers by default).
        """
        return self.submit_sealed(self.seal(job, round, delta, owner_key, num_examples, upload_id,
                                            owner_id=owner_id))

    def submit_sealed(self, sealed: SealedDelta) -> Receipt:
        for attempt in range(self.retries + 1):
            try:
                response = self.stub.SubmitDelta(serde.sealed_to_requests(sealed),
                                                 metadata=self._auth("SubmitDelta", sealed.header.job_id))
                break
            except grpc.RpcError as error:
                self._pause(attempt, error)
        doc, already = serde.receipt_from_pb(response)
        receipt = Receipt.from_fields(doc.open(self.coordinator_key, RECEIPT_CONTEXT), already)
        header = sealed.header
        if (receipt.upload_id, receipt.job_id, receipt.round, receipt.owner_id, receipt.num_examples) != (
                header.upload_id, header.job_id, header.round, header.owner_id, header.num_examples):
            raise TransportError("the receipt is for another upload")
        if not hmac.compare_digest(receipt.blob_sha256, sealed.blob_id()):
            raise TransportError("the receipt names another blob than the one sent")
        return receipt

    def round_status(self, job_id: str, round: int) -> RoundStatusInfo:
        request = pb.GetRoundStatusRequest(job_id=job_id, round=round)
        return serde.round_status_from_pb(self.stub.GetRoundStatus(request,
                                                                   metadata=self._auth("GetRoundStatus", job_id)))
