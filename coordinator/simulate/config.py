"""``simulate``'s settings: one typed document, saved as ``simulate.json`` in the run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import InvalidSettingError
from emulator.compress import CompressionPlan
from emulator.device import pick_device
from emulator.methods import MethodConfig
from emulator.split import SplitConfig
from emulator.train import TrainConfig
from protos.documents import Document
from protos.files import atomic_write
from protos.round_config import RoundConfig

CONFIG_FILE = "simulate.json"
TASKS = ("causal-lm", "classification", "multiple-choice")
PARTITIONS = ("iid", "dirichlet")
BASELINES = ("full-ft",)


@dataclass(frozen=True, kw_only=True)
class SimulateConfig(Document):
    model: str | None = None  # a hub id or path; None: the embedded all-MiniLM-L6-v2
    task: str = "classification"
    train_file: Path
    eval_file: Path
    workdir: Path
    clients: int = 2
    rounds: int = 2
    bottom: int = 1
    top: int = 1
    keep: int | None = 2  # uniform layer drop; with ``compression``, say keep in its layer_drop step instead
    adapter_blocks: list[int] | None = None  # explicit adapter placement (bottom/top then unused)
    compression: list[dict[str, Any]] | None = None  # an emulator.compress.CompressionPlan as JSON
    training: RoundConfig = field(default_factory=RoundConfig)  # method, LoRA, epochs, lr, ... sent each round
    partition: str = "iid"
    min_replies: int | None = None  # None: every client
    baseline: str | None = None  # "full-ft": also fine-tune the full model centrally
    attacker: bool = False  # also the defecting owner: heal the emulator on public text, then tune all of it
    heal_steps: int = 100  # the attacker's healing budget (optimizer steps of the LM loss on public text)
    cost_steps: int = 3  # timed training steps each for the cost rows (emulator adapter vs full model)
    distill_steps: int = 0  # 0: owners get the plain layer-drop emulator
    device: str = "auto"  # owners' training and the evaluation: CUDA when present, else CPU
    min_privacy_gap: float | None = None  # the release gate's minimums for listing the job's adapter (None: the
    min_plugin_score: float | None = None  # marketplace's defaults)
    node_wait: float = 30.0
    round_timeout: float = 900.0

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise InvalidSettingError(f"{{clients}} must be >= 1, got {self.clients}")
        if self.rounds < 1:
            raise InvalidSettingError(f"{{rounds}} must be >= 1, got {self.rounds}")
        if self.task not in TASKS:
            raise InvalidSettingError(f"{{task}} must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.partition not in PARTITIONS:
            raise InvalidSettingError(f"{{partition}} must be iid or dirichlet, got {self.partition!r}")
        if self.baseline not in (None, *BASELINES):
            raise InvalidSettingError(f"{{baseline}} must be full-ft, got {self.baseline!r}")
        if self.heal_steps < 0:
            raise InvalidSettingError(f"{{heal_steps}} must be >= 0, got {self.heal_steps}")
        if self.cost_steps < 0:
            raise InvalidSettingError(f"{{cost_steps}} must be >= 0, got {self.cost_steps}")
        if self.distill_steps < 0:
            raise InvalidSettingError(f"{{distill_steps}} must be >= 0, got {self.distill_steps}")
        if self.min_replies is not None and self.min_replies < 1:
            raise InvalidSettingError(f"{{min_replies}} must be >= 1, got {self.min_replies}")
        for name in ("train_file", "eval_file"):
            if not Path(getattr(self, name)).is_file():
                raise InvalidSettingError(f"{{{name}}} {getattr(self, name)}: no such file")
        if self.compression is not None and self.keep is not None:
            raise InvalidSettingError("{keep} belongs to the layer_drop step when {compression} is given")
        pick_device(self.device)  # an unavailable device is refused before anything runs
        self.split_config  # noqa: B018 - validates the placement
        self.compression_plan  # noqa: B018
        self.method_config  # noqa: B018 - validates the method's own settings
        self.train_config  # noqa: B018

    @property
    def split_config(self) -> SplitConfig:
        if self.adapter_blocks is not None:
            return SplitConfig(adapter_blocks=tuple(self.adapter_blocks), keep=self.keep)
        return SplitConfig(self.bottom, self.top, self.keep)

    @property
    def compression_plan(self) -> CompressionPlan | None:
        return None if self.compression is None else CompressionPlan.from_json(self.compression)

    @property
    def split_name(self) -> str:
        if self.compression is None and self.adapter_blocks is None:
            return f"{self.bottom}-{self.keep}-{self.top}"
        plan = self.compression_plan
        where = f"adapter {self.adapter_blocks}" if self.adapter_blocks else f"{self.bottom}+{self.top} adapter"
        return f"{where}, {plan.describe() if plan else f'keep {self.keep}'}"

    @property
    def method_config(self) -> MethodConfig:
        return MethodConfig.from_round(self.training)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_round(self.training)

    @property
    def replies_needed(self) -> int:
        return self.min_replies or self.clients

    def save(self) -> Path:
        return atomic_write(self.workdir / CONFIG_FILE, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> SimulateConfig:
        """The settings a run directory was made with; raises naming the file when it is not a run directory."""
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise InvalidSettingError(f"{{run}} {run_dir}: no {CONFIG_FILE}; is it a simulate/demo run directory?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InvalidSettingError(f"{{run}} {path}: not valid JSON ({error.msg}, line {error.lineno})") from error
        return cls.from_json(data, CONFIG_FILE)
