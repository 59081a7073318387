"""Both CLIs: every --help reads whole, and the same kind of failure exits with the same code in both, with the
library's config fields named as the CLI's flags."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from client.cli import app as client_app
from coordinator.cli import app as coordinator_app
from coordinator.demo_data import demo_dataset
from protos.errors import ExitCode

runner = CliRunner()
APPS = {"offsite-coordinator": coordinator_app, "offsite-client": client_app}
BARE_END = re.compile(r"\s\.\s*(│|$)")  # " ." where a default was meant to be named (rich ate "[default: ...]")


def flat(output: str) -> str:
    """The console wraps long lines: compare with whitespace collapsed."""
    return " ".join(output.split())


def commands(group: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from commands(command, (*path, name))


ALL = [(name, path) for name, app in APPS.items() for path in commands(typer.main.get_command(app))]


@pytest.mark.parametrize(("cli", "path"), ALL, ids=[" ".join((c, *p)) for c, p in ALL])
def test_every_help_reads_whole(cli: str, path: tuple[str, ...]) -> None:
    result = runner.invoke(APPS[cli], [*path, "--help"], terminal_width=240)
    assert result.exit_code == 0, result.output
    bare = [line for line in result.output.splitlines() if BARE_END.search(line)]
    assert not bare, f"{cli} {' '.join(path)} --help has lines ending in a bare '.':\n" + "\n".join(bare)
    assert "[default: ]" not in result.output


def test_the_layout_has_every_command_group() -> None:
    names = {path[0] for _, path in ALL if path}
    assert {"keys", "emulator", "simulate", "demo", "eval", "serve", "owners", "job", "round", "delta-key",
            "bundle", "join", "submit"} <= names


def test_an_existing_key_is_bad_input_in_both_clis(tmp_path: Path) -> None:
    for name, app in APPS.items():
        first = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / name)])
        assert first.exit_code == 0, first.output
        again = runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / name)])
        assert again.exit_code == ExitCode.BAD_INPUT, (name, again.output)
        assert "--force" in again.output


def test_a_missing_key_file_is_bad_input_in_both_clis(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    coordinator = runner.invoke(coordinator_app, ["job", "create", "--bundle", str(tmp_path), "--job", "j",
                                                  "--key", missing, "--state", str(tmp_path / "state")])
    client = runner.invoke(client_app, ["bundle", "verify", str(tmp_path), "--coordinator-key", missing])
    for result in (coordinator, client):
        assert result.exit_code == ExitCode.BAD_INPUT, result.output
        assert "nope.pem does not exist" in flat(result.output)


def test_a_bundle_that_fails_verification_is_a_failed_check_in_both_clis(tmp_path: Path) -> None:
    home = tmp_path / "home"
    built = runner.invoke(coordinator_app, ["emulator", "build", "--model", str(tiny_bert(tmp_path)), "--bottom", "1",
                                            "--top", "1", "--keep", "1", "--out", str(tmp_path / "b"),
                                            "--key", str(home / "c.key")])
    assert built.exit_code == 2  # the key file does not exist yet: bad input
    assert runner.invoke(coordinator_app, ["keys", "init", "--dir", str(home)]).exit_code == 0
    built = runner.invoke(coordinator_app, ["emulator", "build", "--model", str(tiny_bert(tmp_path)), "--bottom", "1",
                                            "--top", "1", "--keep", "1", "--out", str(tmp_path / "b"),
                                            "--key", str(home / "coordinator.key")])
    assert built.exit_code == 0, built.output
    config = tmp_path / "b" / "emulator" / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))
    client = runner.invoke(client_app, ["bundle", "verify", str(tmp_path / "b"), "--coordinator-key",
                                        str(home / "coordinator.pub")])
    coordinator = runner.invoke(coordinator_app, ["job", "create", "--bundle", str(tmp_path / "b"), "--job", "j",
                                                  "--key", str(home / "coordinator.key"),
                                                  "--state", str(tmp_path / "state")])
    for result in (client, coordinator):
        assert result.exit_code == ExitCode.FAILED, result.output
        assert "emulator/config.json" in flat(result.output)


def tiny_bert(tmp_path: Path) -> Path:
    from tests.models import tiny_classifier_dir

    path = tmp_path / "tiny-bert"
    return path if path.exists() else tiny_classifier_dir(path)


@pytest.mark.parametrize(("args", "expected"), [
    (["--clients", "0"], "--clients must be >= 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--method", "adam"], "--method must be one of"),
    (["--lora-r", "0"], "--lora-r must be >= 1"),
    (["--keep", "0"], "--keep must be >= 1"),
])
def test_simulate_names_the_flag_of_a_bad_setting(tmp_path: Path, args: list[str], expected: str) -> None:
    data = demo_dataset()
    result = runner.invoke(coordinator_app, ["simulate", "--train", str(data / "train.jsonl"), "--eval",
                                             str(data / "eval.jsonl"), "--report", str(tmp_path / "r.json"),
                                             "--workdir", str(tmp_path / "run"), *args], terminal_width=240)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert expected in flat(result.output)


def test_simulate_with_a_broken_second_line_names_the_file_and_line(tmp_path: Path) -> None:
    data = demo_dataset()
    broken = tmp_path / "train.jsonl"
    lines = (data / "train.jsonl").read_text().splitlines()
    broken.write_text("\n".join([lines[0], lines[1].replace('", "', '" "', 1), *lines[2:20]]) + "\n")
    shutil.copy(data / "eval.jsonl", tmp_path / "eval.jsonl")
    result = runner.invoke(coordinator_app, ["simulate", "--train", str(broken), "--eval", str(tmp_path / "eval.jsonl"),
                                             "--report", str(tmp_path / "r.json"), "--workdir", str(tmp_path / "run")],
                           terminal_width=400)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert f"{broken}:2: not valid JSON" in flat(result.output)
