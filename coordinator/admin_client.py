"""The ServerApp's connection to the coordinator's service: admin calls signed with an admin key
(``admin-request/v1``). It holds no coordinator key: the service opens, validates and aggregates sealed deltas and
signs each round message; this side checks what comes back against the pinned ``coordinator.pub``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from types import TracebackType

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load

from coordinator.errors import CoordinatorError
from coordinator.progress import RoundRecord
from protos import serde
from protos.crypto import key_id
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.offsite.v1.coordinator_pb2_grpc import CoordinatorStub
from protos.request_auth import ADMIN_CONTEXT, request_metadata
from protos.round_config import RoundConfig
from protos.round_message import adapter_sha256

MAX_MESSAGE_BYTES = 64 << 20
MAX_ADAPTER_REPLY_BYTES = 1 << 30  # OpenedRound / AggregatedRound carry a whole global adapter (the server's cap)
OPTIONS = [("grpc.max_receive_message_length", MAX_ADAPTER_REPLY_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class AdminCallError(CoordinatorError):
    """The coordinator's service answered an admin call with something inconsistent."""


@dataclass(frozen=True)
class RoundOpened:
    state: str
    done: bool
    message: bytes
    signature: bytes
    adapter: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class RoundAggregated:
    record: RoundRecord
    adapter: dict[str, torch.Tensor]


class AdminClient:
    def __init__(self, address: str, admin_key: Ed25519PrivateKey, *, root_certificates: bytes | None = None,
                 insecure: bool = False, timeout_s: float = 600.0) -> None:
        if insecure:
            self.channel = grpc.insecure_channel(address, options=OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates),
                                               options=OPTIONS)
        self.stub = CoordinatorStub(self.channel)
        self.admin_key, self.key_id, self.timeout_s = admin_key, key_id(admin_key.public_key()), timeout_s

    def _auth(self, method: str, job_id: str) -> list[tuple[str, str | bytes]]:
        return request_metadata(self.admin_key, self.key_id, method, job_id, time.time(), ADMIN_CONTEXT)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def open_round(self, job_id: str, round_number: int, config: RoundConfig) -> RoundOpened:
        request = pb.OpenRoundRequest(job_id=job_id, round=round_number,
                                      round_config_json=json.dumps(config.to_json()).encode())
        reply = serde.opened_round_from_pb(
            self.stub.OpenRound(request, metadata=self._auth("OpenRound", job_id), timeout=self.timeout_s))
        adapter = load(reply.adapter) if reply.adapter else None
        return RoundOpened(reply.state, reply.done, reply.message, reply.signature, adapter)

    def aggregate_round(self, job_id: str, round_number: int, min_deltas: int,
                        report: RoundRecord | None = None) -> RoundAggregated:
        request = pb.AggregateRoundRequest(job_id=job_id, round=round_number, min_deltas=min_deltas,
                                           report_json=json.dumps(report.to_json()).encode() if report else b"")
        reply = serde.aggregated_round_from_pb(
            self.stub.AggregateRound(request, metadata=self._auth("AggregateRound", job_id), timeout=self.timeout_s))
        adapter = load(reply.adapter)
        if adapter_sha256(adapter) != reply.adapter_sha256:
            raise AdminCallError(f"round {round_number}: the aggregated adapter does not match its sha256")
        return RoundAggregated(RoundRecord.from_json(json.loads(reply.record_json), "record_json"), adapter)
