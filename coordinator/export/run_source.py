"""What an export reads from a run directory: the job, its final global adapter, the bundle and the full model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file
from transformers import PreTrainedModel

from coordinator.errors import InvalidSettingError
from coordinator.paths import PUBLIC_KEY_FILE, SIGNING_KEY_FILE
from coordinator.progress import Progress, checkpoint_path
from coordinator.simulate.config import SimulateConfig
from coordinator.simulate.setup import RunLayout
from coordinator.state import StateStore
from emulator.loading import load_model
from emulator.methods import MethodConfig, method_spec, plug
from emulator.quantize import load_emulator
from protos import crypto
from protos.adapter_spec import AdapterSpec
from protos.bundle import VerifiedBundle, verify_bundle_dir

REPORT_FILE = "report.json"


@dataclass(frozen=True)
class RunSource:
    run_dir: Path
    config: SimulateConfig
    bundle: VerifiedBundle  # the emulator the data owners tuned on
    job_id: str
    rounds: int  # the last completed round: its global adapter is the one exported
    adapter_path: Path
    coordinator_key: Ed25519PrivateKey

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def method(self) -> str:
        return self.config.training.method

    @property
    def method_config(self) -> MethodConfig:
        return self.config.method_config

    @property
    def labels(self) -> list[str] | None:
        return self.bundle.manifest.labels

    @property
    def full_model_dir(self) -> Path:
        return self.run_dir / "full-model"

    @property
    def report_path(self) -> Path | None:
        path = self.run_dir / REPORT_FILE
        return path if path.is_file() else None

    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.adapter_path))

    def spec(self) -> AdapterSpec:
        """The spec of what the owners trained (the method's, derived from the bundle's layers spec)."""
        return method_spec(self.bundle.adapter_spec, load_emulator(self.bundle), self.method_config)

    def full_model(self) -> PreTrainedModel:
        return load_model(str(self.full_model_dir), self.task)

    def plugged_model(self) -> PreTrainedModel:
        model = plug(self.full_model(), self.spec(), self.adapter(), self.method_config)
        return model.eval()

    def contributions(self) -> dict[str, int]:
        """Each owner's signed ``num_examples``, summed over the rounds that built the exported adapter."""
        store = StateStore(RunLayout(self.run_dir).state)
        try:
            totals: dict[str, int] = {}
            for round_number in range(1, self.rounds + 1):
                for upload in store.accepted_uploads(self.job_id, round_number):
                    totals[upload.owner_id] = totals.get(upload.owner_id, 0) + upload.num_examples
            return totals
        finally:
            store.close()


def load_run(run_dir: Path) -> RunSource:
    """A finished simulate/demo run: refuses, naming what is missing, a directory that is not one."""
    run_dir = Path(run_dir)
    config = SimulateConfig.load(run_dir)
    keys = RunLayout(run_dir).keys
    if not (keys / SIGNING_KEY_FILE).is_file():
        raise InvalidSettingError(f"{{run}} {run_dir}: no {keys.name}/{SIGNING_KEY_FILE}")
    key = crypto.load_private_key(keys / SIGNING_KEY_FILE)
    pinned = crypto.load_public_key(keys / PUBLIC_KEY_FILE)
    if crypto.key_id(pinned) != crypto.key_id(key.public_key()):
        raise InvalidSettingError(f"{{run}} {keys}: {PUBLIC_KEY_FILE} is not {SIGNING_KEY_FILE}'s public key")
    name = "distilled" if config.distill_steps > 0 else "layer-drop"
    bundle = verify_bundle_dir(run_dir / f"bundle-{name}", pinned)
    job_id = f"job-{name}"
    checkpoints = RunLayout(run_dir).checkpoints / job_id
    rounds = Progress.load(checkpoints).completed_round
    if rounds < 1:
        raise InvalidSettingError(f"{{run}} {run_dir}: job {job_id} has no completed round to export")
    return RunSource(run_dir=run_dir, config=config, bundle=bundle, job_id=job_id, rounds=rounds,
                     adapter_path=checkpoint_path(checkpoints, rounds), coordinator_key=key)
