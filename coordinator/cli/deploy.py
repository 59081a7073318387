"""``offsite-coordinator deploy``: write what ``docker-compose.yml`` needs (logic in ``coordinator.deploy``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.common import console, fail_with
from coordinator.deploy import init_deployment
from coordinator.errors import CoordinatorError
from protos.errors import ProtocolError

deploy_app = typer.Typer(help="Prepare a deployment: CA, TLS certificates, keys, approved owners.",
                         no_args_is_help=True)


@deploy_app.command("init")
def deploy_init(
    out: Annotated[Path, typer.Option("--out", help="Directory to create (docker-compose.yml expects ./deploy).")],
    owners: Annotated[int, typer.Option("--owners", help="Number of data owners (owner-0 .. owner-N-1).")] = 2,
    hostname: Annotated[str, typer.Option("--hostname", help="Extra DNS name or IP address in the server "
                                                             "certificates.")] = "localhost",
    job_id: Annotated[str, typer.Option("--job", help="Job id in run.toml.")] = "job-1",
    rounds: Annotated[int, typer.Option("--rounds", help="num-server-rounds in run.toml.")] = 2,
    app: Annotated[Path | None, typer.Option("--app", help="The Flower app directory `flwr run` will start: its "
                                                           "bundle is approved in each owner's trusted-apps.json "
                                                           "(default: . when it is a Flower app).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing directory (its keys are lost).")] = False,
) -> None:
    """Create a CA, server certificates, the coordinator's keys and state (owners approved), one directory per
    owner with only its own keys, the SuperNode keys to register, a Flower config and run.toml."""
    if app is None and (Path("pyproject.toml").is_file() and "[tool.flwr.app]" in Path("pyproject.toml").read_text()):
        app = Path(".")
    try:
        deployment = init_deployment(out, owners, hostname=hostname, job_id=job_id, rounds=rounds, app=app,
                                     force=force)
    except (FileExistsError, CoordinatorError, ProtocolError) as error:
        fail_with(error, {"owners": "--owners", "hostname": "--hostname", "job_id": "--job", "app": "--app"})
    console.print(f"deployment   {deployment.root}\nCA key       {deployment.root / 'ca' / 'ca.key'} "
                  "(mounted by no service; keep it offline)")
    for owner in deployment.owners:
        console.print(f"owner        {owner.directory.name}  id {owner.owner_id} (approved)")
    if app is None:
        console.print("no Flower app approved: owners' nodes run nothing until `offsite-coordinator app sign "
                      f"--key {deployment.root / 'coordinator' / 'keys' / 'coordinator.key'} "
                      f"{deployment.root}/owner-*/trusted-apps.json`")
    console.print(f"next: docker compose up -d superlink, then {deployment.root / 'register-supernodes.sh'}, "
                  "then docker compose up -d")
