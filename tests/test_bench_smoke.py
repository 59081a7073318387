"""Smoke test of benchmarks/ot_vs_full.py on a tiny model: it runs, prints the five ratio lines, writes its files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATIO_KEYS = ["throughput_ratio_layers", "memory_ratio_layers", "throughput_ratio_lora", "memory_ratio_lora",
              "memory_ratio_lora_int8"]


def test_ot_vs_full_quick(tmp_path: Path) -> None:
    out = tmp_path / "ot_vs_full.json"
    start = time.perf_counter()
    # ~20 s on an idle 2-core machine; the generous timeout absorbs other jobs sharing the CPU.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ot_vs_full.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=180, check=False)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]

    last = proc.stdout.strip().splitlines()[-5:]
    assert [line.partition("=")[0] for line in last] == RATIO_KEYS, last
    values = [float(line.partition("=")[2]) for line in last]
    assert all(value > 0 for value in values), last

    report = json.loads(out.read_text())
    results = report["results"]
    assert results["ot_layers"]["params_trainable"] < results["full"]["params_trainable"]
    assert results["ot_lora"]["params_trainable"] < results["ot_layers"]["params_trainable"]
    assert results["full"]["params_trainable"] == results["full"]["params_full_model"]
    assert results["ot_lora_int8"]["params_trainable"] == results["ot_lora"]["params_trainable"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert elapsed < 180
