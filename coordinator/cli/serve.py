"""``offsite-coordinator serve``: run the coordinator's gRPC service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.common import KeyOption, StateOption, console, fail, fail_with, state_dir
from coordinator.keyring import DeltaKeyring
from coordinator.server import start_server
from protos import crypto


def serve(
    state: StateOption = None,
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 50051,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    client_ca: Annotated[Path | None, typer.Option(help="CA for client certificates (mutual TLS).")] = None,
    insecure: Annotated[bool, typer.Option(help="Plain text, no TLS: meant for localhost only.")] = False,
    key: KeyOption = None,
    checkpoints: Annotated[Path | None, typer.Option(help="Round checkpoints, one JOB_ID directory per job "
                                                          "(default: STATE/checkpoints).")] = None,
) -> None:
    """Serve GetJob, DownloadBundle, SubmitDelta and GetRoundStatus to data owners, and OpenRound and
    AggregateRound to admin keys (the ServerApp), over gRPC (TLS unless --insecure)."""
    if (tls_cert is None) != (tls_key is None):
        fail("give both --tls-cert and --tls-key")
    if tls_cert is None and not insecure:
        fail("give --tls-cert and --tls-key, or --insecure for plain text on localhost")
    try:
        DeltaKeyring(state_dir(state)).current()  # a missing or wrong OFFSITE_KEY_PASSPHRASE fails here, not per call
        running = start_server(state_dir(state), port, host=host, tls_cert=tls_cert, tls_key=tls_key,
                               client_ca=client_ca, insecure=insecure and tls_cert is None, signing_key=key,
                               checkpoint_root=checkpoints)
    except (crypto.KeyFileError, OSError) as error:
        fail_with(error)
    mode = "insecure (plain text)" if tls_cert is None else ("mutual TLS" if client_ca else "TLS")
    if running.storage.recovered:
        console.print(f"recovered: removed {len(running.storage.recovered)} incomplete blob(s)")
    console.print(f"serving on {host}:{running.port} [{mode}], state {state_dir(state)}", highlight=False)
    try:
        running.wait()
    except KeyboardInterrupt:
        running.stop(grace=2)
