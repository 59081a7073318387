"""``simulate``: the whole offsite-tuning pipeline on one machine.

Setup (model, bundle, owners, job, gRPC service on a free localhost port), federated rounds in Flower's
simulation runtime (each data owner its own partition, sealed deltas over gRPC), then the evaluation report.
A run directory holds everything; running again on the same directory resumes after the last completed round.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation
from rich.console import Console
from safetensors.torch import load_file, save_file

from coordinator.bundles import build_bundle
from coordinator.evaluation import EvalInputs, EvalReport, build_report, full_finetune_score
from coordinator.federation import PROGRESS_FILE, checkpoint_path, load_progress
from coordinator.flower_app import make_server_app
from coordinator.paths import init_keys
from coordinator.server import start_server
from coordinator.state import StateStore
from emulator.data import labels_of, load_examples
from emulator.loading import load_emulator_dir, load_model, load_tokenizer, resolve_model
from emulator.methods import MethodConfig, extract, head_parameters, make_trainable, method_spec
from emulator.split import SplitConfig
from emulator.train import TrainConfig
from protos import crypto
from protos.bundle import VerifiedBundle, verify_bundle_dir

console = Console()
JOB_ID = "job-1"
CLIENT_APP_FACTORY = "client.flower_app:make_client_app"


@dataclass(frozen=True)
class SimulateConfig:
    model: str | None
    task: str
    train_file: Path
    eval_file: Path
    workdir: Path
    clients: int = 2
    rounds: int = 2
    bottom: int = 1
    top: int = 1
    keep: int | None = 2
    method: str = "layers"
    lora_r: int = 8
    lora_alpha: int = 16
    partition: str = "iid"
    seed: int = 0
    epochs: int = 1
    lr: float = 5e-4
    batch_size: int = 16
    max_length: int = 64
    min_replies: int | None = None
    baseline: str | None = None  # "full-ft"

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.task not in ("causal-lm", "classification"):
            raise ValueError(f"--task must be causal-lm or classification, got {self.task!r}")
        if self.partition not in ("iid", "dirichlet"):
            raise ValueError(f"--partition must be iid or dirichlet, got {self.partition!r}")
        if self.baseline not in (None, "full-ft"):
            raise ValueError(f"--baseline must be full-ft, got {self.baseline!r}")
        for flag, path in (("--train", self.train_file), ("--eval", self.eval_file)):
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")

    @property
    def method_config(self) -> MethodConfig:
        return MethodConfig(self.method, lora_r=self.lora_r, lora_alpha=self.lora_alpha)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length,
                           seed=self.seed)


@dataclass(frozen=True)
class Setup:
    bundle: VerifiedBundle
    full_model_dir: str
    coordinator_key: Ed25519PrivateKey
    labels: list[str] | None


def setup(config: SimulateConfig) -> Setup:
    """Keys, the full model (with a seeded task head), the signed bundle, owners, the job and round 0."""
    work = config.workdir
    keys = work / "keys"
    if not (keys / "coordinator.key").exists():
        init_keys(keys)
    key = crypto.load_private_key(keys / "coordinator.key")
    labels = labels_of(config.train_file) if config.task == "classification" else None
    full_dir = work / "full-model"
    if not (full_dir / "config.json").exists():
        torch.manual_seed(config.seed)  # the task head's initialisation
        full = load_model(resolve_model(config.model), config.task, num_labels=len(labels) if labels else None)
        full.save_pretrained(full_dir)
        load_tokenizer(resolve_model(config.model)).save_pretrained(full_dir)
    bundle_dir = work / "bundle"
    if not (bundle_dir / "manifest.json").exists():
        full = load_model(str(full_dir), config.task)
        with console.status("building the signed emulator bundle"):
            build_bundle(full, str(full_dir), str(config.model or "embedded:all-MiniLM-L6-v2"),
                         SplitConfig(config.bottom, config.top, config.keep), bundle_dir, key, task=config.task,
                         extra_adapter_tensors=head_parameters(full), extra_manifest={"labels": labels},
                         force=True)
    bundle = verify_bundle_dir(bundle_dir, key.public_key())

    store = StateStore(work / "state")
    owners = work / "owners"
    owners.mkdir(exist_ok=True)
    known = {owner.owner_id for owner in store.owners()}
    for i in range(config.clients):
        path = owners / f"owner-{i}.key"
        if not path.exists():
            crypto.write_private_key(Ed25519PrivateKey.generate(), path)
        public = crypto.load_private_key(path).public_key()
        if crypto.key_id(public) not in known:  # owners are known by their key id, as `owners add` does
            store.add_owner(crypto.key_id(public), public, approved=True)

    checkpoints = work / "checkpoints"
    if JOB_ID not in store.jobs():
        emulator = load_emulator_dir(bundle.emulator_dir, config.task)
        spec = method_spec(bundle.adapter_spec, emulator, config.method_config)
        torch.manual_seed(config.seed)  # LoRA's A matrices
        initial = extract(make_trainable(emulator, spec, config.method_config), spec)
        checkpoints.mkdir(parents=True, exist_ok=True)
        save_file(initial, str(checkpoint_path(checkpoints, 0)))
        (checkpoints / PROGRESS_FILE).unlink(missing_ok=True)
        store.create_job(JOB_ID, bundle_dir, key.public_key(), adapter_spec=spec, reference_adapter=initial,
                         max_delta_norm_ratio=10.0)
    store.close()
    return Setup(bundle, str(full_dir), key, labels)


def load_client_app(settings: dict[str, Any]) -> ClientApp:
    """The data owners' ClientApp, by reference (as Flower loads ``[tool.flwr.app.components]``): the coordinator's
    code never imports the client package; ``simulate`` only runs both sides on one machine."""
    module_name, _, factory = CLIENT_APP_FACTORY.partition(":")
    app = getattr(importlib.import_module(module_name), factory)(settings)
    assert isinstance(app, ClientApp)
    return app


def federate(config: SimulateConfig, prepared: Setup) -> dict[str, Any]:
    """Serve the coordinator's gRPC service on a free localhost port and run Flower's simulation runtime."""
    work = config.workdir
    server = start_server(work / "state", 0, insecure=True, signing_key=prepared.coordinator_key)
    try:
        shared = {
            "state-dir": str(work / "state"), "job-id": JOB_ID, "checkpoint-dir": str(work / "checkpoints"),
            "num-server-rounds": config.rounds, "min-replies": config.min_replies or config.clients,
            "method": config.method, "lora-r": config.lora_r, "lora-alpha": config.lora_alpha,
            "epochs": config.epochs, "lr": config.lr, "batch-size": config.batch_size,
            "max-length": config.max_length, "seed": config.seed,
        }
        client_settings = {
            "coordinator": server.address, "insecure": True,
            "coordinator-key": str(work / "keys" / "coordinator.pub"), "job-id": JOB_ID,
            "owners-dir": str(work / "owners"), "cache-dir": str(work / "owner-cache"),
            "train-file": str(Path(config.train_file).resolve()), "partition": config.partition,
            "seed": config.seed, "torch-threads": max(1, (os.cpu_count() or 2) // config.clients),
        }
        run_simulation(
            server_app=make_server_app(shared), client_app=load_client_app(client_settings),
            num_supernodes=config.clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": max(config.clients, 1), "include_dashboard": False}},
        )
    finally:
        server.stop()
    return load_progress(work / "checkpoints")


def evaluate_run(config: SimulateConfig, prepared: Setup, report_path: Path) -> EvalReport:
    """Plug the final global adapter into the full model and write the evaluation report (JSON, MD, PNG)."""
    work = config.workdir
    progress = load_progress(work / "checkpoints")
    final_round = int(progress["completed_round"])
    initial = load_file(str(checkpoint_path(work / "checkpoints", 0)))
    tuned = load_file(str(checkpoint_path(work / "checkpoints", final_round)))
    full = load_model(prepared.full_model_dir, config.task)
    emulator = load_emulator_dir(prepared.bundle.emulator_dir, config.task)
    spec = method_spec(prepared.bundle.adapter_spec, emulator, config.method_config)
    inputs = EvalInputs(full=full, emulator=emulator, tokenizer=load_tokenizer(prepared.full_model_dir),
                        task=config.task, spec=spec, method=config.method_config,
                        eval_examples=load_examples(config.eval_file, config.task, prepared.labels),
                        max_length=config.max_length)
    train_examples = load_examples(config.train_file, config.task, prepared.labels)
    full_ft = None
    if config.baseline == "full-ft":
        ft_config = TrainConfig(epochs=config.epochs * config.rounds, lr=min(config.lr, 5e-5),
                                batch_size=config.batch_size, max_length=config.max_length, seed=config.seed)

        def full_ft() -> float:
            return full_finetune_score(inputs, initial, train_examples, ft_config)

    report = build_report(inputs, initial, tuned, full_ft=full_ft)
    report.notes.update({
        "rounds_completed": final_round,
        "rounds": [{k: v for k, v in r.items() if k != "owner_metrics"} for r in progress["rounds"]],
        "method": config.method, "clients": config.clients, "model": config.model or "embedded:all-MiniLM-L6-v2",
        "split": f"{config.bottom}-{config.keep}-{config.top}", "task": config.task,
    })
    report.write(report_path)
    return report


def simulate(config: SimulateConfig, report_path: Path) -> EvalReport:
    """Setup, federate, evaluate: reads top to bottom."""
    started = time.monotonic()
    config.workdir.mkdir(parents=True, exist_ok=True)
    (config.workdir / "simulate.json").write_text(json.dumps(asdict(config), default=str, indent=2))
    prepared = setup(config)
    federate(config, prepared)
    report = evaluate_run(config, prepared, report_path)
    report.notes["seconds"] = round(time.monotonic() - started, 1)
    report.write(report_path)
    return report
