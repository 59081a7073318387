"""Tampered, misplaced and malformed sealed deltas (format v2), and a coordinator that breaks the download contract:
each ends with a typed status or error, nothing written, still serving."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save

from client.transport import TransportError
from coordinator.handlers import job_manifest
from coordinator.jobs import bundle_tar
from protos import serde
from protos.crypto import canonical_json, key_id, sign
from protos.messages import JOB_MANIFEST_CONTEXT, JobInfo, ManifestError, SignedDocument
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.sealed import PREAMBLE_CONTEXT, SealedHeader, max_plaintext_length, preamble_message
from protos.tensors import load_tensors, validate_delta
from tests.wire_support import (
    SPEC,
    SealedDelta,
    Wire,
    good_delta,
    requests,
    resign,
    with_header,
)

pytest_plugins = ("tests.wire_support",)

CODE = grpc.StatusCode


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def chunks_of(sealed: SealedDelta) -> list[bytes]:
    return [bytes(c) for c in sealed.chunks()]


@pytest.fixture
def temps(wire: Wire, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every temporary file the coordinator opens for an upload (refusals before the first chunk open none)."""
    made: list[Path] = []
    original = wire.blobs.new_temp

    def counting():  # type: ignore[no-untyped-def]
        stream, path = original()
        made.append(path)
        return stream, path

    monkeypatch.setattr(wire.blobs, "new_temp", counting)
    return made


def sender_of(wire: Wire, messages: list) -> tuple[str, str]:  # type: ignore[type-arg]
    """Who sends a (tampered) upload: the owner and job its header names, as a relaying attacker would sign its
    call; alice and jobA when the header does not parse."""
    try:
        preamble = serde.preamble_from_pb(messages[0])
        header = SealedHeader.from_bytes(preamble[0]) if preamble is not None else None
    except Exception:  # noqa: BLE001 - a header tampered past parsing
        header = None
    if header is None or header.owner_id not in wire.owners:
        return "alice", "jobA"
    return header.owner_id, header.job_id


def expect(wire: Wire, messages: list, code: grpc.StatusCode, words: str) -> None:  # type: ignore[type-arg]
    owner, job_id = sender_of(wire, messages)
    with pytest.raises(grpc.RpcError) as caught:
        wire.send(messages, owner=owner, job_id=job_id)
    assert caught.value.code() == code, caught.value.details()
    assert words.lower() in caught.value.details().lower(), caught.value.details()
    wire.assert_nothing_written()


def accepted_afterwards(wire: Wire, sealed: SealedDelta) -> None:
    """The untampered delta still goes through: nothing was half written and no slot was taken."""
    receipt = wire.submit(sealed)
    assert not receipt.already_accepted
    assert receipt.blob_sha256 == sealed.blob_id()  # the owner can recompute the blob's address
    assert wire.store.round_status("jobA", 1)[2] == 1


def test_valid_delta_is_accepted(wire: Wire) -> None:
    sealed = wire.seal()
    accepted_afterwards(wire, sealed)
    receipt = wire.submit(sealed)
    assert receipt.plaintext_sha256 == hashlib.sha256(save(good_delta())).hexdigest()


# (name, transform of the chunk list) for ciphertext-level tampering; "last" is the final chunk
CHUNK_CASES: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "bit in first chunk": lambda c: [flip(c[0], 5), *c[1:]],
    "bit in middle chunk": lambda c: [*c[:4], flip(c[4], 100), *c[5:]],
    "bit in final chunk": lambda c: [*c[:-1], flip(c[-1], 3)],
    "bit in a tag": lambda c: [*c[:2], flip(c[2], len(c[2]) - 1, 7), *c[3:]],
    "reordered chunks": lambda c: [c[1], c[0], *c[2:]],
}


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_tampered_ciphertext_fails_its_chunk_tag(wire: Wire, case: str) -> None:
    sealed = wire.seal()
    expect(wire, requests(sealed, CHUNK_CASES[case](chunks_of(sealed))), CODE.INVALID_ARGUMENT, "authentication")
    accepted_afterwards(wire, sealed)


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_tampered_ciphertext_signed_by_its_owner_still_fails(wire: Wire, case: str) -> None:
    sealed = wire.seal()
    bad = resign(sealed, wire.owners["alice"], chunks=CHUNK_CASES[case](chunks_of(sealed)))
    expect(wire, requests(bad), CODE.INVALID_ARGUMENT, "authentication")
    accepted_afterwards(wire, sealed)


