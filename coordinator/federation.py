"""The coordinator's rounds: open, send train messages, close, unseal + validate, aggregate, checkpoint, resume.

Aggregation reads the deltas that the coordinator's own gRPC service accepted and stored (sealed), never the
Flower replies: a reply only says which upload belongs to it. A restarted coordinator resumes after the last
round it checkpointed and never counts a delta twice: each (job, round, owner) slot holds one upload, and a round
is aggregated exactly once, from its stored uploads, before its checkpoint is written. Only owners still approved
when the round is aggregated count; each delta is clipped to the job's ``clip_norm`` and combined with the job's
aggregator (``emulator.aggregate``). A malformed reply is recorded as an error and never stops the round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from rich.console import Console
from safetensors.torch import load_file

from coordinator.errors import CoordinatorError, InvalidSettingError, NotFoundError
from coordinator.intake import open_accepted_upload
from coordinator.progress import Progress, RoundRecord, checkpoint_path, save_checkpoint
from coordinator.state import StateStore, UploadRecord
from coordinator.storage import Storage
from emulator.aggregate import AggregatorConfig, WeightedDelta, aggregate
from protos.round_config import RoundConfig

console = Console(stderr=True)


class FederationError(CoordinatorError):
    """The federation cannot go on (too few owners, a round aborted with on-abort=stop)."""


@dataclass(frozen=True)
class FederationSettings:
    state_dir: Path
    job_id: str
    checkpoint_dir: Path
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
        for key in ("state-dir", "checkpoint-dir", "job-id"):
            if not str(config.get(key, "")):
                raise InvalidSettingError(f"run config {key!r} is not set; pass it with flwr run --run-config")
        defaults = {f.name: f.default for f in fields(cls)}
        return cls(
            state_dir=Path(str(config["state-dir"])),
            job_id=str(config["job-id"]),
            checkpoint_dir=Path(str(config["checkpoint-dir"])),
            num_rounds=int(config.get("num-server-rounds", defaults["num_rounds"])),
            min_replies=int(config.get("min-replies", defaults["min_replies"])),
            round_timeout=float(config.get("round-timeout", defaults["round_timeout"])),
            node_wait=float(config.get("node-wait", defaults["node_wait"])),
            on_abort=str(config.get("on-abort", defaults["on_abort"])),
            training=RoundConfig.from_config(config),
        )

    def to_config(self) -> dict[str, int | float | str]:
        """The run config that :meth:`from_config` reads back."""
        return {"state-dir": str(self.state_dir), "job-id": self.job_id, "checkpoint-dir": str(self.checkpoint_dir),
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
                   round_number: int) -> list[Message]:
    arrays = ArrayRecord({k: v.to(torch.float32) for k, v in adapter.items()})  # ArrayRecord refuses bf16
    content: dict[str, Any] = dict(training.for_round(round_number).to_config())
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


def aggregatable_uploads(store: StateStore, job_id: str, round_number: int) -> list[UploadRecord]:
    """The round's accepted uploads whose owner is still approved and enrolled in the job now (a revoked or
    removed owner's delta is skipped)."""
    return [u for u in store.accepted_uploads(job_id, round_number)
            if store.owner(u.owner_id).status == "approved" and store.is_member(job_id, u.owner_id)]


def aggregate_round(storage: Storage, job_id: str, round_number: int,
                    global_adapter: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The round's deltas from approved owners, each clipped to the job's ``clip_norm``, combined by the job's
    aggregator; returns the new global adapter and how many deltas it holds."""
    job = storage.store.job(job_id)
    uploads = aggregatable_uploads(storage.store, job_id, round_number)
    deltas = [WeightedDelta(u.owner_id, u.num_examples, open_accepted_upload(storage, u)) for u in uploads]
    config = AggregatorConfig(job.aggregator, clip_norm=job.clip_norm)
    return aggregate(global_adapter, deltas, config), len(deltas)


def round_state(store: StateStore, job_id: str, round_number: int) -> str | None:
    try:
        return store.round_state(job_id, round_number)
    except NotFoundError:
        return None


def run_rounds(grid: Grid, settings: FederationSettings,
               on_round: Callable[[int, dict[str, torch.Tensor]], dict[str, float]] | None = None) -> Progress:
    """Run (or resume) the job's rounds; returns the progress record (one entry per round)."""
    storage = Storage.open(settings.state_dir)
    try:
        return _run_rounds(grid, settings, storage, on_round)
    finally:
        storage.close()


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


def _run_rounds(grid: Grid, settings: FederationSettings, storage: Storage,
                on_round: Callable[[int, dict[str, torch.Tensor]], dict[str, float]] | None) -> Progress:
    store = storage.store
    directory = settings.checkpoint_dir
    progress = Progress.load(directory)
    start = progress.completed_round
    adapter = load_file(str(checkpoint_path(directory, start)))
    if start:
        console.print(f"resuming job {settings.job_id} after round {start}")
        if round_state(store, settings.job_id, start) == "CLOSED":  # checkpointed, not yet marked: a crash
            store.mark_aggregated(settings.job_id, start)
    for round_number in range(start + 1, settings.num_rounds + 1):
        record = RoundRecord(round=round_number)
        if round_state(store, settings.job_id, round_number) is None:
            store.open_round(settings.job_id, round_number)
        if round_state(store, settings.job_id, round_number) == "OPEN":
            nodes = wait_for_nodes(grid, settings.min_replies, settings.node_wait)
            console.print(f"round {round_number}: training on {len(nodes)} data owners")
            messages = train_messages(grid, nodes, adapter, settings.training, round_number)
            _collect_replies(grid, messages, settings.round_timeout, record)
            store.close_round(settings.job_id, round_number)
        uploads = aggregatable_uploads(store, settings.job_id, round_number)
        if len(uploads) < settings.min_replies:
            reason = f"{len(uploads)} accepted deltas, fewer than the minimum {settings.min_replies}"
            if round_state(store, settings.job_id, round_number) != "ABORTED":
                store.abort_round(settings.job_id, round_number, reason)
            record.state, record.reason = "ABORTED", reason
            console.print(f"[yellow]round {round_number} aborted:[/] {reason}")
            progress.record(record)
            save_checkpoint(directory, round_number, adapter, progress)
            if settings.on_abort == "stop":
                raise FederationError(f"round {round_number} aborted: {reason}")
            continue
        adapter, count = aggregate_round(storage, settings.job_id, round_number, adapter)
        record.state, record.deltas = "AGGREGATED", count
        if on_round is not None:
            record.eval = on_round(round_number, adapter)
        progress.record(record)
        save_checkpoint(directory, round_number, adapter, progress)
        store.mark_aggregated(settings.job_id, round_number)
        console.print(f"round {round_number}: aggregated {count} sealed deltas")
    return progress
