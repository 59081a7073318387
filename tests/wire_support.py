"""Shared fixtures for the wire tests: a real bundle, a real in-process server, real keys, no mocks."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.transport import CoordinatorClient
from coordinator.blobs import BlobStore
from coordinator.jobs import create_job
from coordinator.keyring import DeltaKeyring
from coordinator.server import RunningServer, start_server
from coordinator.state import StateStore
from coordinator.storage import Storage
from protos import serde
from protos.adapter_spec import AdapterSpec, TensorSpec
from protos.crypto import sign
from protos.messages import JobInfo, Receipt
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.offsite.v1.coordinator_pb2_grpc import CoordinatorStub
from protos.sealed import (
    PREAMBLE_CONTEXT,
    TRAILER_CONTEXT,
    SealedDelta,
    SealedHeader,
    preamble_message,
    trailer_message,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPEC = AdapterSpec("test", (TensorSpec("a", "a", (64, 32), "F32"), TensorSpec("b", "b", (32,), "F32"),
                            TensorSpec("c", "c", (16, 16), "F16")))
CHUNK = 1024


def reference() -> dict[str, torch.Tensor]:
    return {t.name: torch.ones(t.shape, dtype=torch.float16 if t.dtype == "F16" else torch.float32)
            for t in SPEC.tensors}


def good_delta(scale: float = 0.01) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: (torch.randn(t.shape, generator=generator) * scale).to(t.dtype) for name, t in reference().items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Ed25519PrivateKey]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from coordinator.bundles import build_bundle
    from emulator.loading import embedded_model_path
    from emulator.split import SplitConfig

    key = Ed25519PrivateKey.generate()
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    torch.manual_seed(0)
    full = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))
    build_bundle(full, str(embedded_model_path()), "tiny-gpt2", SplitConfig(1, 1, 1), out, key)
    return out, key


def populate(storage: Storage, bundle: Path, key: Ed25519PrivateKey, owners: dict[str, Ed25519PrivateKey],
             **job_options: int) -> None:
    """Jobs A (round 1 OPEN) and B (round 1 CLOSED, round 2 OPEN); alice and bob approved, carol pending."""
    store = storage.store
    for job_id in ("jobA", "jobB"):
        create_job(storage, job_id, bundle, key.public_key(), adapter_spec=SPEC, reference_adapter=reference(),
                   chunk_size=CHUNK, **job_options)
    store.open_round("jobA", 1)
    store.open_round("jobB", 1)
    store.close_round("jobB", 1)
    store.open_round("jobB", 2)
    for name, owner_key in owners.items():
        store.add_owner(name, owner_key.public_key(), approved=name != "carol")
        for job_id in ("jobA", "jobB"):
            store.enroll(job_id, name)


@dataclass
class Wire:
    server: RunningServer
    key: Ed25519PrivateKey
    owners: dict[str, Ed25519PrivateKey]
    client: CoordinatorClient
    stub: CoordinatorStub
    channel: grpc.Channel
    clients: dict[str, CoordinatorClient]

    @property
    def store(self) -> StateStore:
        return self.server.store

    @property
    def storage(self) -> Storage:
        return self.server.storage

    @property
    def blobs(self) -> BlobStore:
        return self.server.storage.blobs

    @property
    def keyring(self) -> DeltaKeyring:
        return self.server.storage.keyring

    def job(self, job_id: str = "jobA") -> JobInfo:
        return self.client.get_job(job_id)

    def client_of(self, owner: str) -> CoordinatorClient:
        """A client signing its calls as ``owner`` (same channel target, its own key)."""
        if owner not in self.clients:
            self.clients[owner] = CoordinatorClient(self.server.address, coordinator_key=self.key.public_key(),
                                                    owner_key=self.owners[owner], owner_id=owner, insecure=True,
                                                    backoff_s=0.05)
        return self.clients[owner]

    def auth(self, method: str, *, owner: str = "alice", job_id: str = "jobA") -> list[tuple[str, str | bytes]]:
        return self.client_of(owner)._auth(method, job_id)

    def seal(self, delta: dict[str, torch.Tensor] | bytes | None = None, *, owner: str = "alice",
             job_id: str = "jobA", round: int = 1, upload_id: str = "up-1", num_examples: int = 7) -> SealedDelta:
        return self.client.seal(self.job(job_id), round, good_delta() if delta is None else delta,
                                self.owners[owner], num_examples, upload_id, owner_id=owner)

    def submit(self, sealed: SealedDelta) -> Receipt:
        """Upload as the owner the sealed header names."""
        return self.client_of(sealed.header.owner_id).submit_sealed(sealed)

    def send(self, messages: list[pb.SubmitDeltaRequest], *, owner: str = "alice",
             job_id: str = "jobA") -> pb.SignedReceipt:
        return self.stub.SubmitDelta(iter(messages), metadata=self.auth("SubmitDelta", owner=owner, job_id=job_id))

    def assert_nothing_written(self) -> None:
        assert self.blobs.visible() == []
        assert list(self.blobs.tmp.iterdir()) == []
        assert self.store.round_status("jobA", 1)[2] == 0
        assert self.client.round_status("jobA", 1).state == "OPEN"  # still serving


def requests(sealed: SealedDelta, chunks: list[bytes] | None = None, *,
             trailer: bytes | None = None) -> list[pb.SubmitDeltaRequest]:
    """The preamble, the chunks (``sealed``'s own unless given), the trailer (``sealed``'s own unless given)."""
    parts = [bytes(c) for c in sealed.chunks()] if chunks is None else chunks
    return [serde.preamble_to_pb(sealed.header_json, sealed.wrapped_key, sealed.signature),
            *[pb.SubmitDeltaRequest(chunk=c) for c in parts],
            serde.trailer_to_pb(sealed.trailer if trailer is None else trailer)]


def resign(sealed: SealedDelta, key: Ed25519PrivateKey, *, header_json: bytes | None = None,
           wrapped_key: bytes | None = None, chunks: list[bytes] | None = None) -> SealedDelta:
    """What a malicious owner can do: change any part and sign the result (preamble and trailer) with its own key.
    The trailer signs the tags as the coordinator will see them: the last 16 bytes of each STREAM chunk."""
    header_json = sealed.header_json if header_json is None else header_json
    wrapped_key = sealed.wrapped_key if wrapped_key is None else wrapped_key
    ciphertext = bytes(sealed.ciphertext) if chunks is None else b"".join(chunks)
    header = SealedHeader.from_bytes(header_json)
    signature = sign(key, PREAMBLE_CONTEXT, preamble_message(header_json, wrapped_key))
    bad = SealedDelta(header, header_json, wrapped_key, signature, ciphertext, b"")
    bad.trailer = sign(key, TRAILER_CONTEXT, trailer_message(header_json, wrapped_key, bad.tags_digest()))
    return bad


def with_header(sealed: SealedDelta, **changes: object) -> bytes:
    return replace(sealed.header, **changes).to_bytes()  # type: ignore[arg-type]


@pytest.fixture
def wire(tmp_path: Path, bundle_dir: tuple[Path, Ed25519PrivateKey]) -> Iterator[Wire]:
    bundle, key = bundle_dir
    owners = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob", "carol")}
    server = start_server(tmp_path / "state", signing_key=key, insecure=True)
    populate(server.storage, bundle, key, owners)
    client = CoordinatorClient(server.address, coordinator_key=key.public_key(), owner_key=owners["alice"],
                               owner_id="alice", insecure=True, backoff_s=0.05)
    channel = grpc.insecure_channel(server.address)
    wire = Wire(server, key, owners, client, CoordinatorStub(channel), channel, {"alice": client})
    try:
        yield wire
    finally:
        channel.close()
        for each in wire.clients.values():
            each.close()
        server.stop()
