"""The distillation loss and the block bookkeeping, on small tensors."""

from __future__ import annotations

import pytest
import torch

from emulator.distill import DistillConfig, DistillConfigError, match_pairs
from emulator.families import BlockLocation
from emulator.fidelity import normalized_mse
from emulator.split import SplitConfig
from emulator.surgery import Emulator


def test_normalized_mse_matches_a_hand_computation_and_ignores_padding() -> None:
    h_t = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])  # (1, 3, 2); the last position is padding
    h_s = torch.tensor([[[1.0, 1.0], [2.0, 4.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # real elements: teacher 1, 2, 3, 4 -> mean(h_T^2) = 30 / 4; squared errors 0, 1, 1, 0 -> mean 2 / 4
    expected = (2 / 4) / (30 / 4)
    assert normalized_mse(h_t, h_s, mask).item() == pytest.approx(expected)
    # the same as the paper's formula on the unpadded positions
    real_t, real_s = h_t[:, :2], h_s[:, :2]
    paper = (((real_t - real_s) / real_t.pow(2).mean().sqrt()) ** 2).mean()
    assert normalized_mse(h_t, h_s, mask).item() == pytest.approx(paper.item())


def test_match_pairs_map_each_kept_block_to_the_span_it_replaces() -> None:
    plan = SplitConfig(1, 1, 2).plan(6)  # middle 1..4, kept 1 and 4
    emulator = Emulator(model=None, plan=plan, location=BlockLocation("bert", "encoder.layer", "n", 6))  # type: ignore[arg-type]
    # emulator block 1 (full 1) stands in for full 1..3 -> its output matches full hidden_states[4];
    # emulator block 2 (full 4) -> output (emulator hidden_states[3]) matches full hidden_states[5]
    assert match_pairs(emulator, per_block=True) == [(2, 4), (3, 5)]
    assert match_pairs(emulator, per_block=False) == [(3, 5)]


@pytest.mark.parametrize(("kwargs", "field"), [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"),
                                               ({"batch_size": 0}, "batch_size"), ({"eval_every": 0}, "eval_every"),
                                               ({"steps": 5, "warmup_steps": 5}, "warmup_steps")])
def test_config_errors_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(DistillConfigError, match=f"^{field} ") as error:
        DistillConfig(**kwargs)  # type: ignore[arg-type]
    assert error.value.field == field


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    config = DistillConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert config.lr_at(0) == pytest.approx(1e-4)
    assert config.lr_at(9) == pytest.approx(1e-3)
    assert config.lr_at(100) == pytest.approx(0.0, abs=1e-12)
