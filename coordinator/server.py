"""The coordinator's gRPC service: a thin layer that decodes requests, calls the handlers, maps errors to codes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError, Message

from coordinator import errors, handlers
from coordinator.access import AdminCaller, Caller, authenticate, authenticate_admin
from coordinator.errors import InvalidSettingError
from coordinator.keyring import UnknownDeltaKeyError
from coordinator.paths import load_or_create_signing_key
from coordinator.state import StateStore
from coordinator.storage import DiskFullError, Storage
from coordinator.transfers import TooBusyError, TransferGuard, TransferLimits
from protos import crypto, sealed
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.tensors import DeltaValidationError, SafetensorsFormatError

log = logging.getLogger(__name__)
SERVICE = "offsite.v1.Coordinator"
MAX_MESSAGE_BYTES = 64 << 20  # what any caller may send: requests are small; deltas arrive as a chunked stream
# What the service may send: OpenRound and AggregateRound return a whole global adapter (a 3+3-block SmolLM2 adapter
# is 85 MB) to the admin only. Larger replies never reach a stranger, who is answered before any adapter is read.
MAX_REPLY_BYTES = 1 << 30
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_REPLY_BYTES)]
# Most specific classes first: the first match wins.
STATUS_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.NotEnrolledError, grpc.StatusCode.PERMISSION_DENIED),
    (TooBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DiskFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownOwnerError, grpc.StatusCode.UNAUTHENTICATED),
    (sealed.SealedSignatureError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.OwnerNotApprovedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InvalidTransitionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownDeltaKeyError, grpc.StatusCode.FAILED_PRECONDITION),
    (sealed.ContextMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.SlotTakenError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.UploadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (sealed.SizeLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.OutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (errors.MalformedRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.TooManyExamplesError, grpc.StatusCode.INVALID_ARGUMENT),
    (sealed.SealedDeltaError, grpc.StatusCode.INVALID_ARGUMENT),
    (SafetensorsFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (DeltaValidationError, grpc.StatusCode.INVALID_ARGUMENT),
]
# What callers are told for these: nothing that names an owner, a job or a key (details go to the log).
GENERIC_DETAILS: dict[type[BaseException], str] = {
    errors.AuthenticationError: "authentication failed",
    errors.NotEnrolledError: "not enrolled in this job",
}
M = TypeVar("M", bound=Message)


def status_for(error: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS_CODES:
        if isinstance(error, kind):
            return code
    return None


def _abort(context: grpc.ServicerContext, error: BaseException) -> Any:
    code = status_for(error)
    if code is None:
        log.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")
    generic = GENERIC_DETAILS.get(type(error))
    if generic is not None:
        log.warning("%s from %s: %s", generic, context.peer(), error)
        context.abort(code, generic)
    context.abort(code, f"{type(error).__name__}: {error}")


class _Undecodable:
    """Stands for bytes that are not a protobuf message (grpc answers INTERNAL when a deserializer fails)."""


UNDECODABLE = _Undecodable()


def _lenient(message_type: type[M]) -> Callable[[bytes], M | _Undecodable]:
    def parse(raw: bytes) -> M | _Undecodable:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return UNDECODABLE
    return parse


def _require(message: M | _Undecodable) -> M:
    if isinstance(message, _Undecodable):
        raise errors.MalformedRequestError("the request is not a valid protobuf message")
    return message


class CoordinatorService:
    """Every method authenticates the caller from the call's metadata first (:mod:`coordinator.access`), before
    it reads a request stream; transfers hold a slot of :class:`TransferGuard` for their whole life."""

    def __init__(self, state: handlers.ServerState, guard: TransferGuard) -> None:
        self.state, self.guard = state, guard

    def _caller(self, context: grpc.ServicerContext, method: str) -> Caller:
        return authenticate(self.state.store, context.invocation_metadata(), method, self.state.clock())

    def _admin(self, context: grpc.ServicerContext, method: str) -> AdminCaller:
        return authenticate_admin(self.state.store, self.state.storage.dir, context.invocation_metadata(), method,
                                  self.state.clock())

    def OpenRound(self, request: pb.OpenRoundRequest | _Undecodable, context: grpc.ServicerContext) -> pb.OpenedRound:
        try:
            admin = self._admin(context, "OpenRound")
            return handlers.open_round(_require(request), self.state, admin)
        except Exception as error:  # noqa: BLE001
            return _abort(context, error)

    def AggregateRound(self, request: pb.AggregateRoundRequest | _Undecodable,
                       context: grpc.ServicerContext) -> pb.AggregatedRound:
        try:
            admin = self._admin(context, "AggregateRound")
            return handlers.aggregate_round(_require(request), self.state, admin)
        except Exception as error:  # noqa: BLE001
            return _abort(context, error)

    def GetJob(self, request: pb.GetJobRequest | _Undecodable, context: grpc.ServicerContext) -> pb.SignedJobManifest:
        try:
            caller = self._caller(context, "GetJob")
            return handlers.get_job(_require(request), self.state, caller)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            return _abort(context, error)

    def DownloadBundle(self, request: pb.DownloadBundleRequest | _Undecodable,
                       context: grpc.ServicerContext) -> Iterator[pb.BundleChunk]:
        try:
            caller = self._caller(context, "DownloadBundle")
            with self.guard.transfer(caller.owner.owner_id, context) as touch:
                for chunk in handlers.download_bundle(_require(request), self.state, caller):
                    yield chunk
                    touch()
        except Exception as error:  # noqa: BLE001
            _abort(context, error)

    def SubmitDelta(self, requests: Iterator[pb.SubmitDeltaRequest | _Undecodable],
                    context: grpc.ServicerContext) -> pb.SignedReceipt:
        try:
            caller = self._caller(context, "SubmitDelta")  # before the first message is read
            with self.guard.transfer(caller.owner.owner_id, context) as touch:
                def decoded() -> Iterator[pb.SubmitDeltaRequest | None]:
                    for message in requests:
                        touch()
                        yield None if isinstance(message, _Undecodable) else message
                return handlers.submit_delta(decoded(), self.state, caller)
        except Exception as error:  # noqa: BLE001
            return _abort(context, error)

    def GetRoundStatus(self, request: pb.GetRoundStatusRequest | _Undecodable,
                       context: grpc.ServicerContext) -> pb.RoundStatus:
        try:
            caller = self._caller(context, "GetRoundStatus")
            return handlers.round_status(_require(request), self.state, caller)
        except Exception as error:  # noqa: BLE001
            return _abort(context, error)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        ser = pb.SignedJobManifest.SerializeToString
        return grpc.method_handlers_generic_handler(SERVICE, {
            "GetJob": grpc.unary_unary_rpc_method_handler(
                self.GetJob, _lenient(pb.GetJobRequest), ser),
            "DownloadBundle": grpc.unary_stream_rpc_method_handler(
                self.DownloadBundle, _lenient(pb.DownloadBundleRequest), pb.BundleChunk.SerializeToString),
            "SubmitDelta": grpc.stream_unary_rpc_method_handler(
                self.SubmitDelta, _lenient(pb.SubmitDeltaRequest), pb.SignedReceipt.SerializeToString),
            "GetRoundStatus": grpc.unary_unary_rpc_method_handler(
                self.GetRoundStatus, _lenient(pb.GetRoundStatusRequest), pb.RoundStatus.SerializeToString),
            "OpenRound": grpc.unary_unary_rpc_method_handler(
                self.OpenRound, _lenient(pb.OpenRoundRequest), pb.OpenedRound.SerializeToString),
            "AggregateRound": grpc.unary_unary_rpc_method_handler(
                self.AggregateRound, _lenient(pb.AggregateRoundRequest), pb.AggregatedRound.SerializeToString),
        })


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    storage: Storage
    state: handlers.ServerState
    guard: TransferGuard

    @property
    def store(self) -> StateStore:
        return self.storage.store

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace).wait()
        self.guard.stop()
        self.storage.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _read(value: Path | bytes | None) -> bytes | None:
    return Path(value).read_bytes() if isinstance(value, str | Path) else value


def start_server(state_dir: Path, port: int = 0, *, host: str = "127.0.0.1", tls_cert: Path | bytes | None = None,
                 tls_key: Path | bytes | None = None, client_ca: Path | bytes | None = None, insecure: bool = False,
                 signing_key: Ed25519PrivateKey | Path | None = None,
                 limits: TransferLimits | None = None, checkpoint_root: Path | None = None) -> RunningServer:
    """Start the service in this process; ``port=0`` picks a free port (see ``.port``). Stop with ``.stop()``.
    Each job's round checkpoints live in ``checkpoint_root/JOB_ID`` (default ``STATE/checkpoints``).

    One thread per admitted call: ``limits.max_transfers`` for streams plus a reserve for unary calls; calls
    beyond that are refused at once (RESOURCE_EXHAUSTED) rather than queued behind stalled transfers."""
    limits = limits or TransferLimits()
    if isinstance(signing_key, Ed25519PrivateKey):
        key = signing_key
    elif signing_key is not None:
        key = crypto.load_private_key(Path(signing_key))
    else:
        key = load_or_create_signing_key(None)[0]
    storage = Storage.open(state_dir, recover=True)
    state = handlers.ServerState(storage, key, checkpoint_root=Path(checkpoint_root) if checkpoint_root else None)
    guard = TransferGuard(limits)
    server = grpc.server(ThreadPoolExecutor(max_workers=limits.workers), options=GRPC_OPTIONS,
                         maximum_concurrent_rpcs=limits.workers)
    server.add_generic_rpc_handlers((CoordinatorService(state, guard).generic_handler(),))
    if tls_cert is not None and tls_key is not None:
        ca, pair = _read(client_ca), (Path(tls_key).read_bytes() if isinstance(tls_key, str | Path) else tls_key,
                                      Path(tls_cert).read_bytes() if isinstance(tls_cert, str | Path) else tls_cert)
        credentials = grpc.ssl_server_credentials([pair], root_certificates=ca,
                                                  require_client_auth=ca is not None)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    elif insecure:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        guard.stop()
        storage.close()
        raise InvalidSettingError("give {tls_cert} and {tls_key}, or {insecure} (plain text, meant for localhost)")
    server.start()
    return RunningServer(server, bound, storage, state, guard)
