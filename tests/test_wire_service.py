"""The service's contract: idempotent uploads, owners and rounds, caps, garbage, disconnects, downloads, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from client.transport import CoordinatorClient, TransportError
from coordinator.intake import open_accepted_upload
from coordinator.jobs import bundle_tar, create_job
from coordinator.server import start_server
from protos import serde
from protos.offsite.v1 import coordinator_pb2 as pb
from tests.wire_support import (
    CHUNK,
    SPEC,
    Wire,
    good_delta,
    populate,
    reference,
    requests,
)

pytest_plugins = ("tests.wire_support",)

CODE = grpc.StatusCode


def rpc_error(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


def test_job_manifest_is_signed_and_complete(wire: Wire) -> None:
    job = wire.job("jobA")
    assert (job.round, job.round_state) == (1, "OPEN")
    assert job.adapter_spec.digest() == SPEC.digest()
    assert job.delta_key_id == wire.keyring.current_id
    other = CoordinatorClient(wire.server.address, coordinator_key=Ed25519PrivateKey.generate().public_key(),
                              owner_key=wire.owners["alice"], owner_id="alice", insecure=True)
    with other, pytest.raises(ValueError, match="signature does not verify"):
        other.get_job("jobA")
    # An owner learns nothing about jobs it is not enrolled in, not even whether they exist.
    missing, foreign = rpc_error(wire.client.get_job, "nope"), rpc_error(wire.client.get_job, "jobZ")
    assert missing.code() == foreign.code() == CODE.PERMISSION_DENIED
    assert missing.details() == foreign.details() == "not enrolled in this job"


def test_exact_replay_returns_the_same_receipt_once_counted(wire: Wire) -> None:
    sealed = wire.seal()
    first = wire.submit(sealed)
    again = wire.submit(sealed)
    assert not first.already_accepted and again.already_accepted
    assert first.fields() == again.fields()
    assert wire.client.round_status("jobA", 1).accepted_uploads == 1
    assert wire.client.round_status("jobA", 1).total_examples == 7
    wire.store.close_round("jobA", 1)
    assert wire.submit(sealed).already_accepted  # a lost receipt can still be fetched


def test_same_slot_with_different_bytes_is_refused(wire: Wire) -> None:
    wire.submit(wire.seal(upload_id="up-1"))
    resealed = wire.seal(upload_id="up-1")  # same upload id, fresh data key: different bytes
    assert rpc_error(wire.submit, resealed).code() == CODE.ALREADY_EXISTS
    other_id = wire.seal(good_delta(0.02), upload_id="up-2")
    error = rpc_error(wire.submit, other_id)
    assert error.code() == CODE.ALREADY_EXISTS and "already has an accepted upload" in error.details()
    assert wire.store.round_status("jobA", 1)[2] == 1 and len(wire.blobs.visible()) == 1


@pytest.mark.parametrize(("owner", "code", "words"), [  # one generic answer: strangers learn nothing
    ("mallory", CODE.UNAUTHENTICATED, "authentication failed"),
    ("carol", CODE.UNAUTHENTICATED, "authentication failed"),
    ("bob", CODE.UNAUTHENTICATED, "authentication failed"),
])
def test_unknown_unapproved_or_revoked_owner(wire: Wire, owner: str, code: grpc.StatusCode, words: str) -> None:
    wire.owners["mallory"] = Ed25519PrivateKey.generate()
    wire.store.set_owner_status("bob", "revoked")
    error = rpc_error(wire.submit, wire.seal(owner=owner))
    assert error.code() == code and words in error.details()
    wire.assert_nothing_written()


def test_upload_to_a_closed_round(wire: Wire) -> None:
    wire.store.close_round("jobA", 1)
    error = rpc_error(wire.submit, wire.seal())
    assert error.code() == CODE.FAILED_PRECONDITION and "CLOSED" in error.details()
    assert wire.client.round_status("jobA", 1).state == "CLOSED"


def test_stream_larger_than_the_cap(wire: Wire, tmp_path: Path, bundle_dir: tuple[Path, Ed25519PrivateKey]) -> None:
    sealed = wire.seal()
    blob_size = len(sealed.preamble()) + len(sealed.ciphertext)
    create_job(wire.storage, "capped", bundle_dir[0], wire.key.public_key(), adapter_spec=SPEC,
               reference_adapter=reference(), chunk_size=CHUNK, max_upload_bytes=blob_size + 100)
    wire.store.open_round("capped", 1)
    wire.store.enroll("capped", "alice")
    fits = wire.seal(job_id="capped")
    extra = [bytes(c) for c in fits.chunks()] + [bytes(4096)]
    error = rpc_error(lambda: wire.send(requests(fits, extra), job_id="capped"))
    assert error.code() == CODE.RESOURCE_EXHAUSTED and "cap" in error.details()
    too_big = wire.seal(torch.zeros(4096).numpy().tobytes(), job_id="capped")
    assert rpc_error(wire.submit, too_big).code() == CODE.RESOURCE_EXHAUSTED
    assert wire.blobs.visible() == [] and list(wire.blobs.tmp.iterdir()) == []
    assert wire.submit(fits).upload_id == fits.header.upload_id


def test_garbage_bytes_instead_of_a_protobuf(wire: Wire) -> None:
    raw = wire.channel.stream_unary("/offsite.v1.Coordinator/SubmitDelta", request_serializer=lambda b: b)
    garbage = [b"\xff\xfe garbage \x00\x01" * 10]
    assert rpc_error(raw, iter(garbage)).code() == CODE.UNAUTHENTICATED  # a stranger's bytes are never parsed
    error = rpc_error(lambda: raw(iter(garbage), metadata=wire.auth("SubmitDelta")))
    assert error.code() == CODE.INVALID_ARGUMENT and "preamble" in error.details()
    sealed = wire.seal()
    first = serde.preamble_to_pb(sealed.header_json, sealed.wrapped_key, sealed.signature).SerializeToString()
    error = rpc_error(lambda: raw(iter([first, b"\xff\xff\xff\xff"]), metadata=wire.auth("SubmitDelta")))
    assert error.code() == CODE.INVALID_ARGUMENT and "chunk" in error.details()
    unary = wire.channel.unary_unary("/offsite.v1.Coordinator/GetJob", request_serializer=lambda b: b)
    assert rpc_error(unary, b"\xff\x01\x02").code() == CODE.UNAUTHENTICATED
    assert rpc_error(lambda: unary(b"\xff\x01\x02", metadata=wire.auth("GetJob"))).code() == CODE.INVALID_ARGUMENT
    wire.assert_nothing_written()


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
def test_disconnect_and_retry_accepts_exactly_once(wire: Wire, fraction: float) -> None:
    sealed = wire.seal()
    messages = requests(sealed)
    cut = 1 + int(fraction * (len(messages) - 1))
    hang = threading.Event()

    def stalled() -> Iterator[pb.SubmitDeltaRequest]:
        yield from messages[:cut]
        hang.wait(10)

    future = wire.stub.SubmitDelta.future(stalled(), metadata=wire.auth("SubmitDelta"))
    deadline = time.time() + 5
    while not list(wire.blobs.tmp.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    future.cancel()
    hang.set()
    deadline = time.time() + 5
    while list(wire.blobs.tmp.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    wire.assert_nothing_written()
    receipt = wire.submit(sealed)
    assert not receipt.already_accepted
    assert wire.submit(sealed).already_accepted
    assert [u.upload_id for u in wire.store.accepted_uploads("jobA", 1)] == [sealed.header.upload_id]


def test_accepted_uploads_reopen_for_aggregation(wire: Wire) -> None:
    deltas = {"bob": good_delta(0.03), "alice": good_delta(0.01)}
    for owner, delta in deltas.items():
        wire.client_of(owner).submit_delta(wire.job(), 1, delta, wire.owners[owner], 5 if owner == "bob" else 9,
                                           owner_id=owner)
    records = wire.store.accepted_uploads("jobA", 1)
    assert [(r.owner_id, r.num_examples) for r in records] == [("alice", 9), ("bob", 5)]
    for record in records:
        tensors = open_accepted_upload(wire.storage, record)
        assert all(torch.equal(tensors[name], deltas[record.owner_id][name]) for name in tensors)
        assert wire.blobs.path(record.blob_sha256).read_bytes()[:6] == b"OFSDLT"  # encrypted at rest
    wire.store.close_round("jobA", 1)
    wire.store.mark_aggregated("jobA", 1)
    assert wire.client.round_status("jobA", 1).state == "AGGREGATED"


def test_round_transitions(wire: Wire) -> None:
    from coordinator.errors import InvalidTransitionError

    with pytest.raises(InvalidTransitionError, match="already has an OPEN round"):
        wire.store.open_round("jobA", 2)
    with pytest.raises(InvalidTransitionError, match="it is OPEN"):
        wire.store.mark_aggregated("jobA", 1)
    wire.store.abort_round("jobA", 1, "owner dropped out")
    status = wire.client.round_status("jobA", 1)
    assert (status.state, status.reason) == ("ABORTED", "owner dropped out")
    assert rpc_error(wire.client.round_status, "jobA", 9).code() == CODE.NOT_FOUND


def test_bundle_download_resumes_and_verifies(wire: Wire, tmp_path: Path) -> None:
    job = wire.job()
    tar = bundle_tar(wire.storage, "jobA").read_bytes()
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "bundle.tar.part").write_bytes(tar[: len(tar) // 3])
    verified = wire.client.download_bundle(job, dest, chunk_size=64 << 10)
    assert verified.digest == job.bundle_digest and (dest / "bundle.tar").read_bytes() == tar
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "bundle.tar.part").write_bytes(b"x" * 1000)
    with pytest.raises(TransportError, match="sha256"):
        wire.client.download_bundle(job, corrupt)
    assert not (corrupt / "bundle.tar.part").exists()
    assert wire.client.download_bundle(job, corrupt).digest == job.bundle_digest
    past_end = pb.DownloadBundleRequest(job_id="jobA", offset=len(tar) + 1)
    assert rpc_error(lambda: list(wire.stub.DownloadBundle(past_end, metadata=wire.auth("DownloadBundle")))
                     ).code() == CODE.OUT_OF_RANGE


def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          ca: bool) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_tls_and_mutual_tls(tmp_path: Path, bundle_dir: tuple[Path, Ed25519PrivateKey]) -> None:
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("offsite test CA", ca_key, None, True)
    server_cert = _cert("localhost", server_key, (ca.subject, ca_key), False)
    client_cert = _cert("alice", client_key, (ca.subject, ca_key), False)
    bundle, key = bundle_dir
    with pytest.raises(ValueError, match="insecure"):
        start_server(tmp_path / "plain", signing_key=key)
    server = start_server(tmp_path / "state", signing_key=key, tls_cert=_pem(server_cert), tls_key=_pem(server_key),
                          client_ca=_pem(ca))
    try:
        alice = Ed25519PrivateKey.generate()
        populate(server.storage, bundle, key, {"alice": alice})
        mutual = CoordinatorClient(f"localhost:{server.port}", coordinator_key=key.public_key(), owner_key=alice,
                                   owner_id="alice", root_certificates=_pem(ca), client_key=_pem(client_key),
                                   client_cert=_pem(client_cert))
        with mutual:
            assert mutual.get_job("jobA").job_id == "jobA"
        anonymous = CoordinatorClient(f"localhost:{server.port}", coordinator_key=key.public_key(), owner_key=alice,
                                      owner_id="alice", root_certificates=_pem(ca), retries=0)
        with anonymous:
            assert rpc_error(anonymous.get_job, "jobA").code() == CODE.UNAVAILABLE
    finally:
        server.stop()


def test_delta_key_rotation_keeps_old_deltas_openable(wire: Wire) -> None:
    before = wire.job()
    sealed_to_old = wire.seal(owner="alice")
    new_id = wire.keyring.rotate()
    after = wire.job()
    assert after.delta_key_id == new_id != before.delta_key_id
    assert not wire.submit(sealed_to_old).already_accepted
    assert wire.seal(owner="bob").header.recipient_key_id == new_id


def test_only_the_server_start_clears_partial_uploads(tmp_path: Path) -> None:
    from coordinator.storage import Storage

    Storage.open(tmp_path).close()
    partial = tmp_path / "blobs" / "tmp" / "upload-inflight"
    orphan = tmp_path / "blobs" / "sha256" / ("ab" * 32)
    partial.write_bytes(b"half")
    orphan.write_bytes(b"renamed, never committed")
    Storage.open(tmp_path).close()  # an admin command beside a live server
    assert partial.exists() and orphan.exists()
    storage = Storage.open(tmp_path, recover=True)
    storage.close()
    assert not partial.exists() and not orphan.exists() and len(storage.recovered) == 2
