"""``offsite-coordinator serve-models`` and ``adapters``: serve many tuned adapters on one base model over HTTP."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Annotated

import typer
from fastapi import APIRouter

from coordinator.cli.common import StateOption, VerboseOption, console, fail_with, state_dir
from coordinator.errors import CoordinatorError
from coordinator.quiet import quiet_libraries
from coordinator.serving.adapters import ServingState
from coordinator.serving.batching import EngineConfig
from coordinator.serving.gate import QueryGate
from coordinator.serving.server_config import base_model_dir, record_base
from emulator.errors import EmulatorError
from protos import crypto
from protos.errors import ProtocolError
from protos.files import atomic_write

EXPECTED = (CoordinatorError, EmulatorError, ProtocolError, FileNotFoundError, FileExistsError)
ADMIN_TOKEN_FILE = "serving-admin.token"
adapters_app = typer.Typer(help="Adapters a serve-models server may serve.", no_args_is_help=True)


@adapters_app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(help="An export directory (peft or adapter format), or with --run a "
                                                "finished run directory.")],
    adapter_id: Annotated[str, typer.Option("--id", help="The adapter's id (the API's model name).")],
    state: StateOption = None,
    run: Annotated[bool, typer.Option("--run", help="SOURCE is a run directory: export its adapter first.")] = False,
    coordinator_key: Annotated[Path | None, typer.Option(help="coordinator.pub to verify the export with (pinned "
                                                              "on first import).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an adapter with this id.")] = False,
) -> None:
    """Verify and add an adapter; a running server picks it up on its next request for it."""
    directory = state_dir(state)
    serving = ServingState(directory)
    try:
        if run:
            record = serving.import_run(source, adapter_id)
            record_base(directory, source / "full-model")  # the first run's full model is the served base
        else:
            key = crypto.load_public_key(coordinator_key) if coordinator_key else None
            record = serving.import_export(source, adapter_id, key, force=force)
    except EXPECTED as error:
        fail_with(error, {"adapter_id": "--id", "coordinator_key": "--coordinator-key", "force": "--force"})
    console.print(f"adapter {adapter_id}: {record.kind}, job {record.manifest.job_id} round {record.manifest.rounds}")


@adapters_app.command("list")
def list_command(state: StateOption = None) -> None:
    serving = ServingState(state_dir(state))
    for adapter_id in serving.adapter_ids():
        record = serving.record(adapter_id)
        console.print(f"{adapter_id}\t{record.kind}\t{record.manifest.task}\t{record.manifest.job_id}")


def serve_models_command(
    state: StateOption = None,
    http_port: Annotated[int, typer.Option(help="HTTP port (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    base: Annotated[Path | None, typer.Option(help="The base model directory (default: the one the state "
                                                   "records).")] = None,
    engine: Annotated[str, typer.Option(help="torch, or ort (onnxruntime; classification adapters).")] = "torch",
    market: Annotated[bool, typer.Option(help="Serve listings to buyers (API keys, quotas, metering) and the "
                                              "catalogue, instead of adapter ids to anyone who reaches the port.")]
    = False,
    cache_mb: Annotated[int, typer.Option(help="Memory budget of loaded adapters.")] = EngineConfig.cache_mb,
    max_batch_size: Annotated[int, typer.Option(help="Requests per batch.")] = EngineConfig.max_batch_size,
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per batch.")] = EngineConfig.max_batch_tokens,
    max_wait_ms: Annotated[float, typer.Option(help="Longest wait to fill a batch.")] = 10.0,
    pin: Annotated[list[str] | None, typer.Option(help="Adapters to load at start and never evict.")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Load one base model and serve many adapters over an OpenAI-style HTTP API, with /metrics and /healthz."""
    import uvicorn

    from coordinator.serving.http import build_app
    from coordinator.serving.ort_engine import make_engine

    quiet_libraries(verbose)
    directory = state_dir(state)
    try:
        config = EngineConfig(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                              max_wait_s=max_wait_ms / 1000, cache_mb=cache_mb)
        server_engine = make_engine(engine, base_model_dir(directory, base), ServingState(directory), config)
        for adapter_id in pin or []:
            server_engine.cache.pin(adapter_id, True, server_engine.state.record(adapter_id).size_bytes())
    except EXPECTED as error:
        fail_with(error, {"cache_mb": "--cache-mb", "max_wait_s": "--max-wait-ms"})
    token = secrets.token_urlsafe(32)
    atomic_write(directory / ADMIN_TOKEN_FILE, token + "\n", mode=0o600)
    gate: QueryGate | None = None
    routers: list[APIRouter] = []
    if market:
        from coordinator.market.wiring import market_parts

        gate, routers = market_parts(directory, started=time.time())
    app = build_app(server_engine.start(), gate, admin_token=token, routers=routers)
    config_ = uvicorn.Config(app, host=host, port=http_port, log_level="info" if verbose else "warning",
                             timeout_graceful_shutdown=5)
    server = uvicorn.Server(config_)
    console.print(f"serving {len(server_engine.state.adapter_ids())} adapters on http://{host}:{http_port} "
                  f"(admin token in {directory / ADMIN_TOKEN_FILE})")
    logging.getLogger("uvicorn.error").setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        server.run()
    finally:
        server_engine.stop()
