"""The ServerApp's rounds: ask the coordinator's service to open a round, send the signed train messages, collect
the replies, ask the service to aggregate, resume.

This process holds no coordinator key and never touches the coordinator's state: it authenticates to the
coordinator's service with an admin key (``coordinator.admin_client``), which opens each round and signs its round
message (``protos.round_message``: the global adapter's sha256, the round and the round config), and which closes,
unseals, validates, aggregates and checkpoints (``coordinator.round_service``). Aggregation reads the deltas the
service accepted and stored (sealed), never the Flower replies: a reply only says which upload belongs to it. A
restarted run resumes after the last round the service checkpointed and never counts a delta twice. A malformed
reply is recorded as an error and never stops the round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.console import Console

from coordinator.admin_client import AdminClient, RoundAggregated, RoundOpened
from coordinator.errors import CoordinatorError, InvalidSettingError
from coordinator.progress import Progress, RoundRecord
from protos import crypto
from protos.round_config import RoundConfig
from protos.round_message import MESSAGE_KEY, SIGNATURE_KEY, RoundMessageError, verify_round_message

console = Console(stderr=True)


class FederationError(CoordinatorError):
    """The federation cannot go on (too few owners, a round aborted with on-abort=stop)."""


@dataclass(frozen=True)
class FederationSettings:
    job_id: str
    coordinator: str  # HOST:PORT of the coordinator's gRPC service
    admin_key: Path  # the admin key's private half (``offsite-coordinator admin-key init``)
    coordinator_key: Path | None = None  # the pinned coordinator.pub: round messages are checked before sending
    root_cert: Path | None = None  # CA of the coordinator's TLS certificate (None: the system roots)
    insecure: bool = False  # plain text, meant for localhost (``simulate``)
    num_rounds: int = 2
    min_replies: int = 2
    round_timeout: float = 600.0
    node_wait: float = 120.0
    on_abort: str = "continue"  # or "stop"
    training: RoundConfig = field(default_factory=RoundConfig)  # sent to the owners each round

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise InvalidSettingError(f"{{num_rounds}} must be >= 1, got {self.num_rounds}")
        if self.min_replies < 1:
            raise InvalidSettingError(f"{{min_replies}} must be >= 1, got {self.min_replies}")
        if self.on_abort not in ("continue", "stop"):
            raise InvalidSettingError(f"{{on_abort}} must be continue or stop, got {self.on_abort!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FederationSettings:
        """The ServerApp's settings from Flower's run config (``[tool.flwr.app.config]`` keys)."""
        for key in ("coordinator", "admin-key", "job-id"):
            if not str(config.get(key, "")):
                raise InvalidSettingError(f"run config {key!r} is not set; pass it with flwr run --run-config")
        defaults = {f.name: f.default for f in fields(cls)}
        insecure = config.get("insecure", False)
        if not isinstance(insecure, bool):
            raise InvalidSettingError(f"run config 'insecure' must be true or false, got {insecure!r}")
        return cls(
            job_id=str(config["job-id"]),
            coordinator=str(config["coordinator"]),
            admin_key=Path(str(config["admin-key"])),
            coordinator_key=Path(str(config["coordinator-key"])) if str(config.get("coordinator-key", "")) else None,
            root_cert=Path(str(config["root-cert"])) if str(config.get("root-cert", "")) else None,
            insecure=insecure,
            num_rounds=int(config.get("num-server-rounds", defaults["num_rounds"])),
            min_replies=int(config.get("min-replies", defaults["min_replies"])),
            round_timeout=float(config.get("round-timeout", defaults["round_timeout"])),
            node_wait=float(config.get("node-wait", defaults["node_wait"])),
            on_abort=str(config.get("on-abort", defaults["on_abort"])),
            training=RoundConfig.from_config(config),
        )

    def to_config(self) -> dict[str, bool | int | float | str]:
        """The run config that :meth:`from_config` reads back."""
        return {"job-id": self.job_id, "coordinator": self.coordinator, "admin-key": str(self.admin_key),
                "coordinator-key": str(self.coordinator_key) if self.coordinator_key else "",
                "root-cert": str(self.root_cert) if self.root_cert else "", "insecure": self.insecure,
                "num-server-rounds": self.num_rounds, "min-replies": self.min_replies,
                "round-timeout": self.round_timeout, "node-wait": self.node_wait, "on-abort": self.on_abort,
                **{k: v for k, v in self.training.to_config().items() if k != "server-round"}}


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def train_messages(grid: Grid, nodes: list[int], adapter: Mapping[str, torch.Tensor], training: RoundConfig,
                   round_number: int, message: bytes = b"", signature: bytes = b"") -> list[Message]:
    """One train message per node: the global adapter, the round config and the coordinator's signed round message
    over both (``protos.round_message``), which each owner checks before it trains."""
    arrays = ArrayRecord({k: v.to(torch.float32) for k, v in adapter.items()})  # ArrayRecord refuses bf16
    content: dict[str, Any] = {**training.for_round(round_number).to_config(), MESSAGE_KEY: message,
                               SIGNATURE_KEY: signature}
    return [
        Message(content=RecordDict({"global": arrays, "config": ConfigRecord(content)}), dst_node_id=node,
                message_type=MessageType.TRAIN)
        for node in nodes
    ]


REPLY_RECORDS = frozenset({"receipt", "metrics"})  # what a ClientApp's train reply holds


def reply_metrics(reply: Message) -> dict[str, float]:
    """A train reply's ``metrics`` record as finite floats; ValueError for any other shape of reply."""
    content = reply.content
    unexpected = sorted(set(content.keys()) - REPLY_RECORDS)
    if unexpected:
        raise ValueError(f"unexpected records {', '.join(map(repr, unexpected))}")
    metrics = content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise ValueError("no 'metrics' record")
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {key!r} is not a finite number")
        values[str(key)] = float(value)
    return values


