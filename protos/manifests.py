"""The typed documents on disk and on the wire: the bundle manifest and the job manifest.

Both are read with ``from_json``, which names the field at fault (see :mod:`protos.documents`), and written with
``to_json``; the signed bytes are always ``canonical_json`` of that JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from protos.adapter_spec import AdapterSpec
from protos.documents import Document, DocumentError

BUNDLE_FORMAT_VERSION = 1
BUNDLE_KIND = "offsite-bundle"
JOB_MANIFEST_KIND = "offsite-job-manifest"
TASKS = ("base", "causal-lm", "classification", "multiple-choice")
CAUSAL_TASKS = ("causal-lm", "multiple-choice")  # both run on a causal LM; multiple choice scores its choices
LAYER_ROLES = ("bottom", "middle", "top", "adapter")  # "adapter": a block of a spread adapter (explicit placement)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# -- the bundle manifest ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class BaseModelInfo(Document):
    id: str  # a hub id, a path, or "embedded:<name>"
    weights_sha256: str  # sha256 over every tensor's name, dtype, shape and bytes: the full model's identity
    model_type: str
    class_name: str = field(metadata={"json": "class"})  # the transformers class, e.g. BertForSequenceClassification
    family: str
    blocks_prefix: str
    n_layers: int
    num_parameters: int
    dequantized_from: str | None = None  # the weights' origin when they were dequantised (a GGUF's Q4_1, say)


@dataclass(frozen=True, kw_only=True)
class LayerMapEntry(Document):
    emulator_index: int
    full_index: int  # the full-model block whose weights the slot holds (slots with one source share it)
    role: str
    stands_for: int | None = None  # a shared slot: the full block whose place it takes

    def __post_init__(self) -> None:
        if self.role not in LAYER_ROLES:
            raise DocumentError("role", f"must be one of {', '.join(LAYER_ROLES)}, got {self.role!r}")


@dataclass(frozen=True, kw_only=True)
class CorpusInfo(Document):
    files: list[str]
    sha256: str
    documents: int
    held_out: int


@dataclass(frozen=True, kw_only=True)
class DistillationInfo(Document):
    settings: dict[str, Any]  # the emulator's DistillConfig, as its own JSON
    corpus: CorpusInfo
    source_bundle_sha256: str
    best_step: int
    held_out_loss: float
    held_out: dict[str, float]
    held_out_layer_drop: dict[str, float]
    curve_file: str


@dataclass(frozen=True, kw_only=True)
class CompressionInfo(Document):
    method: str  # "uniform-layer-drop", or the compressors joined by "+" ("share+rank")
    bottom: int
    top: int
    keep: int  # distinct middle blocks the emulator holds
    kept_middle: list[int]  # those blocks (full index)
    distillation: DistillationInfo | None = None
    compressors: list[dict[str, Any]] | None = None  # [{"name": ..., "config": {...}}], in the order they ran
    adapter_blocks: list[int] | None = None  # a spread adapter's blocks (then bottom = top = 0)
    shared: dict[str, list[int]] | None = None  # source full block -> the emulator slots holding copies of it


@dataclass(frozen=True, kw_only=True)
class AdapterInfo(Document):
    method: str
    spec_file: str
    spec_sha256: str
    weights_file: str
    num_parameters: int


@dataclass(frozen=True, kw_only=True)
class QuantizationInfo(Document):
    method: str
    granularity: str
    modules: list[str]


@dataclass(frozen=True, kw_only=True)
class EmulatorInfo(Document):
    dir: str
    num_parameters: int
    quantization: QuantizationInfo | None = None


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo(Document):
    dir: str


@dataclass(frozen=True, kw_only=True)
class SignerInfo(Document):
    key_id: str
    public_key: str  # base64 of the raw Ed25519 public key


@dataclass(frozen=True, kw_only=True)
class BundleManifest(Document):
    """``manifest.json`` of a bundle. ``files``, ``signer`` and ``signature`` are filled in by signing."""

    format_version: int = BUNDLE_FORMAT_VERSION
    kind: str = BUNDLE_KIND
    created_at: str
    task: str
    base_model: BaseModelInfo
    layer_map: list[LayerMapEntry]
    compression: CompressionInfo
    adapter: AdapterInfo
    tokenizer: TokenizerInfo
    emulator: EmulatorInfo
    labels: list[str] | None = None  # classification: the job's label list, fixed once for every owner
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    signer: SignerInfo | None = None
    signature: str | None = None  # base64 Ed25519 over canonical JSON of the rest

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DocumentError("task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "classification" and not self.labels:
            raise DocumentError("labels", "a classification bundle needs its label list")

    @property
    def is_causal(self) -> bool:
        return self.task in CAUSAL_TASKS

    def layer_map_json(self) -> list[dict[str, int | str]]:
        return [e.to_json() for e in self.layer_map]

    def unsigned_json(self) -> dict[str, Any]:
        """What the signature covers: everything but the signature."""
        data = self.to_json()
        data.pop("signature", None)
        return data


# -- the job manifest -------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class BundleRef(Document):
    digest: str  # the bundle's identity: sha256 of its canonical signed manifest
    tar_sha256: str
    size: int

    def __post_init__(self) -> None:
        for name in ("digest", "tar_sha256"):  # both may name files: 64 lowercase hex characters, nothing else
            if not _SHA256_HEX.fullmatch(getattr(self, name)):
                raise DocumentError(name, "expected 64 lowercase hex characters")
        if self.size < 0:
            raise DocumentError("size", f"must be >= 0, got {self.size}")


@dataclass(frozen=True, kw_only=True)
class KeyRef(Document):
    key_id: str
    public_key: str  # base64 of the raw public key


@dataclass(frozen=True, kw_only=True)
class Limits(Document):
    max_upload_bytes: int
    max_plaintext_bytes: int
    chunk_size: int
    max_delta_norm_ratio: str  # decimal string: signed data carries no floats
    max_num_examples: int  # an upload claiming more examples is refused


@dataclass(frozen=True, kw_only=True)
class JobManifest(Document):
    """What ``GetJob`` returns, signed by the coordinator: a data owner's one source of truth about a job."""

    kind: str = JOB_MANIFEST_KIND
    job_id: str
    round: int  # the latest round (0 before the first is opened)
    round_state: str
    bundle: BundleRef
    adapter_spec: AdapterSpec
    coordinator: KeyRef
    delta_key: KeyRef
    limits: Limits
    issued_at: str

    def __post_init__(self) -> None:
        if self.kind != JOB_MANIFEST_KIND:
            raise DocumentError("kind", f"expected {JOB_MANIFEST_KIND!r}, got {self.kind!r}")
