"""Receiving a sealed delta: checks in a fixed order, then an all-or-nothing commit.

Before anything is written: preamble field sizes, header schema (other format versions refused by name), owner
registered, the owner's preamble signature, owner approved and not revoked, example-count cap; a known (owner,
upload id) is answered from its stored receipt once the preamble equals the stored one, without reading further;
otherwise round OPEN, slot free, context (job, round, owner key, spec, recipient key), declared size within what the
job's adapter spec implies and the job's caps, the data key unwrapped. Then one pass over the stream: each chunk is
written to a temporary file and authenticated and decrypted as it arrives, the trailer signature over the chunk
tags; strict safetensors parse, exact adapter spec, finite values, L2-norm bound; publish and commit.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.access import Caller
from coordinator.errors import (
    CoordinatorError,
    InvalidTransitionError,
    MalformedRequestError,
    NotEnrolledError,
    SlotTakenError,
    TooManyExamplesError,
    UploadTooLargeError,
)
from coordinator.jobs import num_examples_cap
from coordinator.records import Job, Owner, UploadRecord, now
from coordinator.storage import Storage
from protos.messages import RECEIPT_CONTEXT, Receipt, SignedDocument
from protos.sealed import (
    TRAILER_BYTES,
    ExpectedContext,
    SealedHeader,
    SizeLimitError,
    Trailer,
    TrailingDataError,
    TruncatedError,
    blob_id,
    check_context,
    check_preamble_fields,
    ciphertext_length,
    encode_preamble,
    max_plaintext_length,
    read_preamble,
    verify_preamble,
)
from protos.sealed_open import Unsealer, open_sealed
from protos.tensors import load_tensors, validate_delta


@dataclass(frozen=True)
class Accepted:
    receipt: SignedDocument
    already_accepted: bool


def _expected(storage: Storage, job: Job, owner: Owner, header: SealedHeader) -> ExpectedContext:
    storage.keyring.get(header.recipient_key_id)  # raises for a key this coordinator never had
    return ExpectedContext(job_id=job.job_id, round=header.round, owner_id=owner.owner_id,
                           sender_key_id=owner.key_id, adapter_spec_digest=job.adapter_spec.digest(),
                           recipient_key_id=header.recipient_key_id)


def max_plaintext_bytes(job: Job) -> int:
    """The job's cap on a delta's plaintext: what its adapter spec implies, and never above the configured cap."""
    return min(job.max_plaintext_bytes, max_plaintext_length(job.adapter_spec))


def validate_plaintext(job: Job, plaintext: bytearray) -> tuple[dict[str, torch.Tensor], str]:
    """Strict parse, exact spec, finiteness and norm bound; and the plaintext's sha256 for the receipt, taken on a
    second thread while the tensors are checked."""
    with ThreadPoolExecutor(max_workers=1) as hasher:
        digest = hasher.submit(lambda: hashlib.sha256(plaintext).hexdigest())
        tensors = load_tensors(plaintext)
        validate_delta(tensors, job.adapter_spec, max_norm=job.max_delta_norm)
        return tensors, digest.result()


def open_accepted_upload(storage: Storage, record: UploadRecord) -> dict[str, torch.Tensor]:
    """Re-open an accepted blob for aggregation: both signatures, every chunk's tag, the blob's address, and the
    validation again (one pass over the blob)."""
    path = storage.blobs.path(record.blob_sha256)
    with open(path, "rb") as stream:
        header = SealedHeader.from_bytes(read_preamble(stream)[0])
    store = storage.store
    job, owner = store.job(record.job_id), store.owner(record.owner_id)
    opened = open_sealed(path, recipient_private=storage.keyring.get(header.recipient_key_id),
                         sender_public=owner.public_key, expected=_expected(storage, job, owner, header),
                         max_plaintext_bytes=max_plaintext_bytes(job))
    if not hmac.compare_digest(opened.blob_id, record.blob_sha256):
        raise MalformedRequestError(f"blob {record.blob_sha256} changed at rest")
    return validate_plaintext(job, opened.plaintext)[0]


def receive_stream(unsealer: Unsealer, parts: Iterable[bytes], sink: BinaryIO, *, cap: int) -> bytes:
    """The receive path: every ciphertext part is authenticated and decrypted as it arrives and written to ``sink``
    on a second thread (one write in flight) while the next is decrypted; ``cap`` bounds the ciphertext bytes
    taken. Returns the trailer; :meth:`Unsealer.finish` is the caller's."""
    trailer: bytes | None = None
    received = 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future[int] | None = None
        for part in parts:
            if trailer is not None:
                raise TrailingDataError("data after the trailer")
            if isinstance(part, Trailer):
                if len(part) != TRAILER_BYTES:
                    raise TruncatedError(f"the trailer is {len(part)} bytes, {TRAILER_BYTES} expected")
                trailer = bytes(part)
                continue
            received += len(part)
            if received > cap:
                raise UploadTooLargeError(f"stream exceeds the job's cap of {cap} bytes")
            unsealer.update(part)
            if pending is not None:
                pending.result()
            pending = writer.submit(sink.write, part)
        if pending is not None:
            pending.result()
    if not unsealer.complete:
        raise TruncatedError(f"stream ended after {unsealer.received} of {unsealer.header.ciphertext_length} "
                             f"ciphertext bytes: the final chunk is missing")
    if trailer is None:
        raise TruncatedError("stream ended without the trailer")
    return trailer


