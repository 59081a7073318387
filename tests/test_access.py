"""Who may call what, against the real service: every RPC is authenticated before its payload is read, strangers
learn nothing, owners act only on jobs they are enrolled in, and stalled transfers cannot starve the server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.transport import CoordinatorClient
from coordinator.server import start_server
from coordinator.transfers import TransferLimits
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.offsite.v1.coordinator_pb2_grpc import CoordinatorStub
from protos.request_auth import MAX_SKEW_S, request_metadata
from tests.wire_support import Wire, populate, requests

pytest_plugins = ("tests.wire_support",)
CODE = grpc.StatusCode
GENERIC = "authentication failed"


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def get_job(wire: Wire, metadata: list[tuple[str, str | bytes]] | None, job_id: str = "jobA") -> pb.SignedJobManifest:
    return wire.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=metadata)


@pytest.mark.parametrize("who", ["no metadata", "unknown key", "registered id, wrong key", "pending owner",
                                 "stale time", "future time", "garbage signature"])
def test_strangers_get_one_generic_answer(wire: Wire, who: str) -> None:
    now, stranger = time.time(), Ed25519PrivateKey.generate()
    metadata = {
        "no metadata": None,
        "unknown key": request_metadata(stranger, "mallory", "GetJob", "jobA", now),
        "registered id, wrong key": request_metadata(stranger, "alice", "GetJob", "jobA", now),
        "pending owner": request_metadata(wire.owners["carol"], "carol", "GetJob", "jobA", now),
        "stale time": request_metadata(wire.owners["alice"], "alice", "GetJob", "jobA", now - MAX_SKEW_S - 60),
        "future time": request_metadata(wire.owners["alice"], "alice", "GetJob", "jobA", now + MAX_SKEW_S + 60),
        "garbage signature": [*request_metadata(wire.owners["alice"], "alice", "GetJob", "jobA", now)[:4],
                              ("x-offsite-signature-bin", b"\0" * 64)],
    }[who]
    for method, call in [("GetJob", lambda: get_job(wire, metadata)),
                         ("GetRoundStatus", lambda: wire.stub.GetRoundStatus(
                             pb.GetRoundStatusRequest(job_id="jobA", round=1), metadata=metadata)),
                         ("DownloadBundle", lambda: list(wire.stub.DownloadBundle(
                             pb.DownloadBundleRequest(job_id="jobA"), metadata=metadata)))]:
        error = refused(call)
        assert (error.code(), error.details()) == (CODE.UNAUTHENTICATED, GENERIC), method
        for secret in ("alice", "carol", "mallory", "jobA", wire.owners["alice"].public_key().public_bytes_raw().hex()):
            assert secret not in error.details()


def test_a_request_cannot_be_replayed_or_moved_to_another_job(wire: Wire) -> None:
    metadata = wire.auth("GetJob")
    assert get_job(wire, metadata).manifest_json  # first use
    replay = refused(lambda: get_job(wire, metadata))
    assert (replay.code(), replay.details()) == (CODE.UNAUTHENTICATED, GENERIC)
    for_job_b = wire.auth("GetJob", job_id="jobB")  # signed for jobB, sent for jobA
    moved = refused(lambda: get_job(wire, for_job_b, "jobA"))
    assert moved.code() == CODE.PERMISSION_DENIED
    method_swap = wire.auth("GetRoundStatus")  # signed for another method
    assert refused(lambda: get_job(wire, method_swap)).code() == CODE.UNAUTHENTICATED


def test_owners_act_only_on_jobs_they_are_enrolled_in(wire: Wire) -> None:
    bob = wire.client_of("bob")
    assert bob.get_job("jobA").job_id == "jobA"
    wire.store.unenroll("jobA", "bob")
    out, missing = refused(lambda: bob.get_job("jobA")), refused(lambda: bob.get_job("no-such-job"))
    assert out.code() == missing.code() == CODE.PERMISSION_DENIED
    assert out.details() == missing.details()  # an enrolled-elsewhere owner cannot probe for jobs
    assert refused(lambda: bob.round_status("jobA", 1)).code() == CODE.PERMISSION_DENIED
    download = pb.DownloadBundleRequest(job_id="jobA")
    assert refused(lambda: list(wire.stub.DownloadBundle(download, metadata=wire.auth("DownloadBundle", owner="bob")))
                   ).code() == CODE.PERMISSION_DENIED
    sealed = wire.seal(owner="bob")
    assert refused(lambda: bob.submit_sealed(sealed)).code() == CODE.PERMISSION_DENIED
    wire.assert_nothing_written()


def test_submit_delta_authenticates_before_reading_the_stream(wire: Wire) -> None:
    sealed = wire.seal()
    never = threading.Event()

    def preamble_then_nothing() -> Iterator[pb.SubmitDeltaRequest]:
        yield requests(sealed)[0]
        never.wait(30)  # a server that read on before authenticating would wait here for the first chunk

    stranger = request_metadata(Ed25519PrivateKey.generate(), "alice", "SubmitDelta", "jobA", time.time())
    try:
        started = time.perf_counter()
        error = refused(lambda: wire.stub.SubmitDelta(preamble_then_nothing(), metadata=stranger, timeout=20))
        assert (error.code(), error.details()) == (CODE.UNAUTHENTICATED, GENERIC)
        assert time.perf_counter() - started < 10
    finally:
        never.set()
    wire.assert_nothing_written()
    assert wire.submit(sealed).upload_id == sealed.header.upload_id  # the owner itself is accepted


def _stalled(first: list[pb.SubmitDeltaRequest], release: threading.Event) -> Iterator[pb.SubmitDeltaRequest]:
    yield from first
    release.wait(30)


def test_stalled_transfers_do_not_starve_reads(tmp_path: Path, bundle_dir: tuple[Path, Ed25519PrivateKey]) -> None:
    bundle, key = bundle_dir
    owners = {f"owner{i}": Ed25519PrivateKey.generate() for i in range(9)}
    limits = TransferLimits(max_transfers=40)  # room for all 32 stalled streams and one owner's full share
    server = start_server(tmp_path / "state", signing_key=key, insecure=True, limits=limits)
    channel = grpc.insecure_channel(server.address)
    stub, release = CoordinatorStub(channel), threading.Event()
    populate(server.storage, bundle, key, owners)
    calls: list[grpc.Future] = []  # type: ignore[type-arg]
    try:
        for i in range(8):  # 16 stalled uploads and 16 stalled downloads, two of each per owner
            name = f"owner{i}"
            client = CoordinatorClient(server.address, coordinator_key=key.public_key(), owner_key=owners[name],
                                       owner_id=name, insecure=True)
            sealed = client.seal(client.get_job("jobA"), 1, b"x" * 64, owners[name], 1, f"u{i}", owner_id=name)
            for _ in range(2):
                calls.append(stub.SubmitDelta.future(_stalled(requests(sealed)[:1], release),
                                                     metadata=client._auth("SubmitDelta", "jobA")))
                calls.append(stub.DownloadBundle(pb.DownloadBundleRequest(job_id="jobA", chunk_size=1024),
                                                 metadata=client._auth("DownloadBundle", "jobA")))
            client.close()
        deadline = time.time() + 20
        while server.guard.active() < 16 and time.time() < deadline:  # the stalled uploads hold their slots
            time.sleep(0.05)
        reader = CoordinatorClient(server.address, coordinator_key=key.public_key(), owner_key=owners["owner8"],
                                   owner_id="owner8", insecure=True, retries=0)
        with reader:
            timings = []
            for _ in range(3):  # starved, every call would wait for a thread; the best of three shows it was not
                started = time.perf_counter()
                assert reader.get_job("jobA").job_id == "jobA"
                timings.append(time.perf_counter() - started)
            assert min(timings) < 1.0, timings
            # one owner holds at most max_per_owner transfers
            sealed = reader.seal(reader.get_job("jobA"), 1, b"x" * 64, owners["owner8"], 1, "r", owner_id="owner8")
            held = [stub.SubmitDelta.future(_stalled(requests(sealed)[:1], release),
                                            metadata=reader._auth("SubmitDelta", "jobA"))
                    for _ in range(limits.max_per_owner)]
            deadline = time.time() + 20
            while server.guard.held_by("owner8") < len(held) and time.time() < deadline:
                time.sleep(0.05)  # every held stream is admitted before the one too many is sent
            extra = refused(lambda: stub.SubmitDelta(_stalled(requests(sealed)[:1], release),
                                                     metadata=reader._auth("SubmitDelta", "jobA"), timeout=5))
            assert extra.code() == CODE.RESOURCE_EXHAUSTED
            calls += held
    finally:
        release.set()
        for call in calls:
            call.cancel()
        channel.close()
        server.stop(0)


def test_an_idle_stream_is_cancelled_and_its_slot_freed(tmp_path: Path,
                                                        bundle_dir: tuple[Path, Ed25519PrivateKey]) -> None:
    bundle, key = bundle_dir
    owner = Ed25519PrivateKey.generate()
    server = start_server(tmp_path / "state", signing_key=key, insecure=True,
                          limits=TransferLimits(idle_timeout_s=1.0))
    populate(server.storage, bundle, key, {"alice": owner})
    release = threading.Event()
    try:
        with CoordinatorClient(server.address, coordinator_key=key.public_key(), owner_key=owner, owner_id="alice",
                               insecure=True) as client:
            sealed = client.seal(client.get_job("jobA"), 1, b"x" * 64, owner, 1, "idle", owner_id="alice")
            stalled = CoordinatorStub(client.channel).SubmitDelta.future(
                _stalled(requests(sealed)[:1], release), metadata=client._auth("SubmitDelta", "jobA"))
            assert stalled.exception(timeout=10) is not None  # cancelled by the server, not by us
            deadline = time.time() + 5
            while server.guard.active() and time.time() < deadline:
                time.sleep(0.05)
            assert server.guard.active() == 0
            assert list((tmp_path / "state" / "blobs" / "tmp").iterdir()) == []
    finally:
        release.set()
        server.stop(0)


def test_the_overall_transfer_cap_refuses_at_once(tmp_path: Path, bundle_dir: tuple[Path, Ed25519PrivateKey]) -> None:
    bundle, key = bundle_dir
    owner = Ed25519PrivateKey.generate()
    server = start_server(tmp_path / "state", signing_key=key, insecure=True,
                          limits=TransferLimits(max_transfers=2, max_per_owner=4))
    populate(server.storage, bundle, key, {"alice": owner})
    release = threading.Event()
    try:
        with CoordinatorClient(server.address, coordinator_key=key.public_key(), owner_key=owner, owner_id="alice",
                               insecure=True) as client:
            stub = CoordinatorStub(client.channel)
            sealed = client.seal(client.get_job("jobA"), 1, b"x" * 64, owner, 1, "cap", owner_id="alice")
            held = [stub.SubmitDelta.future(_stalled(requests(sealed)[:1], release),
                                            metadata=client._auth("SubmitDelta", "jobA")) for _ in range(2)]
            deadline = time.time() + 20
            while server.guard.active() < 2 and time.time() < deadline:
                time.sleep(0.05)
            started = time.perf_counter()
            error = refused(lambda: stub.SubmitDelta(_stalled(requests(sealed)[:1], release),
                                                     metadata=client._auth("SubmitDelta", "jobA"), timeout=10))
            assert error.code() == CODE.RESOURCE_EXHAUSTED and "too many" in error.details()
            assert time.perf_counter() - started < 5  # refused at once, not queued
            assert client.get_job("jobA").job_id == "jobA"  # reads still answer
            for call in held:
                call.cancel()
    finally:
        release.set()
        server.stop(0)


def test_an_upload_the_volume_cannot_hold_is_refused_before_anything_is_written(wire: Wire) -> None:
    wire.storage.min_free_bytes = 1 << 62  # a volume this full: nothing fits above the reserve
    error = refused(lambda: wire.submit(wire.seal()))
    assert error.code() == CODE.RESOURCE_EXHAUSTED and "free" in error.details()
    wire.assert_nothing_written()
    wire.storage.min_free_bytes = 0
    assert not wire.submit(wire.seal()).already_accepted
