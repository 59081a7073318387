"""The ServerApp holds no coordinator key: it asks the coordinator's service, over admin calls signed with an admin
key, to open a round (the service signs the round message) and to aggregate it; each data owner checks the signed
round message before it trains. Against the real service; no crypto is mocked."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import save_file
from typer.testing import CliRunner

from client.flower_app import verify_train_message
from coordinator.admin_client import AdminClient
from coordinator.cli import app as coordinator_app
from coordinator.federation import FederationSettings, train_messages
from coordinator.paths import admin_public_key, init_admin_key
from coordinator.progress import checkpoint_path
from coordinator.round_service import aggregate_round
from protos import crypto
from protos.errors import ExitCode
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.request_auth import ADMIN_CONTEXT, request_metadata
from protos.round_config import RoundConfig
from protos.round_message import RoundMessageError, adapter_sha256, sign_round_message, verify_round_message
from tests.wire_support import Wire, good_delta, reference

pytest_plugins = ("tests.wire_support",)
ROOT = Path(__file__).resolve().parents[1]
TRAINING = RoundConfig(lr=1e-3, max_length=32)


@pytest.fixture
def admin(wire: Wire, tmp_path: Path) -> Ed25519PrivateKey:
    """An admin key registered in the wire server's state, and job A's initial checkpoint."""
    init_admin_key(wire.storage.dir, tmp_path / "admin" / "admin.key")
    directory = wire.storage.dir / "checkpoints" / "jobA"
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference().items()}, str(checkpoint_path(directory, 0)))
    return crypto.load_private_key(tmp_path / "admin" / "admin.key")


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def open_request() -> pb.OpenRoundRequest:
    return pb.OpenRoundRequest(job_id="jobA", round=1, round_config_json=b"{}")


@pytest.mark.parametrize("who", ["no metadata", "unregistered key", "admin id, wrong key", "owner key",
                                 "owner key, admin label", "owner label"])
def test_admin_calls_refuse_anyone_but_a_registered_admin_key(wire: Wire, admin: Ed25519PrivateKey,
                                                              who: str) -> None:
    now, stranger, admin_id = time.time(), Ed25519PrivateKey.generate(), crypto.key_id(admin.public_key())
    metadata = {
        "no metadata": None,
        "unregistered key": request_metadata(stranger, crypto.key_id(stranger.public_key()), "OpenRound", "jobA",
                                             now, ADMIN_CONTEXT),
        "admin id, wrong key": request_metadata(stranger, admin_id, "OpenRound", "jobA", now, ADMIN_CONTEXT),
        "owner key": request_metadata(wire.owners["alice"], "alice", "OpenRound", "jobA", now),
        "owner key, admin label": request_metadata(wire.owners["alice"], "alice", "OpenRound", "jobA", now,
                                                   ADMIN_CONTEXT),
        "owner label": request_metadata(admin, admin_id, "OpenRound", "jobA", now),  # not "admin-request/v1"
    }[who]
    for call, request in ((wire.stub.OpenRound, open_request()),
                          (wire.stub.AggregateRound, pb.AggregateRoundRequest(job_id="jobA", round=1))):
        error = refused(lambda: call(request, metadata=metadata))  # noqa: B023
        assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, "authentication failed")
    assert wire.store.round_state("jobA", 1) == "OPEN"


def test_an_admin_key_is_not_an_owner_and_cannot_replay(wire: Wire, admin: Ed25519PrivateKey) -> None:
    admin_id = crypto.key_id(admin.public_key())
    as_owner = request_metadata(admin, admin_id, "GetJob", "jobA", time.time())
    error = refused(lambda: wire.stub.GetJob(pb.GetJobRequest(job_id="jobA"), metadata=as_owner))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    config = pb.OpenRoundRequest(job_id="jobA", round=1, round_config_json=json.dumps(TRAINING.to_json()).encode())
    metadata = request_metadata(admin, admin_id, "OpenRound", "jobA", time.time(), ADMIN_CONTEXT)
    assert wire.stub.OpenRound(config, metadata=metadata).state == "OPEN"
    error = refused(lambda: wire.stub.OpenRound(config, metadata=metadata))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAUTHENTICATED, "authentication failed")
    other_job = request_metadata(admin, admin_id, "OpenRound", "jobB", time.time(), ADMIN_CONTEXT)
    error = refused(lambda: wire.stub.OpenRound(config, metadata=other_job))  # signed for B, asks for A
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_open_signs_the_round_and_aggregate_matches_aggregate_round(wire: Wire, admin: Ed25519PrivateKey) -> None:
    with AdminClient(wire.server.address, admin, insecure=True) as client:
        opened = client.open_round("jobA", 1, TRAINING)
        assert (opened.state, opened.done) == ("OPEN", False) and opened.adapter is not None
        pinned = wire.key.public_key()
        message = verify_round_message(pinned, opened.message, opened.signature, job_id="jobA",
                                       config=TRAINING.for_round(1), adapter=reference())
        assert message.adapter_sha256 == adapter_sha256(opened.adapter) == adapter_sha256(reference())
        changed = {name: value + 1e-3 for name, value in reference().items()}
        for kwargs in ({"config": TRAINING.for_round(2), "adapter": reference()},
                       {"config": RoundConfig(lr=2e-3, max_length=32).for_round(1), "adapter": reference()},
                       {"config": TRAINING.for_round(1), "adapter": changed}):
            with pytest.raises(RoundMessageError):
                verify_round_message(pinned, opened.message, opened.signature, job_id="jobA", **kwargs)
        with pytest.raises(RoundMessageError, match="not signed"):
            verify_round_message(Ed25519PrivateKey.generate().public_key(), opened.message, opened.signature,
                                 job_id="jobA", config=TRAINING.for_round(1), adapter=reference())
        assert client.open_round("jobA", 1, TRAINING).message == opened.message  # idempotent

        for owner, examples in (("alice", 5), ("bob", 9)):
            wire.submit(wire.seal(good_delta(0.01 * examples), owner=owner, upload_id=f"{owner}-1",
                                  num_examples=examples))
        expected, count = aggregate_round(wire.storage, "jobA", 1, reference())
        result = client.aggregate_round("jobA", 1, 2)
        assert (result.record.state, result.record.deltas, count) == ("AGGREGATED", 2, 2)
        assert sorted(result.adapter) == sorted(expected)
        for name, value in expected.items():
            assert torch.equal(result.adapter[name], value.to(torch.float32)), name
        assert wire.store.round_state("jobA", 1) == "AGGREGATED"
        again = client.aggregate_round("jobA", 1, 2)  # a checkpointed round: the recorded result, nothing redone
        assert again.record == result.record and adapter_sha256(again.adapter) == adapter_sha256(result.adapter)
        assert client.open_round("jobA", 1, TRAINING).done
        second = client.open_round("jobA", 2, TRAINING)  # round 2 trains from the aggregated adapter
        assert verify_round_message(pinned, second.message, second.signature, job_id="jobA",
                                    config=TRAINING.for_round(2), adapter=result.adapter).round == 2
        aborted = client.aggregate_round("jobA", 2, 1)  # no delta: aborted, the adapter stays
        assert aborted.record.state == "ABORTED" and "fewer than the minimum 1" in (aborted.record.reason or "")
        assert adapter_sha256(aborted.adapter) == adapter_sha256(result.adapter)
        error = refused(lambda: client.open_round("jobA", 4, TRAINING))  # rounds go in order
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_admin_key_init_writes_a_private_key_and_registers_it(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "serverapp" / "admin.key"
    result = CliRunner().invoke(coordinator_app, ["admin-key", "init", "--out", str(out), "--state", str(state)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600
    identity = crypto.key_id(crypto.load_private_key(out).public_key())
    assert admin_public_key(state, identity) is not None and identity in result.output
    again = CliRunner().invoke(coordinator_app, ["admin-key", "init", "--out", str(out), "--state", str(state)])
    assert again.exit_code == ExitCode.BAD_INPUT  # never overwritten without --force


# --- the ClientApp refuses a train message the coordinator's key does not vouch for ----------------------------

def signed_message(key: Ed25519PrivateKey, adapter: dict[str, torch.Tensor], training: RoundConfig,
                   round_number: int, signed: tuple[bytes, bytes] | None = None) -> Message:
    message, signature = signed or sign_round_message(key, "jobA", training.for_round(round_number), adapter)
    return train_messages(None, [1], adapter, training, round_number, message, signature)[0]  # type: ignore[arg-type]


def test_the_client_app_verifies_the_round_message_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    for attribute, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as inside a ServerApp
        monkeypatch.setattr(TaskIdentity, attribute, value)
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    adapter = reference()
    good = sign_round_message(key, "jobA", TRAINING.for_round(3), adapter)
    config, received, message = verify_train_message(signed_message(key, adapter, TRAINING, 3, good),
                                                     key.public_key(), "jobA")
    assert config == TRAINING.for_round(3) and message.round == 3
    assert all(torch.equal(received[n], adapter[n]) for n in adapter)

    changed = {name: value.clone() for name, value in adapter.items()}
    first = sorted(changed)[0]
    changed[first].view(-1)[0] += 1.0
    tampered = {
        "adapter": signed_message(key, changed, TRAINING, 3, good),
        "config": signed_message(key, adapter, RoundConfig(lr=5e-2, max_length=32), 3, good),
        "round": signed_message(key, adapter, TRAINING, 4, good),
        "another key": signed_message(other, adapter, TRAINING, 3),
        "no signature": signed_message(key, adapter, TRAINING, 3, (good[0], b"")),
    }
    for what, msg in tampered.items():
        with pytest.raises(RoundMessageError):
            verify_train_message(msg, key.public_key(), "jobA")
            pytest.fail(f"accepted a train message with a changed {what}")
    with pytest.raises(RoundMessageError, match="job"):
        verify_train_message(signed_message(key, adapter, TRAINING, 3, good), key.public_key(), "jobB")


# --- the ServerApp's code never reaches the coordinator's state or keys -------------------------------------------

FORBIDDEN = {"coordinator.storage", "coordinator.keyring", "coordinator.state", "coordinator.intake",
             "coordinator.round_service", "coordinator.handlers", "coordinator.server", "coordinator.paths",
             "coordinator.blobs", "coordinator.jobs"}


def our_imports(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "coordinator" and name != "coordinator"}


def test_the_server_app_never_opens_the_state_or_a_coordinator_key() -> None:
    seen, todo = set(), ["coordinator.flower_app"]
    while todo:  # every coordinator module the ServerApp loads, transitively
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(our_imports(module))
    assert "coordinator.federation" in seen and "coordinator.admin_client" in seen
    assert not seen & FORBIDDEN, sorted(seen & FORBIDDEN)
    names = set(FederationSettings.__dataclass_fields__)
    assert not {"state_dir", "checkpoint_dir"} & names and {"coordinator", "admin_key"} <= names
