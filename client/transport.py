"""The data owner's side of the wire: fetch and verify the job, download the bundle, seal and submit deltas.

Every answer that matters is verified against the pinned coordinator key: the job manifest, the bundle (chunk by
chunk, as a whole, and by its signed manifest) and upload receipts. gRPC errors other than UNAVAILABLE surface as
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
from protos.messages import JOB_MANIFEST_CONTEXT, RECEIPT_CONTEXT, BundleChunkInfo, JobInfo, Receipt, RoundStatusInfo
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.offsite.v1.coordinator_pb2_grpc import CoordinatorStub
from protos.sealed import SealedDelta, seal_delta

MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class TransportError(ClientError):
    """The coordinator's answer failed verification (manifest, bundle chunk, bundle, receipt)."""


def _store_chunk(out: BinaryIO, whole: hashlib._Hash, chunk: BundleChunkInfo) -> None:
    if not hmac.compare_digest(hashlib.sha256(chunk.data).digest(), chunk.sha256):
        raise TransportError(f"chunk at offset {chunk.offset} fails its sha256")
    out.write(chunk.data)
    whole.update(chunk.data)


class CoordinatorClient:
    def __init__(self, address: str, *, coordinator_key: Ed25519PublicKey, root_certificates: bytes | None = None,
                 insecure: bool = False, client_key: bytes | None = None, client_cert: bytes | None = None,
                 retries: int = 5, backoff_s: float = 0.2) -> None:
        if insecure:
            self.channel = grpc.insecure_channel(address, options=OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            self.channel = grpc.secure_channel(address, credentials, options=OPTIONS)
        self.stub = CoordinatorStub(self.channel)
        self.coordinator_key = coordinator_key
        self.retries, self.backoff_s = retries, backoff_s

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
        doc = serde.signed_manifest_from_pb(self.stub.GetJob(pb.GetJobRequest(job_id=job_id)))
        job = JobInfo.from_manifest(doc.open(self.coordinator_key, JOB_MANIFEST_CONTEXT), self.coordinator_key)
        if job.job_id != job_id:
            raise TransportError(f"asked for job {job_id!r}, got a manifest for {job.job_id!r}")
        return job

    def download_bundle(self, job: JobInfo, dest_dir: Path, *, chunk_size: int = 0) -> VerifiedBundle:
        """Download (resuming a partial ``bundle.tar.part``), check every chunk and the whole, verify, extract."""
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
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        tar, part = dest_dir / "bundle.tar", dest_dir / "bundle.tar.part"
        if tar.is_file() and hmac.compare_digest(sha256_file(tar), job.bundle_tar_sha256):
            return tar
        if not hmac.compare_digest(self._fetch(job, part, chunk_size), job.bundle_tar_sha256):
            part.unlink()
            raise TransportError("the downloaded bundle's sha256 differs from the signed job manifest's")
        part.replace(tar)
        return tar

    def _fetch(self, job: JobInfo, part: Path, chunk_size: int) -> str:
        """Resume ``part`` up to the bundle's size; return the sha256 of the whole, hashed as it arrives."""
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
            try:
                request = pb.DownloadBundleRequest(job_id=job.job_id, offset=offset, chunk_size=chunk_size)
                # Chunks are checked, hashed and written on a second thread (hashlib releases the GIL) while the
                # next one arrives; one chunk in flight at most.
                with open(part, "ab") as out, ThreadPoolExecutor(max_workers=1) as writer:
                    pending: Future[None] | None = None
                    for message in self.stub.DownloadBundle(request):
                        chunk = serde.bundle_chunk_from_pb(message)
                        if chunk.offset != offset or chunk.total_size != job.bundle_size:
                            raise TransportError(f"chunk at offset {chunk.offset}, expected {offset}")
                        if pending is not None:
                            pending.result()
                        pending = writer.submit(_store_chunk, out, whole, chunk)
                        offset += len(chunk.data)
                    if pending is not None:
                        pending.result()
                break
            except grpc.RpcError as error:
                self._pause(attempt, error)
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
                response = self.stub.SubmitDelta(serde.sealed_to_requests(sealed))
                break
            except grpc.RpcError as error:
                self._pause(attempt, error)
        doc, already = serde.receipt_from_pb(response)
        receipt = Receipt.from_fields(doc.open(self.coordinator_key, RECEIPT_CONTEXT), already)
        header = sealed.header
        if (receipt.upload_id, receipt.job_id, receipt.round, receipt.owner_id, receipt.num_examples) != (
                header.upload_id, header.job_id, header.round, header.owner_id, header.num_examples):
            raise TransportError("the receipt is for another upload")
        return receipt

    def round_status(self, job_id: str, round: int) -> RoundStatusInfo:
        return serde.round_status_from_pb(self.stub.GetRoundStatus(pb.GetRoundStatusRequest(job_id=job_id,
                                                                                            round=round)))