def test_chunk_swapped_in_from_another_upload(wire: Wire) -> None:
    sealed, other = wire.seal(upload_id="up-1"), wire.seal(good_delta(0.02), upload_id="up-2")
    swapped = [*chunks_of(sealed)[:3], chunks_of(other)[3], *chunks_of(sealed)[4:]]
    expect(wire, requests(sealed, swapped), CODE.INVALID_ARGUMENT, "chunk 3")
    expect(wire, requests(resign(sealed, wire.owners["alice"], chunks=swapped)), CODE.INVALID_ARGUMENT, "chunk 3")
    accepted_afterwards(wire, sealed)


def test_trailer_tampered_moved_or_missing(wire: Wire) -> None:
    sealed, other = wire.seal(upload_id="up-1"), wire.seal(upload_id="up-2")
    expect(wire, requests(sealed, trailer=flip(sealed.trailer, 9)), CODE.UNAUTHENTICATED, "trailer signature")
    expect(wire, requests(sealed, trailer=other.trailer), CODE.UNAUTHENTICATED, "trailer signature")
    by_bob = resign(sealed, wire.owners["bob"]).trailer
    expect(wire, requests(sealed, trailer=by_bob), CODE.UNAUTHENTICATED, "trailer signature")
    expect(wire, requests(sealed)[:-1], CODE.INVALID_ARGUMENT, "without the trailer")
    expect(wire, requests(sealed, trailer=sealed.trailer[:40]), CODE.INVALID_ARGUMENT, "trailer")
    expect(wire, [*requests(sealed), requests(sealed)[-1]], CODE.INVALID_ARGUMENT, "after the trailer")
    early = requests(sealed)
    expect(wire, [*early[:-2], early[-1], early[-2]], CODE.INVALID_ARGUMENT, "after the trailer")
    accepted_afterwards(wire, sealed)


def test_dropped_final_chunk(wire: Wire) -> None:
    sealed = wire.seal()
    expect(wire, requests(sealed, chunks_of(sealed)[:-1]), CODE.INVALID_ARGUMENT, "final chunk is missing")
    expect(wire, requests(sealed, [b"".join(chunks_of(sealed))[:-1]]), CODE.INVALID_ARGUMENT, "final chunk")


def test_extra_chunk_after_final(wire: Wire) -> None:
    sealed = wire.seal()
    chunks = chunks_of(sealed)
    expect(wire, requests(sealed, [*chunks, chunks[0]]), CODE.INVALID_ARGUMENT, "after the final chunk")


def test_duplicated_chunk(wire: Wire) -> None:
    sealed = wire.seal()
    c = chunks_of(sealed)
    expect(wire, requests(sealed, [c[0], *c]), CODE.INVALID_ARGUMENT, "chunk 1")
    same_length = resign(sealed, wire.owners["alice"], chunks=[c[0], c[0], *c[2:]])
    expect(wire, requests(same_length), CODE.INVALID_ARGUMENT, "chunk 1")
    accepted_afterwards(wire, sealed)


def test_other_splits_of_the_same_ciphertext_are_accepted(wire: Wire) -> None:
    sealed = wire.seal()
    whole = b"".join(chunks_of(sealed))
    parts = [whole[:1], whole[1:1500], whole[1500:1501], whole[1501:4000], whole[4000:]]
    receipt = wire.send(requests(sealed, parts))
    assert not receipt.already_accepted and wire.store.round_status("jobA", 1)[2] == 1


def test_flipped_header_bit(wire: Wire) -> None:
    sealed = wire.seal(upload_id="up-1")
    at = sealed.header_json.index(b'"up-1"') + 4  # up-1 -> up-0: still a valid header, no longer signed
    expect(wire, requests(replace(sealed, header_json=flip(sealed.header_json, at))), CODE.UNAUTHENTICATED,
           "signature")
    expect(wire, requests(replace(sealed, header_json=flip(sealed.header_json, 0, 1))), CODE.INVALID_ARGUMENT,
           "header")
    accepted_afterwards(wire, sealed)


