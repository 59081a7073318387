"""The coordinator's records as Python sees them (owners, jobs, uploads), the SQL schema they live in, and the
defaults and id rules :class:`coordinator.state.StateStore` enforces."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.errors import InvalidSettingError
from protos.adapter_spec import AdapterSpec
from protos.files import utc_timestamp
from protos.sealed_header import ID_PATTERN

SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    owner_id TEXT PRIMARY KEY, public_key BLOB NOT NULL, key_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'revoked')), updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, bundle_digest TEXT NOT NULL, bundle_tar_sha256 TEXT NOT NULL,
    bundle_size INTEGER NOT NULL, adapter_spec TEXT NOT NULL, spec_digest TEXT NOT NULL,
    reference_norm REAL NOT NULL, max_delta_norm_ratio REAL NOT NULL, max_upload_bytes INTEGER NOT NULL,
    max_plaintext_bytes INTEGER NOT NULL, chunk_size INTEGER NOT NULL, created_at TEXT NOT NULL,
    aggregator TEXT NOT NULL DEFAULT 'fedavg', clip_norm REAL NOT NULL, max_num_examples INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL REFERENCES jobs(job_id), round INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('OPEN', 'CLOSED', 'AGGREGATED', 'ABORTED')),
    reason TEXT NOT NULL DEFAULT '', updated_at TEXT NOT NULL, PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT NOT NULL, job_id TEXT NOT NULL, round INTEGER NOT NULL,
    owner_id TEXT NOT NULL REFERENCES owners(owner_id), blob_sha256 TEXT NOT NULL, plaintext_sha256 TEXT NOT NULL,
    num_examples INTEGER NOT NULL, accepted_at TEXT NOT NULL, receipt_json BLOB NOT NULL, receipt_sig BLOB NOT NULL,
    preamble_sha256 TEXT NOT NULL, PRIMARY KEY (owner_id, upload_id),
    UNIQUE (job_id, round, owner_id), FOREIGN KEY (job_id, round) REFERENCES rounds(job_id, round));
"""
# Who may act on a job, and the request nonces seen recently (replay protection for authenticated RPCs).
ACCESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_members (
    job_id TEXT NOT NULL REFERENCES jobs(job_id), owner_id TEXT NOT NULL REFERENCES owners(owner_id),
    enrolled_at TEXT NOT NULL, PRIMARY KEY (job_id, owner_id));
CREATE TABLE IF NOT EXISTS request_nonces (
    owner_id TEXT NOT NULL, nonce TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (owner_id, nonce));
"""
TRANSITIONS = {"close": ({"OPEN"}, "CLOSED"), "aggregate": ({"CLOSED"}, "AGGREGATED"),
               "abort": ({"OPEN", "CLOSED"}, "ABORTED")}
DEFAULT_MAX_UPLOAD = 1 << 31
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_MAX_NUM_EXAMPLES = 1_000_000


def now() -> str:
    return utc_timestamp()


def check_id(kind: str, value: str) -> str:
    if not ID_PATTERN.match(value):  # the ids a sealed header may carry
        raise InvalidSettingError(f"{kind} {value!r}: use letters, digits, '.', '_', ':' or '-' (at most 128)")
    return value


@dataclass(frozen=True)
class JobRow:
    """A ``jobs`` row as written (``created_at`` is added on insert)."""

    job_id: str
    bundle_digest: str
    bundle_tar_sha256: str
    bundle_size: int
    adapter_spec_json: str
    spec_digest: str
    reference_norm: float
    max_delta_norm_ratio: float
    max_upload_bytes: int
    max_plaintext_bytes: int
    chunk_size: int
    aggregator: str  # an emulator.aggregate name
    clip_norm: float  # every delta is clipped to this L2 norm before aggregation
    max_num_examples: int  # the most examples one upload may claim


@dataclass(frozen=True)
class Owner:
    owner_id: str
    public_key: Ed25519PublicKey
    key_id: str
    status: str


@dataclass(frozen=True)
class Job:
    job_id: str
    bundle_digest: str
    bundle_tar_sha256: str
    bundle_size: int
    adapter_spec: AdapterSpec
    reference_norm: float
    max_delta_norm_ratio: float
    max_upload_bytes: int
    max_plaintext_bytes: int
    chunk_size: int
    aggregator: str
    clip_norm: float
    max_num_examples: int

    @property
    def max_delta_norm(self) -> float:
        return delta_norm_bound(self.max_delta_norm_ratio, self.reference_norm)


def delta_norm_bound(max_delta_norm_ratio: float, reference_norm: float) -> float:
    # A zero reference (a LoRA B, say) makes the ratio an absolute bound.
    return max_delta_norm_ratio * (reference_norm if reference_norm > 0 else 1.0)


@dataclass(frozen=True)
class UploadRecord:
    upload_id: str
    job_id: str
    round: int
    owner_id: str
    blob_sha256: str
    plaintext_sha256: str
    num_examples: int
    accepted_at: str
    receipt_json: bytes
    receipt_sig: bytes
    preamble_sha256: str  # of the sealed delta's preamble: a retry must bring exactly the same one
