"""``simulate``'s federation: Flower's simulation runtime (Ray) beside the coordinator's real gRPC service.

``run_simulation`` stays (rather than ``flwr run`` with the local simulation runtime) because ``simulate`` hands
the ServerApp and ClientApp their settings in-process, including the address of a gRPC service on a port picked
at run time; ``flwr run`` would need a Flower app directory and a run config written per run. The deployment path
(SuperLink, SuperNodes, ``flwr run``) is exercised by ``tests/test_e2e_deployment.py``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation
from rich.console import Console

from coordinator.errors import CoordinatorError
from coordinator.federation import FederationSettings
from coordinator.flower_app import make_server_app
from coordinator.paths import ensure_admin_key
from coordinator.progress import Progress
from coordinator.quiet import quiet_libraries
from coordinator.server import start_server
from coordinator.simulate.config import SimulateConfig
from coordinator.simulate.setup import RunLayout, Setup, Variant, coordinator_public_key

console = Console()
# The one reference from coordinator code to the client package: loaded by name, as Flower loads
# ``[tool.flwr.app.components]``; the coordinator never imports the client package.
CLIENT_APP_FACTORY = "client.flower_app:make_client_app"
# Environment for Ray's workers (the data owners) when not verbose: no library chatter, progress bars stay.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning", "RAY_DEDUP_LOGS": "1"}


class SimulationRuntimeError(CoordinatorError):
    """Flower's simulation runtime (Ray) could not start."""


def load_client_app(settings: dict[str, Any]) -> ClientApp:
    """The data owners' ClientApp, by reference: ``simulate`` only runs both sides on one machine."""
    module_name, _, factory = CLIENT_APP_FACTORY.partition(":")
    app = getattr(importlib.import_module(module_name), factory)(settings)
    if not isinstance(app, ClientApp):
        raise SimulationRuntimeError(f"{CLIENT_APP_FACTORY} did not return a ClientApp")
    return app


def start_ray(num_cpus: int, *, verbose: bool = False, attempts: int = 3) -> None:
    """Start Ray before the gRPC service's threads exist (Ray forks its daemons), retrying a slow start;
    Flower's Ray backend then reuses this instance and shuts it down when the simulation ends."""
    import ray

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath  # what Flower's backend does when it starts Ray itself
    env = {"PYTHONPATH": pythonpath, **({} if verbose else QUIET_ENV)}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False,
                     logging_level=logging.INFO if verbose else logging.ERROR,
                     runtime_env={"env_vars": env})
            return
        except Exception as error:  # Ray raises a bare Exception when its node starts too slowly
            ray.shutdown()
            if attempt == attempts:
                raise SimulationRuntimeError(f"Ray did not start after {attempts} attempts: {error}") from error
            console.print(f"[yellow]Ray did not start ({error}); retrying[/]")


def client_settings(config: SimulateConfig, variant: Variant, address: str) -> dict[str, Any]:
    """The simulated owners' settings: what each owner's SuperNode node-config would hold in a deployment."""
    work = config.workdir
    return {
        "coordinator": address, "insecure": True, "job-id": variant.job_id,
        "coordinator-key": str(coordinator_public_key(work)), "owners-dir": str(RunLayout(work).owners),
        "cache-dir": str(work / "owner-cache"),
        "train-file": str(Path(config.train_file).resolve()), "partition": config.partition,
        "seed": config.training.seed, "torch-threads": max(1, (os.cpu_count() or 2) // config.clients),
        "device": config.device,
    }


def federate(config: SimulateConfig, prepared: Setup, variant: Variant, *, verbose: bool = False) -> Progress:
    """Serve the coordinator's gRPC service on a free localhost port and run Flower's simulation runtime."""
    work, layout = config.workdir, RunLayout(config.workdir)
    quiet_libraries(verbose)
    start_ray(config.clients, verbose=verbose)
    ensure_admin_key(layout.state, layout.admin_key)
    server = start_server(layout.state, 0, insecure=True, signing_key=prepared.coordinator_key,
                          checkpoint_root=layout.checkpoints)
    try:
        settings = FederationSettings(
            job_id=variant.job_id, coordinator=server.address, admin_key=layout.admin_key,
            coordinator_key=coordinator_public_key(work), insecure=True, num_rounds=config.rounds,
            min_replies=config.replies_needed, round_timeout=config.round_timeout,
            node_wait=config.node_wait, training=config.training)
        console.print(f"federating job {variant.job_id}: {config.clients} data owners x {config.rounds} rounds "
                      f"on the {variant.name.replace('_', ' ')} emulator")
        run_simulation(
            server_app=make_server_app(settings.to_config()),
            client_app=load_client_app(client_settings(config, variant, server.address)),
            num_supernodes=config.clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": config.clients, "include_dashboard": False}},
            verbose_logging=verbose,
        )
    finally:
        server.stop()
    return Progress.load(variant.checkpoints(work))
