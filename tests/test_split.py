from __future__ import annotations

import pytest

from emulator.split import LayerPlan, SplitConfig, SplitError, uniform_keep_indices


def test_opt_1_3b_2_8_2_keeps_the_reference_blocks() -> None:
    plan = SplitConfig(bottom=2, top=2, keep=8).plan(24)
    assert plan.kept_middle == [2, 5, 7, 10, 13, 16, 18, 21]
    assert plan.emulator_sources == [0, 1, 2, 5, 7, 10, 13, 16, 18, 21, 22, 23]


@pytest.mark.parametrize(
    ("m", "k", "expected"),
    [(4, 4, [0, 1, 2, 3]), (4, 2, [0, 3]), (4, 1, [0]), (5, 3, [0, 2, 4]), (10, 4, [0, 3, 6, 9]), (6, 4, [0, 2, 3, 5])],
)
def test_uniform_keep_indices(m: int, k: int, expected: list[int]) -> None:
    kept = uniform_keep_indices(m, k)
    assert kept == expected
    assert kept[0] == 0 and (k == 1 or kept[-1] == m - 1)
    assert kept == sorted(set(kept))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bottom": -1}, "bottom"),
        ({"top": -2}, "top"),
        ({"bottom": 0, "top": 0}, "bottom"),
        ({"keep": 0}, "keep"),
    ],
)
def test_invalid_split_names_the_field(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(SplitError, match=f"^{field}") as error:
        SplitConfig(**kwargs)
    assert error.value.field == field
    assert error.value.render(lambda name: f"--{name}").startswith(f"--{field}")  # what a CLI prints


def test_split_must_leave_a_middle() -> None:
    with pytest.raises(SplitError, match="bottom 3 plus top 3"):
        SplitConfig(3, 3).plan(6)
    with pytest.raises(SplitError, match="keep 5 exceeds the 4 middle blocks"):
        SplitConfig(1, 1, 5).plan(6)


def test_layer_map_round_trips_through_json() -> None:
    plan = SplitConfig(1, 2, 3).plan(12)
    again = LayerPlan.from_json(12, plan.to_json())
    assert again == plan
    roles = [entry["role"] for entry in plan.to_json()]
    assert roles == ["bottom", "middle", "middle", "middle", "top", "top"]
    assert plan.adapter_blocks == [0, 10, 11]