def receive_delta(storage: Storage, signing_key: Ed25519PrivateKey, caller: Caller,
                  preamble: tuple[bytes, bytes, bytes], chunks: Iterable[bytes]) -> Accepted:
    """``caller``: the owner the call's metadata authenticated, enrolled in its job; the preamble must be its own.
    ``chunks``: the parts after the preamble, ciphertext ``bytes`` then the :class:`Trailer`."""
    store = storage.store
    header_json, wrapped_key, signature = preamble
    check_preamble_fields(header_json, wrapped_key, signature)
    header = SealedHeader.from_bytes(header_json)
    if (header.owner_id, header.job_id) != (caller.owner.owner_id, caller.job_id):
        raise NotEnrolledError(f"owner {caller.owner.owner_id!r} (job {caller.job_id!r}) sent a preamble of owner "
                               f"{header.owner_id!r} for job {header.job_id!r}")
    owner = store.owner(header.owner_id)  # an unknown owner is refused here
    verify_preamble(header_json, wrapped_key, signature, owner.public_key)  # authenticated before anything else
    owner = store.approved_owner(owner.owner_id)
    job = store.job(header.job_id)
    cap = num_examples_cap(store, job, header.owner_id)
    if header.num_examples > cap:  # an owner's claim is its weight in FedAvg: refused before anything is written
        raise TooManyExamplesError(f"an upload may claim at most {cap} examples (the cap max_num_examples), "
                                   f"this one claims {header.num_examples}")
    blob_prefix = encode_preamble(header_json, wrapped_key, signature)
    preamble_sha256 = hashlib.sha256(blob_prefix).hexdigest()
    existing = store.owner_upload(owner.owner_id, header.upload_id)
    if existing is not None:  # a retry: the stored receipt, without reading the ciphertext again
        if hmac.compare_digest(existing.preamble_sha256, preamble_sha256):
            return Accepted(SignedDocument(existing.receipt_json, existing.receipt_sig), True)
        raise SlotTakenError(f"upload id {header.upload_id!r} is taken by different bytes")
    state = store.round_state(job.job_id, header.round)
    if state != "OPEN":
        raise InvalidTransitionError(f"job {job.job_id!r} round {header.round} is {state}, not OPEN")
    if store.slot(job.job_id, header.round, owner.owner_id) is not None:
        raise SlotTakenError(f"owner {owner.owner_id!r} already has an accepted upload in job {job.job_id!r} "
                             f"round {header.round}")
    check_context(header, _expected(storage, job, owner, header))
    limit = max_plaintext_bytes(job)
    if header.plaintext_length > limit:
        raise SizeLimitError(f"a sealed delta of {header.ciphertext_length} ciphertext bytes exceeds the "
                             f"{ciphertext_length(limit, header.chunk_size)} that job {job.job_id!r} allows "
                             f"({limit} plaintext bytes at most for its adapter spec)")
    if len(blob_prefix) + header.ciphertext_length + TRAILER_BYTES > job.max_upload_bytes:
        raise UploadTooLargeError(f"a sealed delta of {header.ciphertext_length} bytes exceeds the job's cap of "
                                  f"{job.max_upload_bytes}")
    unsealer = Unsealer(header, header_json, wrapped_key, storage.keyring.get(header.recipient_key_id))

    storage.check_free_space(len(blob_prefix) + header.ciphertext_length + TRAILER_BYTES)  # before any byte lands
    stream, temp = storage.blobs.new_temp()
    published = False
    try:
        stream.write(blob_prefix)
        trailer = receive_stream(unsealer, chunks, stream, cap=job.max_upload_bytes - len(blob_prefix))
        tags_digest = unsealer.finish(trailer, owner.public_key)
        stream.write(trailer)
        plaintext_sha256 = validate_plaintext(job, unsealer.plaintext)[1]
        digest = blob_id(blob_prefix, tags_digest, trailer)
        final = storage.blobs.publish(stream, temp, digest)
        published = True
        try:
            return _commit(storage, signing_key, header, digest, plaintext_sha256, preamble_sha256)
        except CoordinatorError:
            if store.owner_upload(owner.owner_id, header.upload_id) is None:
                final.unlink(missing_ok=True)
            raise
    finally:
        if not stream.closed:
            stream.close()
        if not published:
            temp.unlink(missing_ok=True)


def _commit(storage: Storage, signing_key: Ed25519PrivateKey, header: SealedHeader, digest: str,
            plaintext_sha256: str, preamble_sha256: str) -> Accepted:
    store = storage.store
    receipt = Receipt(upload_id=header.upload_id, job_id=header.job_id, round=header.round, owner_id=header.owner_id,
                      blob_sha256=digest, plaintext_sha256=plaintext_sha256,
                      num_examples=header.num_examples, accepted_at=now())
    doc = SignedDocument.create(receipt.fields(), signing_key, RECEIPT_CONTEXT)
    record = UploadRecord(header.upload_id, header.job_id, header.round, header.owner_id, digest,
                          plaintext_sha256, header.num_examples, receipt.accepted_at, doc.payload, doc.signature,
                          preamble_sha256)
    try:
        with store.transaction() as db:
            state = store.round_state(header.job_id, header.round)
            if state != "OPEN":
                raise InvalidTransitionError(f"job {header.job_id!r} round {header.round} closed during the upload")
            store.insert_upload(db, record)
    except sqlite3.IntegrityError as error:
        # A concurrent retry of the same upload won the race: answer as for a replay.
        winner = store.owner_upload(header.owner_id, header.upload_id)
        if winner is not None and hmac.compare_digest(winner.preamble_sha256, preamble_sha256):
            return Accepted(SignedDocument(winner.receipt_json, winner.receipt_sig), True)
        raise SlotTakenError(f"the slot for owner {header.owner_id!r} was taken concurrently") from error
    return Accepted(doc, False)
