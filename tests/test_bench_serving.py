"""Smoke test of benchmarks/serving.py on a tiny LLaMA: it runs, outputs agree across systems, it prints the ratio
lines and writes its JSON and PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RATIO_KEYS = ["serving_vs_merge_16", "serving_vs_sequential_16", "split_vs_swap_16", "memory_copies_vs_serving_16",
              "ort_vs_torch", "rss_serving_16_vs_base", "serving_vs_merge_16_trace", "split_vs_swap_16_trace"]
SYSTEMS = ["offsite", "merge", "copies", "sequential", "split", "swap"]


@pytest.mark.slow
def test_serving_benchmark_quick(tmp_path: Path) -> None:
    # ~30 s on an idle 2-core machine (one process per system); the timeout absorbs other jobs sharing the CPU.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serving.py"), "--quick", "--out", str(tmp_path),
                           "--work", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "outputs_identical=True" in lines, proc.stdout[-3000:]

    printed = dict(line.split("=", 1) for line in lines if line.partition("=")[0] in RATIO_KEYS)
    assert sorted(printed) == sorted(RATIO_KEYS), proc.stdout[-3000:]
    for key, value in printed.items():
        assert math.isfinite(float(value)) and float(value) > 0, (key, value)

    report = json.loads((tmp_path / "serving.json").read_text())
    assert sorted(report["results"]) == sorted(SYSTEMS)
    for system in SYSTEMS:
        metrics = report["results"][system]["16"]
        assert metrics["tokens"] == report["settings"]["requests"] * report["settings"]["new_tokens"]
        assert metrics["p50_latency_s"] <= metrics["p99_latency_s"]
        assert 0 <= metrics["deadline_miss_rate"] <= 1
    assert report["engine"]["offsite"]["16"]["distinct_adapter_outputs"] > 1  # the adapters change the outputs
    assert sorted(report["capacity_tokens_per_s_16"]) == sorted(SYSTEMS)
    assert (tmp_path / "serving.png").stat().st_size > 0
