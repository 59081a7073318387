"""Quiet unless --verbose: transformers' load reports and weight-loading bars are hidden, and shown with verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.simulate.runtime import QUIET_ENV
from tests.models import tiny_classifier_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
from coordinator.quiet import quiet_libraries
from emulator.loading import load_model
quiet_libraries(verbose=sys.argv[2] == "verbose")
load_model(sys.argv[1], "classification", num_labels=6)  # a new head: transformers reports the mismatch
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_library_chatter_only_when_verbose(tmp_path: Path, mode: str) -> None:
    model = tiny_classifier_dir(tmp_path / "tiny-bert")
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}  # as a user's shell would be
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(model), mode], capture_output=True, text=True,
                            cwd=REPO, timeout=300, check=True, env=env)
    output = result.stdout + result.stderr
    chatter = ("LOAD REPORT" in output, "Loading weights" in output)
    assert chatter == ((False, False) if mode == "quiet" else (True, True)), output[-2000:]