def test_flipped_wrapped_key_bit(wire: Wire) -> None:
    sealed = wire.seal()
    bad_key = flip(sealed.wrapped_key, 40)
    expect(wire, requests(replace(sealed, wrapped_key=bad_key)), CODE.UNAUTHENTICATED, "signature")
    expect(wire, requests(resign(sealed, wire.owners["alice"], wrapped_key=bad_key)), CODE.INVALID_ARGUMENT,
           "wrapped data key")
    accepted_afterwards(wire, sealed)


def test_sealed_for_job_a_round_1_sent_to_job_b_round_2(wire: Wire) -> None:
    sealed = wire.seal(job_id="jobA", round=1)
    moved = with_header(sealed, job_id="jobB", round=2)
    expect(wire, requests(replace(sealed, header_json=moved)), CODE.UNAUTHENTICATED, "signature")
    # even its own owner cannot move it: the header is bound into the key wrapping
    expect(wire, requests(resign(sealed, wire.owners["alice"], header_json=moved)), CODE.INVALID_ARGUMENT,
           "wrapped data key")
    assert wire.store.round_status("jobB", 2)[2] == 0
    accepted_afterwards(wire, sealed)


def test_ciphertext_resigned_by_another_owner(wire: Wire) -> None:
    sealed = wire.seal(owner="alice")
    expect(wire, requests(resign(sealed, wire.owners["bob"])), CODE.UNAUTHENTICATED, "signature")
    as_bob = with_header(sealed, owner_id="bob")
    expect(wire, requests(resign(sealed, wire.owners["bob"], header_json=as_bob)), CODE.FAILED_PRECONDITION,
           "sender_key_id")
    as_bob = with_header(sealed, owner_id="bob", sender_key_id=key_id(wire.owners["bob"].public_key()))
    expect(wire, requests(resign(sealed, wire.owners["bob"], header_json=as_bob)), CODE.INVALID_ARGUMENT,
           "wrapped data key")
    accepted_afterwards(wire, sealed)


def _safetensors_with(header: dict, data: bytes) -> bytes:  # type: ignore[type-arg]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _payload(case: str) -> bytes:
    delta = good_delta()
    if case == "pickle renamed .safetensors":
        return pickle.dumps({k: v.tolist() for k, v in delta.items()})
    if case == "header length 2^63":
        return struct.pack("<Q", 2**63) + b"{}" + bytes(64)
    if case == "overlapping offsets":
        return _safetensors_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    changes: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
        "extra tensor": lambda d: d.update(z=torch.zeros(2)),
        "missing tensor": lambda d: d.pop("b"),
        "renamed tensor": lambda d: d.update(bb=d.pop("b")),
        "wrong shape": lambda d: d.update(b=torch.zeros(33)),
        "wrong dtype": lambda d: d.update(b=d["b"].double()),
        "NaN": lambda d: d["a"].view(-1).__setitem__(3, float("nan")),
        "Inf": lambda d: d["b"].__setitem__(0, float("inf")),
        "1e30": lambda d: d["a"].view(-1).__setitem__(0, 1e30),
    }
    changes[case](delta)
    return save(delta)


PAYLOAD_WORDS = {
    "pickle renamed .safetensors": "header length", "header length 2^63": "header length",
    "overlapping offsets": "overlap", "extra tensor": "unknown tensors", "missing tensor": "missing tensors",
    "renamed tensor": "tensors", "wrong shape": "shape", "wrong dtype": "dtype", "NaN": "nan", "Inf": "infinite",
    "1e30": "norm",
}


