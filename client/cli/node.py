"""``offsite-client node start``: the data owner's Flower SuperNode in one command.

Starts ``flower-supernode`` with TLS to the SuperLink (``ca.crt``), the owner's registered node key
(``supernode.key``), and the node config built from the owner's files, so that the ClientApp trains only for
``--job`` and talks only to the pinned coordinator. Every app bundle the SuperLink sends runs through
``client.app_runner``, which refuses a FAB the coordinator did not sign (``trusted-apps.json``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from client.app_runner import COORDINATOR_KEY_ENV, TRUSTED_APPS_ENV
from client.cli.common import OWNER_KEY, JobOption, console, default_client_dir, fail
from protos.app_approval import TRUSTED_APPS_FILE
from protos.errors import ExitCode

node_app = typer.Typer(help="Run this data owner's Flower SuperNode.", no_args_is_help=True)
SUPERNODE_KEY, CA_CERT, COORDINATOR_PUB = "supernode.key", "ca.crt", "coordinator.pub"


@dataclass(frozen=True)
class NodeFiles:
    """An owner's directory as ``offsite-coordinator deploy init`` writes it (``owner-N/``)."""

    directory: Path

    def __getitem__(self, name: str) -> Path:
        return self.directory / name

    def missing(self) -> list[str]:
        names = (OWNER_KEY, SUPERNODE_KEY, CA_CERT, COORDINATOR_PUB, TRUSTED_APPS_FILE)
        return [name for name in names if not self[name].is_file()]


def node_config(files: NodeFiles, *, coordinator: str, job: str, train: Path, cache: Path,
                device: str = "auto") -> str:
    """Flower's ``--node-config`` string: the owner's whole train file, its keys, its cache, its one job."""
    values: Mapping[str, str | int] = {
        "partition-id": 0, "num-partitions": 1, "job-id": job, "coordinator": coordinator,
        "root-cert": str(files[CA_CERT]), "coordinator-key": str(files[COORDINATOR_PUB]),
        "owner-key": str(files[OWNER_KEY]), "cache-dir": str(cache), "train-file": str(train), "device": device,
    }
    return " ".join(f"{key}={value}" if isinstance(value, int) else f'{key}="{value}"'
                    for key, value in values.items())


def write_runner_shim(bin_dir: Path) -> Path:
    """``bin_dir/flwr-clientapp``: the command the SuperNode runs per task, here the verifying runner."""
    bin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    shim = bin_dir / "flwr-clientapp"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m client.app_runner "$@"\n')
    shim.chmod(0o700)
    return shim


def _flower_binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        fail(f"{name} not found: install offsite (it depends on flwr)", ExitCode.FAILED)
    return found


def supernode_command(files: NodeFiles, *, superlink: str, coordinator: str, job: str, train: Path, cache: Path,
                      port: int, device: str = "auto") -> list[str]:
    """The ``flower-supernode`` command line (by name) ``node start`` runs."""
    return ["flower-supernode", "--superlink", superlink,
            "--root-certificates", str(files[CA_CERT]), "--auth-supernode-private-key", str(files[SUPERNODE_KEY]),
            "--host", "127.0.0.1", "--port", str(port),  # its ClientApp API has no authentication: loopback only
            "--node-config", node_config(files, coordinator=coordinator, job=job, train=train, cache=cache,
                                         device=device)]


@node_app.command("start")
def start(superlink: Annotated[str, typer.Option(help="The SuperLink's Fleet address HOST:PORT (TLS).")],
          coordinator: Annotated[str, typer.Option(help="The coordinator's gRPC address HOST:PORT (TLS).")],
          job: JobOption,
          train: Annotated[Path, typer.Option(help="This owner's training data (JSONL).")],
          directory: Annotated[Path | None, typer.Option(
              "--dir", help="The owner's files: owner.key, supernode.key, ca.crt, coordinator.pub, "
                            "trusted-apps.json (default: $OFFSITE_HOME/client).")] = None,
          cache: Annotated[Path | None, typer.Option(help="Bundle cache and receipts (default: DIR/cache).")] = None,
          port: Annotated[int, typer.Option(help="Local port of the SuperNode's ClientApp API.")] = 9094,
          device: Annotated[str, typer.Option(help="Training device: auto (CUDA when present), cpu, cuda, "
                                                   "cuda:N.")] = "auto",
          dry_run: Annotated[bool, typer.Option(help="Print the command instead of running it.")] = False) -> None:
    """Start this owner's SuperNode: TLS, its registered node key, only coordinator-signed app bundles."""
    files = NodeFiles((directory or default_client_dir()).resolve())
    if missing := files.missing():
        fail(f"--dir {files.directory} lacks {', '.join(missing)} (offsite-coordinator deploy init writes them)")
    if not train.is_file():
        fail(f"--train {train}: no such file")
    cache = (cache or files["cache"]).resolve()
    bin_dir = cache / "bin"
    command = supernode_command(files, superlink=superlink, coordinator=coordinator, job=job, train=train.resolve(),
                                cache=cache, port=port, device=device)
    command[0] = _flower_binary(command[0])
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(command[0]).parent}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}",
           TRUSTED_APPS_ENV: str(files[TRUSTED_APPS_FILE]), COORDINATOR_KEY_ENV: str(files[COORDINATOR_PUB])}
    if dry_run:
        console.print(" ".join(command), highlight=False, soft_wrap=True)
        return
    write_runner_shim(bin_dir)
    os.execve(command[0], command, env)
