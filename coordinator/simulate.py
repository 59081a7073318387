"""``simulate``: the whole offsite-tuning pipeline on one machine.

Setup (full model, signed bundle, optional distillation, owners, jobs, gRPC service on a free localhost port),
federated rounds in Flower's simulation runtime (each data owner its own partition, sealed deltas over gRPC),
then the evaluation report. With distillation, data owners get the distilled emulator, and a second job runs the
same federation on the plain layer-drop emulator, so the report shows the plug-in from both. A run directory
holds everything; running again on it resumes after the last completed round.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
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
from coordinator.distill import distill_bundle
from coordinator.evaluation import (
    EvalInputs,
    EvalReport,
    build_report,
    emulator_score,
    full_finetune_score,
    plugin_score,
)
from coordinator.federation import PROGRESS_FILE, checkpoint_path, load_progress
from coordinator.flower_app import make_server_app
from coordinator.paths import init_keys
from coordinator.server import start_server
from coordinator.state import StateStore
from emulator.data import labels_of, load_examples
from emulator.distill import DistillConfig
from emulator.loading import load_model, load_tokenizer, resolve_model
from emulator.methods import MethodConfig, extract, head_parameters, make_trainable, method_spec
from emulator.quantize import load_emulator
from emulator.split import SplitConfig
from emulator.train import TrainConfig
from protos import crypto
from protos.bundle import VerifiedBundle, verify_bundle_dir

console = Console()
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
    distill_steps: int = 0  # 0: owners get the plain layer-drop emulator
    node_wait: float = 30.0
    round_timeout: float = 900.0

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
        if self.distill_steps < 0:
            raise ValueError(f"--distill-steps must be >= 0, got {self.distill_steps}")
        for flag, path in (("--train", self.train_file), ("--eval", self.eval_file)):
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        MethodConfig(self.method, lora_r=self.lora_r, lora_alpha=self.lora_alpha)
        TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length)

    @property
    def method_config(self) -> MethodConfig:
        return MethodConfig(self.method, lora_r=self.lora_r, lora_alpha=self.lora_alpha)


@dataclass(frozen=True)
class Variant:
    """One emulator the data owners tune on, and its own job in the coordinator's state."""

    name: str  # "distilled" or "layer_drop"
    job_id: str
    bundle: VerifiedBundle

    def checkpoints(self, work: Path) -> Path:
        return work / "checkpoints" / self.name


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
    torch.manual_seed(config.seed)
    full = load_model(resolve_model(config.model), config.task, num_labels=len(labels) if labels else None)
    full.save_pretrained(full_dir)
    load_tokenizer(resolve_model(config.model)).save_pretrained(full_dir)


