"""``simulate``'s setup: keys, the full model (with a seeded task head), signed bundles, owners, jobs, round 0."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from safetensors.torch import save_file

from coordinator.bundles import base_model_id, build_bundle
from coordinator.distill import distill_bundle
from coordinator.jobs import create_job
from coordinator.paths import PUBLIC_KEY_FILE, SIGNING_KEY_FILE, init_keys
from coordinator.progress import PROGRESS_FILE, checkpoint_path
from coordinator.simulate.config import SimulateConfig
from coordinator.storage import Storage
from emulator.data import labels_of
from emulator.distill import DistillConfig
from emulator.loading import load_model, load_tokenizer, resolve_model
from emulator.methods import extract, head_parameters, make_trainable, method_spec
from emulator.quantize import load_emulator
from protos import crypto
from protos.bundle import MANIFEST, VerifiedBundle, verify_bundle_dir

console = Console()
OWNER_KEY_PATTERN = "owner-{}.key"  # in RUN/owners: the simulated data owners' signing keys, by partition id


@dataclass(frozen=True)
class Variant:
    """One emulator the data owners tune on, and its own job in the coordinator's state."""

    name: str  # "distilled" or "layer_drop"
    job_id: str
    bundle: VerifiedBundle

    def checkpoints(self, work: Path) -> Path:
        return RunLayout(work).checkpoints / self.job_id  # where the coordinator's service keeps the job's rounds


@dataclass(frozen=True)
class RunLayout:
    """Where a simulate run directory keeps each part."""

    work: Path

    @property
    def keys(self) -> Path:
        return self.work / "keys"

    @property
    def admin_key(self) -> Path:
        return self.keys / "admin.key"  # the ServerApp's admin key (registered in STATE/admin)

    @property
    def owners(self) -> Path:
        return self.work / "owners"

    @property
    def state(self) -> Path:
        return self.work / "state"

    @property
    def checkpoints(self) -> Path:
        return self.work / "checkpoints"


@dataclass(frozen=True)
class Setup:
    variants: list[Variant]  # the first is what data owners get; a second one is for comparison
    full_model_dir: str
    coordinator_key: Ed25519PrivateKey
    labels: list[str] | None


def _prepare_full_model(config: SimulateConfig, full_dir: Path, labels: list[str] | None) -> None:
    """The coordinator's private full model, saved once so its seeded task head stays the same across runs."""
    if (full_dir / "config.json").exists():
        return
    torch.manual_seed(config.training.seed)
    full = load_model(resolve_model(config.model), config.task, num_labels=len(labels) if labels else None)
    full.save_pretrained(full_dir)
    load_tokenizer(resolve_model(config.model)).save_pretrained(full_dir)


def _bundles(config: SimulateConfig, full_dir: Path, key: Ed25519PrivateKey,
             labels: list[str] | None) -> list[tuple[str, Path]]:
    work = config.workdir
    plain, distilled = work / "bundle-layer-drop", work / "bundle-distilled"
    full = load_model(str(full_dir), config.task)
    if not (plain / MANIFEST).exists():
        with console.status("building the signed layer-drop bundle"):
            build_bundle(full, str(full_dir), base_model_id(config.model), config.split_config, plain, key,
                         task=config.task, compression=config.compression_plan,
                         # a new classification head trains with the adapter; an LM head stays frozen (as in the paper)
                         extra_adapter_tensors=head_parameters(full) if config.task == "classification" else (),
                         labels=labels, force=True)
    if config.distill_steps == 0:
        return [("layer_drop", plain)]
    if not (distilled / MANIFEST).exists():
        console.print(f"distilling the emulator ({config.distill_steps} steps on the public corpus)")
        distill_config = DistillConfig(steps=config.distill_steps, lr=1e-3, batch_size=8, seq_len=64,
                                       eval_every=max(5, config.distill_steps // 4), seed=config.training.seed)
        distill_bundle(plain, full, None, distilled, distill_config, key, force=True)
    return [("distilled", distilled), ("layer_drop", plain)]


def _owners(config: SimulateConfig, storage: Storage) -> None:
    owners = RunLayout(config.workdir).owners
    owners.mkdir(exist_ok=True)
    known = {owner.owner_id for owner in storage.store.owners()}
    for i in range(config.clients):
        path = owners / OWNER_KEY_PATTERN.format(i)
        if not path.exists():
            crypto.write_private_key(Ed25519PrivateKey.generate(), path)
        public = crypto.load_private_key(path).public_key()
        if crypto.key_id(public) not in known:  # owners are known by their key id, as `owners add` does
            storage.store.add_owner(crypto.key_id(public), public, approved=True)


def _job(config: SimulateConfig, storage: Storage, variant: Variant, key: Ed25519PrivateKey) -> None:
    """The job's adapter spec (for the chosen method) and its initial global adapter, checkpointed as round 0."""
    if variant.job_id in storage.store.jobs():
        return
    emulator = load_emulator(variant.bundle)
    spec = method_spec(variant.bundle.adapter_spec, emulator, config.method_config)
    torch.manual_seed(config.training.seed)  # LoRA's A matrices
    initial = extract(make_trainable(emulator, spec, config.method_config), spec)
    checkpoints = variant.checkpoints(config.workdir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    save_file(initial, str(checkpoint_path(checkpoints, 0)))
    (checkpoints / PROGRESS_FILE).unlink(missing_ok=True)
    create_job(storage, variant.job_id, variant.bundle.root, key.public_key(), adapter_spec=spec,
               reference_adapter=initial, max_delta_norm_ratio=10.0)


def setup(config: SimulateConfig) -> Setup:
    """Keys, the full model (with a seeded task head), signed bundles, owners, jobs and round 0 (idempotent)."""
    work, layout = config.workdir, RunLayout(config.workdir)
    keys = layout.keys
    if not (keys / SIGNING_KEY_FILE).exists():
        init_keys(keys)
    key = crypto.load_private_key(keys / SIGNING_KEY_FILE)
    labels = labels_of(config.train_file) if config.task == "classification" else None
    full_dir = work / "full-model"
    _prepare_full_model(config, full_dir, labels)
    variants = [Variant(name, f"job-{name.replace('_', '-')}", verify_bundle_dir(path, key.public_key()))
                for name, path in _bundles(config, full_dir, key, labels)]
    storage = Storage.open(layout.state)
    try:
        _owners(config, storage)
        for variant in variants:
            _job(config, storage, variant, key)
            for owner in storage.store.owners():  # every simulated owner takes part in every job (idempotent)
                storage.store.enroll(variant.job_id, owner.owner_id)
    finally:
        storage.close()
    return Setup(variants, str(full_dir), key, labels)


def share_coordinator_key(work: Path, other_run: Path) -> None:
    """Before :func:`setup`: sign the run in ``work`` with ``other_run``'s coordinator key (one coordinator, many
    jobs), which setup then uses instead of making a new one."""
    keys = RunLayout(work).keys
    keys.mkdir(parents=True, exist_ok=True)
    for name in (SIGNING_KEY_FILE, PUBLIC_KEY_FILE):
        shutil.copy2(RunLayout(other_run).keys / name, keys / name)


def coordinator_public_key(work: Path) -> Path:
    return RunLayout(work).keys / PUBLIC_KEY_FILE
