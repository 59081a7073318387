"""Creating a job: verify its bundle, keep a tar of it and the reference adapter, record it in the state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import load_file, save_file

from coordinator.errors import InvalidTransitionError
from coordinator.state import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_UPLOAD, Job, JobRow, check_id
from coordinator.storage import Storage
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


def create_job(storage: Storage, job_id: str, bundle_dir: Path, coordinator_key: Ed25519PublicKey, *,
               adapter_spec: AdapterSpec | None = None, reference_adapter: dict[str, torch.Tensor] | None = None,
               max_delta_norm_ratio: float = 1.0, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> Job:
    """Verify the bundle, keep a tar of it and the reference adapter (whose norm bounds deltas), record the job.

    ``adapter_spec`` and ``reference_adapter`` default to the bundle's own (the ``layers`` method)."""
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
    storage.store.insert_job(JobRow(
        job_id=job_id, bundle_digest=bundle.digest, bundle_tar_sha256=sha256_file(tar),
        bundle_size=tar.stat().st_size, adapter_spec_json=json.dumps(spec.to_json()), spec_digest=spec.digest(),
        reference_norm=global_norm(reference), max_delta_norm_ratio=float(max_delta_norm_ratio),
        max_upload_bytes=max_upload_bytes, max_plaintext_bytes=max_upload_bytes, chunk_size=chunk_size))
    return storage.store.job(job_id)
