"""Who built a listed adapter, and by how much: each data owner's signed ``num_examples``, summed over the rounds
whose aggregation produced it.

The rounds are 1 .. the exported round, and only those the coordinator's state records as AGGREGATED: an aborted
round changed nothing (its checkpoint repeats the previous adapter). ``num_examples`` is the count each owner
signed in its sealed delta and the coordinator accepted (``uploads.num_examples``, capped per job); it is also the
delta's FedAvg weight, so the revenue split follows each owner's weight in the adapter. One approximation: an
upload from an owner who was revoked or removed after uploading but before the round was aggregated was skipped
by the aggregation yet is counted here (the state keeps no history of owner status).
"""

from __future__ import annotations

from pathlib import Path

from coordinator.errors import NotFoundError
from coordinator.state import DB_FILE, StateStore


def contributions(state_dir: Path, job_id: str, up_to_round: int) -> dict[str, int]:
    """``{owner_id: summed num_examples}`` over the job's aggregated rounds ``1..up_to_round``, by owner id."""
    if not (Path(state_dir) / DB_FILE).is_file():
        raise NotFoundError(f"{state_dir}: no coordinator state ({DB_FILE}) to read contributions from")
    store = StateStore(Path(state_dir))
    try:
        if not store.has_job(job_id):
            raise NotFoundError(f"job {job_id!r} is not in the coordinator state at {state_dir}")
        totals: dict[str, int] = {}
        for round_number in range(1, up_to_round + 1):
            try:
                if store.round_state(job_id, round_number) != "AGGREGATED":
                    continue
            except NotFoundError:
                continue
            for upload in store.accepted_uploads(job_id, round_number):
                totals[upload.owner_id] = totals.get(upload.owner_id, 0) + upload.num_examples
        return dict(sorted(totals.items()))
    finally:
        store.close()
