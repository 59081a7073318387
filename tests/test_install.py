"""A non-editable install works on its own: the wheel carries the default corpus and the demo dataset, and
`offsite-coordinator demo` runs from an empty directory with nothing read through the repository tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ("emulator/corpora/python-docstrings.txt", "emulator/corpora/LICENSE-PSF.txt",
                "coordinator/demo_data/wordnet-lexnames/train.jsonl",
                "coordinator/demo_data/wordnet-lexnames/eval.jsonl",
                "coordinator/demo_data/wordnet-lexnames/LICENSE")
JUNK = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
                              ".ruff_cache", ".pytest_cache", "runs", "out", "offsite-demo")


def copy_source_tree(dest: Path) -> None:
    """The files a clean checkout would build from: tracked plus untracked-but-not-ignored (so the build never
    writes build/ or *.egg-info into the repository, and never picks up local junk)."""
    try:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy the tree minus the usual junk
        shutil.copytree(ROOT, dest, ignore=JUNK, symlinks=True)
        return
    for name in sorted({n for n in listing.decode().split("\0") if n}):
        source = ROOT / name
        if not source.is_file():  # deleted in the work tree, or a submodule
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name, follow_symlinks=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the repository, built once per module from a copy of its source tree."""
    root = tmp_path_factory.mktemp("wheel")
    source, out = root / "src", root / "dist"
    copy_source_tree(source)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", out, source],
        root, clean_env(), 600)
    (built,) = out.glob("offsite-*.whl")
    return built


def test_wheel_ships_package_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [name for name in PACKAGE_DATA if name not in names], sorted(names)
    assert not [name for name in names if name.startswith(("examples/", "tests/"))]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH: a repository on sys.path (its offsite.egg-info included) would
    shadow the install under test."""
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    return env | extra


def run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run([str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    output = f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{output}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_from_a_non_editable_install(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv holding only the wheel, borrowing this interpreter's dependencies but not its editable
    install of the repository, runs the demo from an empty directory."""
    venv, cwd = tmp_path / "venv", tmp_path / "empty"
    cwd.mkdir()
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, clean_env(), 120)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--ignore-installed", "--quiet",
         wheel], tmp_path, clean_env(), 300)
    # A plain path line in a .pth puts that directory on sys.path without running its own .pth files, so the
    # editable finder for this repository stays inactive while torch, transformers, flwr ... are importable.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd, clean_env(), 60)
    (Path(purelib.strip()) / "offsite-test-deps.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))

    env = clean_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OFFSITE_HOME=str(tmp_path / "offsite-home"),
                    VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    where = run([python, "-c", "import coordinator, emulator; print(coordinator.__file__); print(emulator.__file__)"],
                cwd, env, 120).split()
    assert len(where) == 2, where
    for module_file in map(Path, where):
        assert module_file.is_relative_to(venv), f"imported from {module_file}, not from the fresh venv {venv}"
        assert not module_file.is_relative_to(ROOT), module_file

    log = tmp_path / "demo.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        demo = subprocess.run([str(venv / "bin" / "offsite-coordinator"), "demo", "--distill-steps", "5",
                               "--baseline", "none", "--workdir", "run"], cwd=cwd, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=900)
    output = log.read_text(errors="replace")
    assert demo.returncode == 0, f"demo exited {demo.returncode} after {time.monotonic() - started:.0f}s:\n" \
                                 f"{output[-6000:]}"
    report_path = cwd / "run" / "report.json"
    assert report_path.is_file(), output[-3000:]
    report = json.loads(report_path.read_text())
    rows = report.get("rows", report)
    for row in ("plugin_tuned", "emulator_tuned"):
        assert 0.0 <= float(rows[row]) <= 1.0, (row, report)