def _bundles(config: SimulateConfig, full_dir: Path, key: Ed25519PrivateKey,
             labels: list[str] | None) -> list[tuple[str, Path]]:
    work = config.workdir
    plain, distilled = work / "bundle-layer-drop", work / "bundle-distilled"
    full = load_model(str(full_dir), config.task)
    if not (plain / "manifest.json").exists():
        with console.status("building the signed layer-drop bundle"):
            build_bundle(full, str(full_dir), str(config.model or "embedded:all-MiniLM-L6-v2"),
                         SplitConfig(config.bottom, config.top, config.keep), plain, key, task=config.task,
                         # a new classification head trains with the adapter; an LM head stays frozen (as in the paper)
                         extra_adapter_tensors=head_parameters(full) if config.task == "classification" else (),
                         extra_manifest={"labels": labels},
                         force=True)
    if config.distill_steps == 0:
        return [("layer_drop", plain)]
    if not (distilled / "manifest.json").exists():
        console.print(f"distilling the emulator ({config.distill_steps} steps on the public corpus)")
        distill_config = DistillConfig(steps=config.distill_steps, lr=1e-3, batch_size=8, seq_len=64,
                                       eval_every=max(5, config.distill_steps // 4), seed=config.seed)
        distill_bundle(plain, full, None, distilled, distill_config, key, force=True)
    return [("distilled", distilled), ("layer_drop", plain)]


def _owners(config: SimulateConfig, store: StateStore) -> None:
    owners = config.workdir / "owners"
    owners.mkdir(exist_ok=True)
    known = {owner.owner_id for owner in store.owners()}
    for i in range(config.clients):
        path = owners / f"owner-{i}.key"
        if not path.exists():
            crypto.write_private_key(Ed25519PrivateKey.generate(), path)
        public = crypto.load_private_key(path).public_key()
        if crypto.key_id(public) not in known:  # owners are known by their key id, as `owners add` does
            store.add_owner(crypto.key_id(public), public, approved=True)


def _job(config: SimulateConfig, store: StateStore, variant: Variant, key: Ed25519PrivateKey) -> None:
    """The job's adapter spec (for the chosen method) and its initial global adapter, checkpointed as round 0."""
    if variant.job_id in store.jobs():
        return
    emulator = load_emulator(variant.bundle)
    spec = method_spec(variant.bundle.adapter_spec, emulator, config.method_config)
    torch.manual_seed(config.seed)  # LoRA's A matrices
    initial = extract(make_trainable(emulator, spec, config.method_config), spec)
    checkpoints = variant.checkpoints(config.workdir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    save_file(initial, str(checkpoint_path(checkpoints, 0)))
    (checkpoints / PROGRESS_FILE).unlink(missing_ok=True)
    store.create_job(variant.job_id, variant.bundle.root, key.public_key(), adapter_spec=spec,
                     reference_adapter=initial, max_delta_norm_ratio=10.0)


def setup(config: SimulateConfig) -> Setup:
    """Keys, the full model (with a seeded task head), signed bundles, owners, jobs and round 0."""
    work = config.workdir
    if not (work / "keys" / "coordinator.key").exists():
        init_keys(work / "keys")
    key = crypto.load_private_key(work / "keys" / "coordinator.key")
    labels = labels_of(config.train_file) if config.task == "classification" else None
    full_dir = work / "full-model"
    _prepare_full_model(config, full_dir, labels)
    variants = [Variant(name, f"job-{name.replace('_', '-')}", verify_bundle_dir(path, key.public_key()))
                for name, path in _bundles(config, full_dir, key, labels)]
    store = StateStore(work / "state")
    try:
        _owners(config, store)
        for variant in variants:
            _job(config, store, variant, key)
    finally:
        store.close()
    return Setup(variants, str(full_dir), key, labels)


def load_client_app(settings: dict[str, Any]) -> ClientApp:
    """The data owners' ClientApp, by reference (as Flower loads ``[tool.flwr.app.components]``): the coordinator's
    code never imports the client package; ``simulate`` only runs both sides on one machine."""
    module_name, _, factory = CLIENT_APP_FACTORY.partition(":")
    app = getattr(importlib.import_module(module_name), factory)(settings)
    assert isinstance(app, ClientApp)
    return app


class SimulationRuntimeError(RuntimeError):
    """Flower's simulation runtime (Ray) could not start."""


def start_ray(num_cpus: int, attempts: int = 3) -> None:
    """Start Ray before the gRPC service's threads exist (Ray forks its daemons), retrying a slow start;
    Flower's Ray backend then reuses this instance and shuts it down when the simulation ends."""
    import ray

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath  # what Flower's backend does when it starts Ray itself
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
            return
        except Exception as error:  # Ray raises a bare Exception when its node starts too slowly
            ray.shutdown()
            if attempt == attempts:
                raise SimulationRuntimeError(f"Ray did not start after {attempts} attempts: {error}") from error
            console.print(f"[yellow]Ray did not start ({error}); retrying[/]")


def federate(config: SimulateConfig, prepared: Setup, variant: Variant) -> dict[str, Any]:
    """Serve the coordinator's gRPC service on a free localhost port and run Flower's simulation runtime."""
    work = config.workdir
    start_ray(max(config.clients, 1))
    server = start_server(work / "state", 0, insecure=True, signing_key=prepared.coordinator_key)
    try:
        server_settings = {
            "state-dir": str(work / "state"), "job-id": variant.job_id,
            "checkpoint-dir": str(variant.checkpoints(work)), "num-server-rounds": config.rounds,
            "min-replies": config.min_replies or config.clients, "node-wait": config.node_wait,
            "round-timeout": config.round_timeout,
            "method": config.method, "lora-r": config.lora_r, "lora-alpha": config.lora_alpha,
            "epochs": config.epochs, "lr": config.lr, "batch-size": config.batch_size,
            "max-length": config.max_length, "seed": config.seed,
        }
        client_settings = {
            "coordinator": server.address, "insecure": True, "job-id": variant.job_id,
            "coordinator-key": str(work / "keys" / "coordinator.pub"), "owners-dir": str(work / "owners"),
            "cache-dir": str(work / "owner-cache"), "train-file": str(Path(config.train_file).resolve()),
            "partition": config.partition, "seed": config.seed,
            "torch-threads": max(1, (os.cpu_count() or 2) // config.clients),
        }
        console.print(f"federating job {variant.job_id}: {config.clients} data owners x {config.rounds} rounds "
                      f"on the {variant.name.replace('_', ' ')} emulator")
        run_simulation(
            server_app=make_server_app(server_settings), client_app=load_client_app(client_settings),
            num_supernodes=config.clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": max(config.clients, 1), "include_dashboard": False}},
        )
    finally:
        server.stop()
    return load_progress(variant.checkpoints(work))


def _adapters(work: Path, variant: Variant) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    checkpoints = variant.checkpoints(work)
    final_round = int(load_progress(checkpoints)["completed_round"])
    return (load_file(str(checkpoint_path(checkpoints, 0))), load_file(str(checkpoint_path(checkpoints, final_round))),
            final_round)


def evaluate_run(config: SimulateConfig, prepared: Setup, report_path: Path) -> EvalReport:
    """Plug the final global adapter into the full model and write the evaluation report (JSON, MD, PNG)."""
    work = config.workdir
    primary, others = prepared.variants[0], prepared.variants[1:]
    full = load_model(prepared.full_model_dir, config.task)
    tokenizer = load_tokenizer(prepared.full_model_dir)
    eval_examples = load_examples(config.eval_file, config.task, prepared.labels)

    def inputs_for(variant: Variant) -> EvalInputs:
        emulator = load_emulator(variant.bundle)
        return EvalInputs(full=full, emulator=emulator, tokenizer=tokenizer, task=config.task,
                          spec=method_spec(variant.bundle.adapter_spec, emulator, config.method_config),
                          method=config.method_config, eval_examples=eval_examples, max_length=config.max_length)

    inputs = inputs_for(primary)
    initial, tuned, final_round = _adapters(work, primary)
    full_ft = None
    if config.baseline == "full-ft":
        train_examples = load_examples(config.train_file, config.task, prepared.labels)
        ft_config = TrainConfig(epochs=config.epochs * config.rounds, lr=min(config.lr, 5e-5),
                                batch_size=config.batch_size, max_length=config.max_length, seed=config.seed)

        def full_ft() -> float:
            return full_finetune_score(inputs, initial, train_examples, ft_config)

    extra: dict[str, float] = {}
    for variant in others:
        other_inputs = inputs_for(variant)
        _, other_tuned, _ = _adapters(work, variant)
        extra[f"emulator_tuned_{variant.name}"] = emulator_score(other_inputs, other_tuned, variant.name)
        extra[f"plugin_tuned_{variant.name}"] = plugin_score(other_inputs, other_tuned, f"plug-in {variant.name}")
    report = build_report(inputs, initial, tuned, full_ft=full_ft, extra_rows=extra)
    report.notes.update({
        "emulator": primary.name, "rounds_completed": final_round,
        "rounds": [{k: v for k, v in r.items() if k != "owner_metrics"}
                   for r in load_progress(primary.checkpoints(work))["rounds"]],
        "method": config.method, "clients": config.clients, "model": config.model or "embedded:all-MiniLM-L6-v2",
        "split": f"{config.bottom}-{config.keep}-{config.top}", "task": config.task,
    })
    report.write(report_path)
    return report


def simulate(config: SimulateConfig, report_path: Path) -> EvalReport:
    """Setup, federate (each emulator variant), evaluate: reads top to bottom."""
    started = time.monotonic()
    config.workdir.mkdir(parents=True, exist_ok=True)
    (config.workdir / "simulate.json").write_text(json.dumps(asdict(config), default=str, indent=2))
    prepared = setup(config)
    for variant in prepared.variants:
        federate(config, prepared, variant)
    report = evaluate_run(config, prepared, report_path)
    report.notes["seconds"] = round(time.monotonic() - started, 1)
    report.write(report_path)
    return report
