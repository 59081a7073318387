"""Receiving a sealed delta: checks in a fixed order, then an all-or-nothing commit.

Order: byte cap, header schema, owner approved and not revoked, round OPEN, signature, streaming decryption with
a running cap, plaintext digest, strict safetensors parse, exact adapter spec, finite values, L2-norm bound.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.errors import (
    CoordinatorError,
    InvalidTransitionError,
    MalformedRequestError,
    SlotTakenError,
    UploadTooLargeError,
)
from coordinator.state import Job, Owner, UploadRecord, now
from coordinator.storage import Storage
from protos.crypto import sha256_file
from protos.messages import RECEIPT_CONTEXT, Receipt, SignedDocument
from protos.sealed import (
    MAX_HEADER_BYTES,
    ExpectedContext,
    SealedHeader,
    TrailingDataError,
    TruncatedError,
    check_context,
    encode_preamble,
    open_sealed,
    read_preamble,
)
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


def open_and_validate(storage: Storage, job: Job, owner: Owner, header: SealedHeader, path: Path,
                      ciphertext_sha256: bytes | None = None) -> dict[str, torch.Tensor]:
    """Signature, decryption, plaintext digest, strict parse, spec, finiteness and norm bound."""
    opened = open_sealed(path, recipient_private=storage.keyring.get(header.recipient_key_id),
                         sender_public=owner.public_key, expected=_expected(storage, job, owner, header),
                         max_plaintext_bytes=job.max_plaintext_bytes, ciphertext_sha256=ciphertext_sha256)
    tensors = load_tensors(opened.plaintext)
    validate_delta(tensors, job.adapter_spec, max_norm=job.max_delta_norm)
    return tensors


def open_accepted_upload(storage: Storage, record: UploadRecord) -> dict[str, torch.Tensor]:
    """Re-open an accepted blob for aggregation: digest at rest, signature, decryption and validation again."""
    path = storage.blobs.path(record.blob_sha256)
    digest = sha256_file(path)
    if not hmac.compare_digest(digest, record.blob_sha256):
        raise MalformedRequestError(f"blob {record.blob_sha256} changed at rest")
    with open(path, "rb") as stream:
        header = SealedHeader.from_bytes(read_preamble(stream)[0])
    store = storage.store
    return open_and_validate(storage, store.job(record.job_id), store.owner(record.owner_id), header, path)


def receive_delta(storage: Storage, signing_key: Ed25519PrivateKey, preamble: tuple[bytes, bytes, bytes],
                  chunks: Iterable[bytes]) -> Accepted:
    store = storage.store
    header_json, wrapped_key, signature = preamble
    if len(header_json) > MAX_HEADER_BYTES or len(wrapped_key) > 256 or len(signature) > 256:
        raise UploadTooLargeError("preamble fields exceed their size limits")
    header = SealedHeader.from_bytes(header_json)
    job = store.job(header.job_id)
    blob_prefix = encode_preamble(header_json, wrapped_key, signature)
    if len(blob_prefix) + header.ciphertext_length > job.max_upload_bytes:
        raise UploadTooLargeError(f"a sealed delta of {header.ciphertext_length} bytes exceeds the job's cap of "
                                  f"{job.max_upload_bytes}")
    owner = store.approved_owner(header.owner_id)
    existing = store.upload(header.upload_id)
    if existing is None:
        state = store.round_state(job.job_id, header.round)
        if state != "OPEN":
            raise InvalidTransitionError(f"job {job.job_id!r} round {header.round} is {state}, not OPEN")
        if store.slot(job.job_id, header.round, owner.owner_id) is not None:
            raise SlotTakenError(f"owner {owner.owner_id!r} already has an accepted upload in job {job.job_id!r} "
                                 f"round {header.round}")
        check_context(header, _expected(storage, job, owner, header))

    stream, temp = storage.blobs.new_temp()
    published = False
    try:
        blob_hash, ciphertext_hash, received = hashlib.sha256(blob_prefix), hashlib.sha256(), 0
        stream.write(blob_prefix)
        for chunk in chunks:
            received += len(chunk)
            if len(blob_prefix) + received > job.max_upload_bytes:
                raise UploadTooLargeError(f"stream exceeds the job's cap of {job.max_upload_bytes} bytes")
            if received > header.ciphertext_length:
                raise TrailingDataError(f"data after the final chunk ({received} > {header.ciphertext_length} "
                                        f"ciphertext bytes)")
            blob_hash.update(chunk)
            ciphertext_hash.update(chunk)
            stream.write(chunk)
        if received < header.ciphertext_length:
            raise TruncatedError(f"stream ended after {received} of {header.ciphertext_length} ciphertext bytes: "
                                 f"the final chunk is missing")
        digest = blob_hash.hexdigest()
        if existing is not None:
            if existing.owner_id == owner.owner_id and hmac.compare_digest(existing.blob_sha256, digest):
                return Accepted(SignedDocument(existing.receipt_json, existing.receipt_sig), True)
            raise SlotTakenError(f"upload id {header.upload_id!r} is taken by different bytes")
        stream.flush()
        open_and_validate(storage, job, owner, header, temp, ciphertext_hash.digest())
        final = storage.blobs.publish(stream, temp, digest)
        published = True
        try:
            return _commit(storage, signing_key, header, digest)
        except CoordinatorError:
            if store.upload(header.upload_id) is None:
                final.unlink(missing_ok=True)
            raise
    finally:
        if not stream.closed:
            stream.close()
        if not published:
            temp.unlink(missing_ok=True)


def _commit(storage: Storage, signing_key: Ed25519PrivateKey, header: SealedHeader, digest: str) -> Accepted:
    store = storage.store
    receipt = Receipt(upload_id=header.upload_id, job_id=header.job_id, round=header.round, owner_id=header.owner_id,
                      blob_sha256=digest, plaintext_sha256=header.plaintext_sha256,
                      num_examples=header.num_examples, accepted_at=now())
    doc = SignedDocument.create(receipt.fields(), signing_key, RECEIPT_CONTEXT)
    record = UploadRecord(header.upload_id, header.job_id, header.round, header.owner_id, digest,
                          header.plaintext_sha256, header.num_examples, receipt.accepted_at, doc.payload,
                          doc.signature)
    try:
        with store.transaction() as db:
            state = store.round_state(header.job_id, header.round)
            if state != "OPEN":
                raise InvalidTransitionError(f"job {header.job_id!r} round {header.round} closed during the upload")
            store.insert_upload(db, record)
    except sqlite3.IntegrityError as error:
        # A concurrent retry of the same upload won the race: answer as for a replay.
        winner = store.upload(header.upload_id)
        if winner is not None and winner.blob_sha256 == digest:
            return Accepted(SignedDocument(winner.receipt_json, winner.receipt_sig), True)
        raise SlotTakenError(f"the slot for owner {header.owner_id!r} was taken concurrently") from error
    return Accepted(doc, False)