@pytest.mark.parametrize("case", sorted(PAYLOAD_WORDS))
def test_bad_payload_is_refused(wire: Wire, temps: list[Path], case: str) -> None:
    """After decryption by the strict parser and the spec checks; a payload larger than the spec allows is refused
    from its declared length, before any chunk (and the parser refuses it too)."""
    payload = _payload(case)
    sealed = wire.seal(payload)
    if len(payload) <= max_plaintext_length(SPEC):
        expect(wire, requests(sealed), CODE.INVALID_ARGUMENT, PAYLOAD_WORDS[case])
    else:
        expect(wire, requests(sealed), CODE.RESOURCE_EXHAUSTED, "exceeds")
        assert temps == []
        with pytest.raises(Exception, match=f"(?i){PAYLOAD_WORDS[case]}"):
            validate_delta(load_tensors(bytearray(payload)), SPEC, max_norm=1e9)
    accepted_afterwards(wire, wire.seal(upload_id="up-2"))


# -- authenticated before the first chunk; nothing on disk for a refusal ------------------------------------------

def _garbage_after(sealed: SealedDelta) -> list[pb.SubmitDeltaRequest]:
    """The preamble, then chunks the coordinator must never need to read."""
    return [requests(sealed)[0], *[pb.SubmitDeltaRequest(chunk=b"\xff" * 1040) for _ in range(4)]]


