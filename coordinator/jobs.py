"""Creating a job: verify its bundle, keep a tar of it and the reference adapter, record it in the state."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import load_file, save_file

from coordinator.errors import InvalidSettingError, InvalidTransitionError
from coordinator.records import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_NUM_EXAMPLES,
    DEFAULT_MAX_UPLOAD,
    Job,
    JobRow,
    check_id,
    delta_norm_bound,
)
from coordinator.state import StateStore
from coordinator.storage import Storage
from emulator.aggregate import AggregatorConfig, AggregatorConfigError
from protos.adapter_spec import AdapterSpec
from protos.bundle import pack_bundle, verify_bundle_dir
from protos.crypto import sha256_file
from protos.files import atomic_write
from protos.tensors import global_norm

BUNDLE_TAR = "bundle.tar"
REFERENCE_FILE = "reference.safetensors"


def job_dir(storage: Storage, job_id: str) -> Path:
    return storage.dir / "jobs" / check_id("job id", job_id)


def bundle_tar(storage: Storage, job_id: str) -> Path:
    return job_dir(storage, storage.store.job(job_id).job_id) / BUNDLE_TAR


def check_job_settings(*, max_delta_norm_ratio: float, aggregator: str, clip_norm: float | None,
                       max_num_examples: int) -> None:
    """Refuse a setting that would disable a bound (inf, nan, <= 0) or an unknown aggregator, naming the field."""
    if not (math.isfinite(max_delta_norm_ratio) and max_delta_norm_ratio > 0):
        raise InvalidSettingError(f"{{max_delta_norm_ratio}} must be a finite number > 0, got {max_delta_norm_ratio}")
    if type(max_num_examples) is not int or not 1 <= max_num_examples <= 2**48:  # 2**48: a header's own limit
        raise InvalidSettingError(f"{{max_num_examples}} must be an integer in [1, 2**48], got {max_num_examples!r}")
    try:
        AggregatorConfig(aggregator, clip_norm=clip_norm)
    except AggregatorConfigError as error:
        raise InvalidSettingError(error.template) from error


def num_examples_cap(store: StateStore, job: Job, owner_id: str) -> int:
    """The most examples ``owner_id`` may claim in one upload to ``job``. Today every owner gets the job's
    ``max_num_examples``; a per-owner cap belongs here."""
    return job.max_num_examples


def create_job(storage: Storage, job_id: str, bundle_dir: Path, coordinator_key: Ed25519PublicKey, *,
               adapter_spec: AdapterSpec | None = None, reference_adapter: dict[str, torch.Tensor] | None = None,
               max_delta_norm_ratio: float = 1.0, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               chunk_size: int = DEFAULT_CHUNK_SIZE, aggregator: str = "fedavg", clip_norm: float | None = None,
               max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES) -> Job:
    """Verify the bundle, keep a tar of it and the reference adapter (whose norm bounds deltas), record the job.

    ``adapter_spec`` and ``reference_adapter`` default to the bundle's own (the ``layers`` method); ``clip_norm``
    defaults to the delta norm bound (``max_delta_norm_ratio`` times the reference adapter's norm)."""
    check_job_settings(max_delta_norm_ratio=max_delta_norm_ratio, aggregator=aggregator, clip_norm=clip_norm,
                       max_num_examples=max_num_examples)
    directory = job_dir(storage, job_id)
    bundle = verify_bundle_dir(Path(bundle_dir), coordinator_key)
    spec = adapter_spec or bundle.adapter_spec
    reference = reference_adapter if reference_adapter is not None else load_file(bundle.adapter_weights)
    if storage.store.has_job(job_id):
        raise InvalidTransitionError(f"job {job_id!r} already exists")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    tar = pack_bundle(bundle.root, directory / BUNDLE_TAR)
    atomic_write(directory / REFERENCE_FILE,
                 lambda path: save_file({k: v.contiguous() for k, v in reference.items()}, str(path)))
    reference_norm = global_norm(reference)
    storage.store.insert_job(JobRow(
        job_id=job_id, bundle_digest=bundle.digest, bundle_tar_sha256=sha256_file(tar),
        bundle_size=tar.stat().st_size, adapter_spec_json=json.dumps(spec.to_json()), spec_digest=spec.digest(),
        reference_norm=reference_norm, max_delta_norm_ratio=float(max_delta_norm_ratio),
        max_upload_bytes=max_upload_bytes, max_plaintext_bytes=max_upload_bytes, chunk_size=chunk_size,
        aggregator=aggregator,
        clip_norm=float(clip_norm if clip_norm is not None else delta_norm_bound(max_delta_norm_ratio, reference_norm)),
        max_num_examples=max_num_examples))
    return storage.store.job(job_id)
