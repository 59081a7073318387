"""The coordinator service's side of a job's rounds (the admin calls ``OpenRound`` and ``AggregateRound``): open a
round and sign its round message, then close it, unseal + validate + aggregate its stored deltas and checkpoint.

Everything that touches the state, the delta keys or the checkpoints happens here, in the coordinator's process;
the ServerApp only orchestrates Flower messages. A restarted run resumes after the last checkpointed round and
never counts a delta twice: each (job, round, owner) slot holds one upload, a round is aggregated exactly once,
from its stored uploads, before its checkpoint is written, and asking again for a checkpointed round returns the
recorded result. Only owners still approved when the round is aggregated count; each delta is clipped to the
job's ``clip_norm`` and combined with the job's aggregator (``emulator.aggregate``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file

from coordinator.errors import InvalidTransitionError, NotFoundError
from coordinator.intake import open_accepted_upload
from coordinator.progress import Progress, RoundRecord, checkpoint_path, save_checkpoint
from coordinator.records import UploadRecord
from coordinator.state import StateStore
from coordinator.storage import Storage
from emulator.aggregate import AggregatorConfig, WeightedDelta, aggregate
from protos.round_config import RoundConfig
from protos.round_message import sign_round_message


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


@dataclass(frozen=True)
class OpenedRound:
    state: str  # OPEN (send train messages), CLOSED or ABORTED (aggregate only), AGGREGATED (already done)
    done: bool  # checkpointed already: nothing to send or aggregate
    message: bytes = b""  # the signed round message (OPEN only)
    signature: bytes = b""
    adapter: dict[str, torch.Tensor] | None = None  # the global adapter the round trains from (OPEN only)


@dataclass(frozen=True)
class AggregatedRound:
    record: RoundRecord
    adapter: dict[str, torch.Tensor]  # the new global adapter (the previous one when the round was aborted)


def _recorded(progress: Progress, round_number: int) -> RoundRecord:
    for record in progress.rounds:
        if record.round == round_number:
            return record
    return RoundRecord(round=round_number, state="AGGREGATED")


class RoundKeeper:
    """A job's rounds, with its checkpoints in ``checkpoint_root/JOB_ID`` (``round-0000.safetensors`` is the
    initial global adapter)."""

    def __init__(self, storage: Storage, signing_key: Ed25519PrivateKey, checkpoint_root: Path) -> None:
        self.storage, self.signing_key, self.checkpoint_root = storage, signing_key, Path(checkpoint_root)

    def checkpoints(self, job_id: str) -> Path:
        return self.checkpoint_root / job_id

    def _progress(self, job_id: str) -> Progress:
        directory = self.checkpoints(job_id)
        if not checkpoint_path(directory, 0).is_file():
            raise NotFoundError(f"job {job_id!r} has no initial checkpoint in {directory}")
        progress = Progress.load(directory)
        start = progress.completed_round
        if start and round_state(self.storage.store, job_id, start) == "CLOSED":  # checkpointed, not yet marked
            self.storage.store.mark_aggregated(job_id, start)
        return progress

    def _next(self, progress: Progress, round_number: int) -> None:
        if round_number < 1 or round_number > progress.completed_round + 1:
            raise InvalidTransitionError(f"round {round_number} cannot start: the last completed round is "
                                         f"{progress.completed_round}")

    def open_round(self, job_id: str, round_number: int, config: RoundConfig) -> OpenedRound:
        """Open the round (idempotent) and sign its round message over the current global adapter."""
        store = self.storage.store
        progress = self._progress(job_id)
        if round_number <= progress.completed_round:
            return OpenedRound(_recorded(progress, round_number).state, True)
        self._next(progress, round_number)
        if round_state(store, job_id, round_number) is None:
            store.open_round(job_id, round_number)
        state = round_state(store, job_id, round_number) or "OPEN"
        if state != "OPEN":
            return OpenedRound(state, False)
        adapter = load_file(str(checkpoint_path(self.checkpoints(job_id), progress.completed_round)))
        message, signature = sign_round_message(self.signing_key, job_id, config.for_round(round_number), adapter)
        return OpenedRound(state, False, message, signature, adapter)

    def aggregate_round(self, job_id: str, round_number: int, min_deltas: int,
                        report: RoundRecord | None = None) -> AggregatedRound:
        """Close the round, then aggregate its stored deltas (or abort it when fewer than ``min_deltas`` count)
        and checkpoint; ``report`` holds what the ServerApp saw (replies, errors, owner metrics)."""
        store, directory = self.storage.store, self.checkpoints(job_id)
        progress = self._progress(job_id)
        if round_number <= progress.completed_round:
            return AggregatedRound(_recorded(progress, round_number),
                                   load_file(str(checkpoint_path(directory, round_number))))
        self._next(progress, round_number)
        if round_state(store, job_id, round_number) is None:
            raise InvalidTransitionError(f"round {round_number} of job {job_id!r} was never opened")
        adapter = load_file(str(checkpoint_path(directory, progress.completed_round)))
        record = RoundRecord(round=round_number)
        if report is not None:
            record.replies, record.errors, record.owner_metrics = report.replies, report.errors, report.owner_metrics
        if round_state(store, job_id, round_number) == "OPEN":
            store.close_round(job_id, round_number)
        uploads = aggregatable_uploads(store, job_id, round_number)
        if len(uploads) < min_deltas:
            reason = f"{len(uploads)} accepted deltas, fewer than the minimum {min_deltas}"
            if round_state(store, job_id, round_number) != "ABORTED":
                store.abort_round(job_id, round_number, reason)
            record.state, record.reason = "ABORTED", reason
            progress.record(record)
            save_checkpoint(directory, round_number, adapter, progress)
            return AggregatedRound(record, adapter)
        if round_state(store, job_id, round_number) == "ABORTED":
            raise InvalidTransitionError(f"round {round_number} of job {job_id!r} was aborted")
        adapter, count = aggregate_round(self.storage, job_id, round_number, adapter)
        record.state, record.deltas = "AGGREGATED", count
        progress.record(record)
        save_checkpoint(directory, round_number, adapter, progress)
        store.mark_aggregated(job_id, round_number)
        return AggregatedRound(record, adapter)
