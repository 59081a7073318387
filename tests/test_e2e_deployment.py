"""End to end in deployment mode: flower-superlink and two flower-supernode processes on localhost, the
coordinator's gRPC service, and `flwr run` of this app for two rounds. Deltas travel sealed over gRPC.

Deployed as docker-compose.yml does: TLS on every connection (certificates from a private CA made by
``coordinator.deploy``, as ``offsite-coordinator deploy init`` makes them), no ``--insecure`` anywhere, and the
SuperLink admits only SuperNodes whose key was registered with ``flwr supernode register``. A third SuperNode with
an unregistered key (and an owner identity the coordinator would accept) is refused and never submits a delta.
The owners' nodes start as ``offsite-client node start`` starts them, trusting only app bundles the coordinator
signed: a second run of an unsigned app (``tests/apps/intruder_app``), started through the SuperLink's Control API
as anyone who reaches it could, executes none of its code on their nodes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from coordinator.app_signing import sign_app
from coordinator.blobs import BlobStore
from coordinator.demo_data import demo_dataset
from coordinator.deploy import CertificateAuthority, pem_certificate, pem_private_key, supernode_auth_key
from coordinator.paths import init_admin_key
from coordinator.progress import Progress, checkpoint_path
from coordinator.server import start_server
from coordinator.simulate import SimulateConfig, setup
from coordinator.state import StateStore
from protos import crypto
from protos.files import atomic_write
from protos.round_config import RoundConfig
from tests.models import subset, tiny_classifier_dir

ROOT = Path(__file__).resolve().parents[1]
INTRUDER_APP = ROOT / "tests" / "apps" / "intruder_app"
DATA = demo_dataset()
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
def test_two_rounds_on_superlink_and_supernodes(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    work = tmp_path / "coordinator"
    config = SimulateConfig(
        model=str(tiny_classifier_dir(tmp_path / "tiny-bert")), task="classification",
        train_file=subset(DATA / "train.jsonl", tmp_path / "train.jsonl", 96),
        eval_file=subset(DATA / "eval.jsonl", tmp_path / "eval.jsonl", 24), workdir=work, clients=2, rounds=2,
        bottom=1, top=1, keep=1, training=RoundConfig(lr=1e-3, max_length=32),
    )
    prepared = setup(config)  # bundle, owners approved, job created, initial global adapter checkpointed
    variant = prepared.variants[0]
    job_id, checkpoints = variant.job_id, variant.checkpoints(work)
    tls = tmp_path / "tls"
    ca = CertificateAuthority.create("offsite e2e CA")
    atomic_write(tls / "ca.crt", pem_certificate(ca.cert))
    for name in ("superlink", "coordinator"):
        cert, key = ca.issue_server(name, ["localhost", "127.0.0.1"])
        atomic_write(tls / f"{name}.crt", pem_certificate(cert))
        atomic_write(tls / f"{name}.key", pem_private_key(key), mode=0o600)
    nodes = tmp_path / "node-keys"  # 0, 1: registered with the SuperLink; 2: never registered
    for index in range(3):
        private, public = supernode_auth_key()
        atomic_write(nodes / f"node-{index}.key", private, mode=0o600)
        atomic_write(nodes / f"node-{index}.pub", public)
    server = start_server(work / "state", 0, tls_cert=tls / "coordinator.crt", tls_key=tls / "coordinator.key",
                          signing_key=prepared.coordinator_key, checkpoint_root=work / "checkpoints")
    # The ServerApp holds only this admin key, ca.crt and coordinator.pub: never the state or a coordinator key.
    init_admin_key(work / "state", tmp_path / "serverapp" / "admin.key")
    # The intruder's owner key is approved and enrolled: only the SuperLink's node authentication keeps it out.
    intruder_key = crypto.generate_signing_key()
    crypto.write_private_key(intruder_key, tmp_path / "intruder-owner.key")
    intruder_id = crypto.key_id(intruder_key.public_key())
    server.store.add_owner(intruder_id, intruder_key.public_key(), approved=True)
    server.store.enroll(job_id, intruder_id)
    owner_ids = {crypto.key_id(crypto.load_private_key(work / "owners" / f"owner-{i}.key").public_key())
                 for i in range(2)}
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        superlink = free_port()
        (tmp_path / "superlink").mkdir()
        processes.append(subprocess.Popen(
            [str(BIN / "flower-superlink"), "--port", str(superlink), "--ssl-ca-certfile", str(tls / "ca.crt"),
             "--ssl-certfile", str(tls / "superlink.crt"), "--ssl-keyfile", str(tls / "superlink.key"),
             "--enable-supernode-auth", "--disable-runtime-dependency-installation"],
            cwd=tmp_path / "superlink", env=env, stdout=open(logs / "superlink.log", "wb"), stderr=subprocess.STDOUT))
        wait_for_port(superlink)
        (tmp_path / "flwr-home").mkdir(exist_ok=True)
        (tmp_path / "flwr-home" / "config.toml").write_text(
            f'[superlink.local]\naddress = "127.0.0.1:{superlink}"\nroot-certificates = "{tls / "ca.crt"}"\n')
        for index in range(2):
            registered = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(nodes / f"node-{index}.pub"), "local",
                 "--name", f"owner-{index}"], env=env, capture_output=True, text=True, timeout=120)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        supernodes: list[subprocess.Popen[bytes]] = []
        for index in range(3):  # each owner's directory as deploy init writes it; 2 is the unregistered intruder
            owner = tmp_path / f"owner-{index}"
            owner_key = work / "owners" / f"owner-{index}.key" if index < 2 else tmp_path / "intruder-owner.key"
            atomic_write(owner / "owner.key", owner_key.read_bytes(), mode=0o600)
            atomic_write(owner / "supernode.key", (nodes / f"node-{index}.key").read_bytes(), mode=0o600)
            atomic_write(owner / "ca.crt", (tls / "ca.crt").read_bytes())
            atomic_write(owner / "coordinator.pub", (work / "keys" / "coordinator.pub").read_bytes())
        sign_app(prepared.coordinator_key, ROOT, [tmp_path / f"owner-{i}" / "trusted-apps.json" for i in range(3)])
        for index in range(3):
            supernodes.append(subprocess.Popen(
                [str(BIN / "offsite-client"), "node", "start", "--superlink", f"127.0.0.1:{superlink}",
                 "--coordinator", server.address, "--job", job_id, "--train", str(config.train_file),
                 "--dir", str(tmp_path / f"owner-{index}"), "--port", str(free_port())],
                env=env, stdout=open(logs / f"supernode-{index}.log", "wb"), stderr=subprocess.STDOUT))
        processes.extend(supernodes)

        run_config = tmp_path / "run.toml"
        run_config.write_text("\n".join([
            f'job-id = "{job_id}"', f'coordinator = "{server.address}"',
            f'admin-key = "{tmp_path / "serverapp" / "admin.key"}"', f'root-cert = "{tls / "ca.crt"}"',
            f'coordinator-key = "{work / "keys" / "coordinator.pub"}"',
            "num-server-rounds = 2", "min-replies = 2", "node-wait = 90.0", "round-timeout = 240.0",
            "lr = 0.001", "max-length = 32",
        ]) + "\n")
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "local", "--stream", "--run-config", str(run_config)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        intruder_run = subprocess.run(  # anyone reaching the Control API: an app the coordinator never signed
            [str(BIN / "flwr"), "run", str(INTRUDER_APP), "local", "--stream",
             "--run-config", f'marker="{tmp_path / "intruder-ran"}"'],
            env=env, capture_output=True, text=True, timeout=300,
        )
        intruder_output = intruder_run.stdout + intruder_run.stderr
        intruder_log = (logs / "supernode-2.log").read_text(errors="replace")
    finally:
        server.stop()

    progress = Progress.load(checkpoints)
    diagnostics = output[-3000:] + "".join(p.read_text(errors="replace")[-1500:] for p in logs.iterdir())
    assert progress.completed_round == 2, diagnostics
    assert [r.state for r in progress.rounds] == ["AGGREGATED", "AGGREGATED"], diagnostics

    store = StateStore(work / "state")
    for round_number in (1, 2):
        assert store.round_state(job_id, round_number) == "AGGREGATED"
        uploads = store.accepted_uploads(job_id, round_number)
        assert {u.owner_id for u in uploads} == owner_ids and len(uploads) == 2  # never the intruder's
        for upload in uploads:  # at rest the delta is ciphertext: no safetensors header, no tensor names
            blob = BlobStore(work / "state" / "blobs").path(upload.blob_sha256).read_bytes()
            assert b"encoder.layer" not in blob and b'"dtype"' not in blob
    # The SuperLink refused the unregistered SuperNode's key: Flower's exit code 305 (cannot connect).
    assert "Failed to activate SuperNode" in intruder_log and "305" in intruder_log, intruder_log[-2000:]
    assert supernodes[2].poll() is not None, "the unregistered SuperNode is still running"
    # The unsigned app ran on no owner's node: no marker; each node's runner refused it before unpacking it.
    assert not (tmp_path / "intruder-ran").exists(), intruder_output[-3000:]
    assert "intruder: 2 replies, 2 errors" in intruder_output, intruder_output[-3000:]
    for index in range(2):
        log = (logs / f"supernode-{index}.log").read_text(errors="replace")
        assert "is not signed by the coordinator" in log, log[-2000:]
    initial = load_file(str(checkpoint_path(checkpoints, 0)))
    final = load_file(str(checkpoint_path(checkpoints, 2)))
    changed = [name for name in initial if not (initial[name] == final[name]).all()]
    assert changed, "the global adapter did not change"
