"""The admin and data-owner CLIs on the real embedded MiniLM: keys, build -> verify -> plug-in."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
from typer.testing import CliRunner

from client.cli import app as client_app
from coordinator.cli import app as coordinator_app
from emulator.loading import embedded_model_path, load_model
from emulator.surgery import extract_adapter, plug_adapter
from protos.bundle import verify_bundle
from protos.crypto import load_public_key

runner = CliRunner()


def test_keys_init_writes_a_private_key_0600_and_never_overwrites(tmp_path: Path) -> None:
    result = runner.invoke(coordinator_app, ["keys", "init", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    key = tmp_path / "coordinator.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert (tmp_path / "coordinator.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = key.read_bytes()
    again = runner.invoke(coordinator_app, ["keys", "init", "--dir", str(tmp_path)])
    assert again.exit_code != 0 and "--force" in again.output
    assert key.read_bytes() == before
    forced = runner.invoke(coordinator_app, ["keys", "init", "--dir", str(tmp_path), "--force"])
    assert forced.exit_code == 0 and key.read_bytes() != before


def test_keys_init_defaults_to_offsite_home(offsite_home: Path) -> None:
    assert runner.invoke(coordinator_app, ["keys", "init"]).exit_code == 0
    assert (offsite_home / "coordinator" / "coordinator.key").exists()


def test_a_bad_split_fails_with_the_flag_named(tmp_path: Path) -> None:
    result = runner.invoke(coordinator_app, ["emulator", "build", "--bottom", "3", "--top", "3", "--out",
                                             str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "--bottom 3 plus --top 3" in result.output
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    home = tmp_path_factory.mktemp("home")
    os.environ["OFFSITE_HOME"] = str(home)
    out = home / "minilm-bundle"
    result = runner.invoke(coordinator_app, ["emulator", "build", "--bottom", "1", "--top", "1", "--keep", "2",
                                             "--out", str(out), "--tar"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for expected in ("22,713,216", "kept middle blocks", "1, 4", "compression ratio"):
        assert expected in result.output
    return out, home / "coordinator" / "coordinator.pub"


def test_minilm_build_verify_and_plug_in(minilm_bundle: tuple[Path, Path]) -> None:
    bundle, pub = minilm_bundle
    verify = runner.invoke(client_app, ["bundle", "verify", str(bundle), "--coordinator-key", str(pub)],
                           terminal_width=200)
    assert verify.exit_code == 0, verify.output
    assert "1-2-1" in verify.output
    tar_verify = runner.invoke(client_app, ["bundle", "verify", str(bundle) + ".tar", "--coordinator-key", str(pub)])
    assert tar_verify.exit_code == 0, tar_verify.output

    # A data owner loads the emulator with plain transformers and "tunes" its adapter blocks.
    verified = verify_bundle(bundle, load_public_key(pub))
    emulator = AutoModel.from_pretrained(verified.emulator_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(verified.tokenizer_dir)
    assert emulator.config.num_hidden_layers == 4
    spec = verified.adapter_spec
    shipped = load_file(str(verified.adapter_weights))
    assert all(torch.equal(shipped[n], t) for n, t in extract_adapter(emulator, spec, from_emulator=True).items())
    with torch.no_grad():
        for t in spec.tensors:
            emulator.get_parameter(t.emulator_name).mul_(1.01)
    tuned = extract_adapter(emulator, spec, from_emulator=True)

    # The coordinator plugs it into the private full model: adapter blocks change, middle blocks do not.
    full = load_model(str(embedded_model_path()), "base")
    before = {k: v.clone() for k, v in full.state_dict().items()}
    batch = tokenizer(["offsite tuning keeps the model private"], return_tensors="pt")
    with torch.no_grad():
        out_before = full(**batch).last_hidden_state
    plug_adapter(full, spec, tuned)
    after = full.state_dict()
    for name in before:
        block = name.split(".")[2] if name.startswith("encoder.layer.") else None
        if block in ("0", "5"):
            assert torch.equal(after[name], tuned[name])
        else:
            assert torch.equal(after[name], before[name]), name
    with torch.no_grad():
        assert not torch.allclose(full(**batch).last_hidden_state, out_before)


def test_verify_cli_refuses_a_tampered_bundle(minilm_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    bundle, pub = minilm_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "emulator" / "model.safetensors", "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0x80]))
    result = runner.invoke(client_app, ["bundle", "verify", str(copy), "--coordinator-key", str(pub)],
                           terminal_width=200)
    assert result.exit_code == 1
    assert "emulator/model.safetensors" in result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["offsite-coordinator", "--help"],
        ["offsite-coordinator", "keys", "init", "--help"],
        ["offsite-coordinator", "emulator", "build", "--help"],
        ["offsite-coordinator", "demo", "--help"],
        ["offsite-client", "--help"],
        ["offsite-client", "bundle", "verify", "--help"],
    ],
)
def test_console_scripts_have_help(argv: list[str]) -> None:
    module = "coordinator" if argv[0] == "offsite-coordinator" else "client"
    result = subprocess.run([sys.executable, "-m", module, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