def _collect_replies(grid: Grid, messages: list[Message], timeout: float, record: RoundRecord) -> None:
    """Send the round's messages and record the replies; nothing a reply holds (or lacks) raises: a failed or
    malformed reply becomes an entry in ``record.errors``. Aggregation reads the stored uploads, never replies."""
    record.replies, record.errors, record.owner_metrics = 0, [], []
    try:
        replies = list(grid.send_and_receive(messages, timeout=timeout))
    except Exception as error:  # noqa: BLE001 - the round is closed (and aborted if short) either way
        record.errors.append(f"sending the round failed: {type(error).__name__}: {error}")
        return
    for reply in replies:
        try:
            if reply.has_error():
                record.errors.append(str(reply.error.reason))
                continue
            record.owner_metrics.append(reply_metrics(reply))
            record.replies += 1
        except Exception as error:  # noqa: BLE001 - an owner's reply is untrusted input
            source = getattr(getattr(reply, "metadata", None), "src_node_id", "?")
            record.errors.append(f"malformed reply from node {source}: {error}")


class Rounds(Protocol):
    """What the ServerApp asks of the coordinator's service (``AdminClient``; tests may serve it in-process)."""

    def open_round(self, job_id: str, round_number: int, config: RoundConfig) -> RoundOpened: ...

    def aggregate_round(self, job_id: str, round_number: int, min_deltas: int,
                        report: RoundRecord | None = None) -> RoundAggregated: ...


def run_rounds(grid: Grid, settings: FederationSettings,
               on_round: Callable[[int, dict[str, torch.Tensor]], dict[str, float]] | None = None) -> Progress:
    """Run (or resume) the job's rounds through the coordinator's service; returns this run's round records."""
    root = settings.root_cert.read_bytes() if settings.root_cert else None
    with AdminClient(settings.coordinator, crypto.load_private_key(settings.admin_key), root_certificates=root,
                     insecure=settings.insecure, timeout_s=max(600.0, settings.round_timeout)) as client:
        return _run_rounds(grid, settings, client, on_round)


def _run_rounds(grid: Grid, settings: FederationSettings, rounds: Rounds,
                on_round: Callable[[int, dict[str, torch.Tensor]], dict[str, float]] | None) -> Progress:
    progress = Progress()
    pinned = crypto.load_public_key(settings.coordinator_key) if settings.coordinator_key else None
    for round_number in range(1, settings.num_rounds + 1):
        training = settings.training.for_round(round_number)
        opened = rounds.open_round(settings.job_id, round_number, training)
        if opened.done:
            progress.completed_round = round_number
            continue
        record = RoundRecord(round=round_number)
        report: RoundRecord | None = None
        if opened.state == "OPEN":
            if opened.adapter is None:
                raise FederationError(f"round {round_number}: the coordinator sent no global adapter")
            if pinned is not None:
                try:
                    verify_round_message(pinned, opened.message, opened.signature, job_id=settings.job_id,
                                         config=training, adapter=opened.adapter)
                except RoundMessageError as error:
                    raise FederationError(f"round {round_number}: {error}") from error
            nodes = wait_for_nodes(grid, settings.min_replies, settings.node_wait)
            console.print(f"round {round_number}: training on {len(nodes)} data owners")
            messages = train_messages(grid, nodes, opened.adapter, settings.training, round_number, opened.message,
                                      opened.signature)
            _collect_replies(grid, messages, settings.round_timeout, record)
            report = record
        result = rounds.aggregate_round(settings.job_id, round_number, settings.min_replies, report)
        record = result.record
        progress.record(record)
        if record.state == "ABORTED":
            console.print(f"[yellow]round {round_number} aborted:[/] {record.reason}")
            if settings.on_abort == "stop":
                raise FederationError(f"round {round_number} aborted: {record.reason}")
            continue
        if on_round is not None:
            record.eval = on_round(round_number, result.adapter)
        console.print(f"round {round_number}: aggregated {record.deltas} sealed deltas")
    return progress