@pytest.mark.parametrize(("case", "code", "words"), [
    ("unknown owner", CODE.UNAUTHENTICATED, "authentication failed"),  # refused from the call's metadata
    ("signed by another key", CODE.UNAUTHENTICATED, "signature"),
    ("pending owner", CODE.UNAUTHENTICATED, "authentication failed"),
    ("revoked owner", CODE.UNAUTHENTICATED, "authentication failed"),
    ("another owner's preamble", CODE.PERMISSION_DENIED, "not enrolled"),  # relayed by an authenticated owner
    ("closed round", CODE.FAILED_PRECONDITION, "CLOSED"),
])
def test_preamble_refused_before_any_chunk(wire: Wire, temps: list[Path], case: str, code: grpc.StatusCode,
                                           words: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    wire.owners["mallory"] = Ed25519PrivateKey.generate()
    wire.store.set_owner_status("bob", "revoked")
    if case == "signed by another key":
        sealed = wire.seal()
        sealed = replace(sealed, signature=resign(sealed, wire.owners["bob"]).signature)
    else:
        owner = {"unknown owner": "mallory", "pending owner": "carol", "revoked owner": "bob",
                 "another owner's preamble": "bob"}.get(case, "alice")
        sealed = wire.seal(owner=owner, job_id="jobB" if case == "closed round" else "jobA", round=1)
    sender = "alice" if case in ("another owner's preamble", "signed by another key") else sealed.header.owner_id
    job_id = sealed.header.job_id
    with pytest.raises(grpc.RpcError) as caught:
        wire.send(_garbage_after(sealed), owner=sender, job_id=job_id)
    assert caught.value.code() == code and words.lower() in caught.value.details().lower(), caught.value.details()
    wire.assert_nothing_written()
    assert temps == []


def test_declared_length_above_what_the_spec_allows(wire: Wire, temps: list[Path]) -> None:
    limit = max_plaintext_length(SPEC)
    assert len(save(good_delta())) <= limit
    expect(wire, _garbage_after(wire.seal(bytes(limit + 1))), CODE.RESOURCE_EXHAUSTED, "exceeds")
    assert temps == []
    # exactly the limit passes the size check (and then fails the parser, after decryption)
    expect(wire, requests(wire.seal(bytes(limit))), CODE.INVALID_ARGUMENT, "safetensors")
    assert len(temps) == 1


def test_sealed_format_v1_is_refused_by_version(wire: Wire, temps: list[Path]) -> None:
    sealed = wire.seal()
    fields = {**asdict(sealed.header), "version": 1, "plaintext_sha256": "00" * 32}
    v1_header = canonical_json(fields)
    signature = sign(wire.owners["alice"], PREAMBLE_CONTEXT, preamble_message(v1_header, sealed.wrapped_key))
    expect(wire, requests(replace(sealed, header_json=v1_header, signature=signature)), CODE.INVALID_ARGUMENT,
           "version 1 is not supported")
    assert temps == []


# -- retries: answered from the stored receipt; upload ids are per owner -------------------------------------------

def test_known_upload_id_answered_without_reading_the_ciphertext(wire: Wire, temps: list[Path]) -> None:
    sealed = wire.seal()
    first = wire.submit(sealed)
    receipt = pb.SignedReceipt()
    receipt.CopyFrom(wire.send(_garbage_after(sealed)))  # the same preamble, then garbage: never read
    assert receipt.already_accepted and len(temps) == 1
    again = wire.submit(sealed)
    assert again.already_accepted and again.fields() == first.fields()

    sent: list[int] = []

    def endless() -> Iterator[pb.SubmitDeltaRequest]:
        yield requests(sealed)[0]
        for index in range(10_000):  # 10 GB if it were read to the end
            sent.append(index)
            yield pb.SubmitDeltaRequest(chunk=bytes(1 << 20))

    assert wire.stub.SubmitDelta(endless(), metadata=wire.auth("SubmitDelta")).already_accepted
    assert len(sent) < 10_000 and len(temps) == 1
    changed = resign(sealed, wire.owners["alice"], header_json=with_header(sealed, num_examples=8))
    error = pytest.raises(grpc.RpcError, wire.send, requests(changed)).value
    assert error.code() == CODE.ALREADY_EXISTS and "different bytes" in error.details()


def test_same_upload_id_from_two_owners_is_two_uploads(wire: Wire) -> None:
    alice, bob = wire.seal(owner="alice", upload_id="shared"), wire.seal(good_delta(0.02), owner="bob",
                                                                         upload_id="shared")
    first, second = wire.submit(alice), wire.submit(bob)
    assert not first.already_accepted and not second.already_accepted
    assert (first.owner_id, second.owner_id) == ("alice", "bob") and first.blob_sha256 != second.blob_sha256
    assert [(u.owner_id, u.upload_id) for u in wire.store.accepted_uploads("jobA", 1)] == [("alice", "shared"),
                                                                                           ("bob", "shared")]
    assert wire.submit(bob).fields() == second.fields()
    assert len(wire.blobs.visible()) == 2


# -- downloads: the signed manifest's size and digests are the contract --------------------------------------------

@pytest.mark.parametrize(("chunk_size", "words"), [(16 << 20, "more than"), (64 << 10, "announces")])
def test_download_longer_than_the_manifest_is_refused(wire: Wire, tmp_path: Path, chunk_size: int,
                                                      words: str) -> None:
    job = wire.job()
    with open(bundle_tar(wire.storage, "jobA"), "ab") as tar:
        tar.write(bytes(4096))  # the coordinator now serves more than it signed
    dest = tmp_path / "dl"
    with pytest.raises(TransportError, match=words):
        wire.client.fetch_verified_tar(job, dest, chunk_size=chunk_size)
    assert list(dest.iterdir()) == []  # nothing kept from it


@pytest.mark.parametrize("digest", ["../../escape", "AB" * 32, "ab" * 32 + "\n", "ab" * 31])
def test_a_digest_that_is_not_64_lowercase_hex_never_becomes_a_path(wire: Wire, tmp_path: Path,
                                                                    digest: str) -> None:
    good = job_manifest(wire.server.state, "jobA")
    fields = json.loads(good.payload)
    for name in ("digest", "tar_sha256"):
        forged = SignedDocument.create({**fields, "bundle": {**fields["bundle"], name: digest}}, wire.key,
                                       JOB_MANIFEST_CONTEXT)
        with pytest.raises(ManifestError, match="64 lowercase hex"):  # even signed by the pinned key
            JobInfo.from_manifest(forged.open(wire.key.public_key(), JOB_MANIFEST_CONTEXT), wire.key.public_key())
    job, cache = wire.job(), tmp_path / "cache"
    cache.mkdir()
    for bad in (replace(job, bundle_digest=digest), replace(job, bundle_tar_sha256=digest)):
        with pytest.raises(TransportError, match="64 lowercase hex"):
            wire.client.download_bundle(bad, cache / "dl")
        with pytest.raises(TransportError, match="64 lowercase hex"):
            wire.client.fetch_verified_tar(bad, cache / "dl")
    assert list(cache.iterdir()) == []
    with wire.store.transaction() as db:  # the coordinator refuses to sign such a manifest at all
        db.execute("UPDATE jobs SET bundle_digest = ? WHERE job_id = 'jobA'", (digest,))
    with pytest.raises(grpc.RpcError):
        wire.client.get_job("jobA")
