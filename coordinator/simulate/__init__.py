"""``simulate``: the whole offsite-tuning pipeline on one machine.

Setup (full model, signed bundle, optional distillation, owners, jobs), federated rounds in Flower's simulation
runtime beside the coordinator's gRPC service on a free localhost port (each data owner its own partition, sealed
deltas over gRPC), then the plug-in report. With distillation, data owners get the distilled emulator, and a
second job runs the same federation on the plain layer-drop emulator, so the report shows the plug-in from both.
A run directory holds everything; running again on it resumes after the last completed round.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.plugin_report import PluginReport
from coordinator.simulate.config import SimulateConfig
from coordinator.simulate.evaluate import evaluate_run
from coordinator.simulate.runtime import federate
from coordinator.simulate.setup import Setup, Variant, setup

__all__ = ["SimulateConfig", "Setup", "Variant", "evaluate_run", "federate", "setup", "simulate"]


def simulate(config: SimulateConfig, report_path: Path, *, verbose: bool = False) -> PluginReport:
    """Setup, federate (each emulator variant), evaluate."""
    started = time.monotonic()
    config.save()
    prepared = setup(config)
    for variant in prepared.variants:
        federate(config, prepared, variant, verbose=verbose)
    report = evaluate_run(config, prepared, report_path)
    report.notes["seconds"] = round(time.monotonic() - started, 1)
    report.write(report_path)
    return report
