"""The real ``offsite-coordinator serve`` process: killed mid-upload and restarted; and the CLIs end to end."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file
from typer.testing import CliRunner

from client.cli import app as client_app
from client.transport import CoordinatorClient
from coordinator.cli import app as coordinator_app
from coordinator.storage import Storage
from protos import crypto
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.offsite.v1.coordinator_pb2_grpc import CoordinatorStub
from tests.wire_support import free_port, good_delta, populate, requests

pytest_plugins = ("tests.wire_support",)
ROOT = Path(__file__).resolve().parents[1]


def serve(state: Path, key_file: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "coordinator", "serve", "--state", str(state), "--port",
                             str(port), "--insecure", "--key", str(key_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_ready(client: CoordinatorClient, process: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else b""
        try:
            client.round_status("jobA", 1)
            return
        except grpc.RpcError:
            time.sleep(0.2)
    raise AssertionError("the coordinator did not start")


def uploads_in(state: Path) -> int:
    with sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM uploads").fetchone()[0])


def test_coordinator_killed_mid_upload_then_retry(tmp_path: Path,
                                                  bundle_dir: tuple[Path, Ed25519PrivateKey]) -> None:
    bundle, key = bundle_dir
    key_file, state = tmp_path / "coordinator.key", tmp_path / "state"
    crypto.write_private_key(key, key_file)
    owner = Ed25519PrivateKey.generate()
    storage = Storage.open(state)
    populate(storage, bundle, key, {"alice": owner})
    storage.close()
    port = free_port()
    process = serve(state, key_file, port)
    client = CoordinatorClient(f"127.0.0.1:{port}", coordinator_key=key.public_key(), owner_key=owner,
                               owner_id="alice", insecure=True, retries=8)
    try:
        wait_ready(client, process)
        sealed = client.seal(client.get_job("jobA"), 1, good_delta(), owner, 3, "up-kill", owner_id="alice")
        messages = requests(sealed)
        hang = threading.Event()

        def half() -> Iterator[pb.SubmitDeltaRequest]:
            yield from messages[: len(messages) // 2]
            hang.wait(30)

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        future = CoordinatorStub(channel).SubmitDelta.future(half(), metadata=client._auth("SubmitDelta", "jobA"))
        deadline = time.time() + 20
        while not list((state / "blobs" / "tmp").iterdir()) and time.time() < deadline:
            time.sleep(0.01)
        assert list((state / "blobs" / "tmp").iterdir()), "the upload never started"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        hang.set()
        assert future.exception(10) is not None
        channel.close()
        assert list((state / "blobs" / "sha256").iterdir()) == [] and uploads_in(state) == 0

        process = serve(state, key_file, port)
        wait_ready(client, process)
        assert list((state / "blobs" / "tmp").iterdir()) == []  # recovery removed the partial file
        receipt = client.submit_sealed(sealed)
        assert not receipt.already_accepted and uploads_in(state) == 1
        assert client.round_status("jobA", 1).accepted_uploads == 1
    finally:
        client.close()
        process.kill()
        process.wait(10)


def test_cli_owner_job_round_join_submit(tmp_path: Path, bundle_dir: tuple[Path, Ed25519PrivateKey]) -> None:
    bundle, key = bundle_dir
    runner = CliRunner()
    key_file, pub_file, state = tmp_path / "c.key", tmp_path / "c.pub", tmp_path / "state"
    crypto.write_private_key(key, key_file)
    crypto.write_public_key(key.public_key(), pub_file)
    owner_dir = tmp_path / "owner"

    def ok(app: object, *args: str) -> str:
        result = runner.invoke(app, list(args))  # type: ignore[arg-type]
        assert result.exit_code == 0, result.output
        return result.output

    ok(client_app, "keys", "init", "--dir", str(owner_dir))
    ok(coordinator_app, "owners", "add", "--public-key", str(owner_dir / "owner.pub"), "--owner-id", "alice",
       "--state", str(state))
    assert "pending" in ok(coordinator_app, "owners", "list", "--state", str(state))
    ok(coordinator_app, "owners", "approve", "alice", "--state", str(state))
    ok(coordinator_app, "job", "create", "--bundle", str(bundle), "--job", "j1", "--state", str(state), "--key",
       str(key_file))
    ok(coordinator_app, "round", "open", "--job", "j1", "--round", "1", "--state", str(state))
    ok(coordinator_app, "job", "enroll", "--job", "j1", "--owner", "alice", "--state", str(state))
    assert "alice" in ok(coordinator_app, "job", "members", "--job", "j1", "--state", str(state))

    from coordinator.server import start_server

    server = start_server(state, signing_key=key, insecure=True)
    try:
        common = ["--coordinator", server.address, "--job", "j1", "--coordinator-key", str(pub_file), "--insecure",
                  "--owner-id", "alice", "--key", str(owner_dir / "owner.key")]
        assert "bundle verified" in ok(client_app, "join", *common, "--out", str(tmp_path / "job"))
        spec = server.store.job("j1").adapter_spec
        from safetensors.torch import load_file

        adapter = load_file(tmp_path / "job" / "bundle" / "adapter" / "adapter.safetensors")
        save_file({name: t * 0.01 for name, t in adapter.items()}, str(tmp_path / "delta.safetensors"))
        assert set(adapter) == set(spec.names)
        args = ["submit", str(tmp_path / "delta.safetensors"), *common, "--round", "1", "--num-examples", "12",
                "--upload-id", "cli-1"]
        assert "accepted: upload cli-1" in ok(client_app, *args)
        assert "already accepted" in ok(client_app, *args)
        shown = ok(client_app, "status", *common)
        assert "round 1: OPEN, 1 accepted upload(s), 12 examples" in shown and "cli-1" in shown
    finally:
        server.stop()
    assert "1 accepted upload(s), 12 examples" in ok(coordinator_app, "round", "status", "--job", "j1", "--round",
                                                      "1", "--state", str(state))
    ok(coordinator_app, "round", "close", "--job", "j1", "--round", "1", "--state", str(state))
    for command in (["serve"], ["owners", "add"], ["job", "create"], ["round", "open"], ["delta-key", "rotate"]):
        assert "Usage" in ok(coordinator_app, *command, "--help")
    for command in (["keys", "init"], ["join"], ["submit"]):
        assert "Usage" in ok(client_app, *command, "--help")
