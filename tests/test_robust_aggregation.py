"""Rounds a malicious owner cannot steer: per-delta clipping, robust aggregators, a cap on claimed examples, and only
approved owners aggregated; against the real gRPC service and the real stored (sealed) uploads."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import save_file
from typer.testing import CliRunner

from coordinator.admin_client import RoundAggregated, RoundOpened
from coordinator.cli import app as coordinator_app
from coordinator.errors import InvalidSettingError
from coordinator.federation import FederationSettings, _run_rounds
from coordinator.jobs import create_job
from coordinator.progress import Progress, RoundRecord, checkpoint_path
from coordinator.records import DEFAULT_MAX_NUM_EXAMPLES
from coordinator.round_service import RoundKeeper, aggregate_round
from coordinator.storage import Storage
from emulator.aggregate import (
    AGGREGATORS,
    AggregationError,
    AggregatorConfig,
    AggregatorConfigError,
    WeightedDelta,
    aggregate,
    clip_delta,
    delta_norm,
    register_aggregator,
    trim_count,
)
from emulator.errors import EmulatorError
from protos.errors import ExitCode
from protos.round_config import RoundConfig
from tests.wire_support import CHUNK, SPEC, Wire, good_delta, reference

pytest_plugins = ("tests.wire_support",)

Tensors = dict[str, torch.Tensor]


def one(values: list[float]) -> Tensors:
    return {"w": torch.tensor(values)}


def owners(*rows: tuple[str, int, list[float]]) -> list[WeightedDelta]:
    return [WeightedDelta(owner, n, one(values)) for owner, n, values in rows]


ZERO = {"w": torch.zeros(2)}


# --- (a) the aggregators and clipping, pure ---------------------------------------------------------------------

def test_the_registry_has_three_aggregators_and_refuses_a_second_of_a_name() -> None:
    assert {"fedavg", "trimmed-mean", "median"} <= set(AGGREGATORS)
    with pytest.raises(AggregationError, match="already registered"):
        register_aggregator("median", AGGREGATORS["fedavg"])
    assert AggregatorConfig().name == "fedavg"


def test_fedavg_weights_by_examples() -> None:
    deltas = owners(("a", 1, [4.0, 0.0]), ("b", 3, [0.0, 8.0]))
    assert torch.equal(aggregate(ZERO, deltas, AggregatorConfig("fedavg"))["w"], torch.tensor([1.0, 6.0]))


@pytest.mark.parametrize(("count", "fraction", "trimmed"),
                         [(2, 0.2, 0), (3, 0.2, 1), (4, 0.2, 1), (5, 0.2, 1), (10, 0.2, 2), (10, 0.3, 3),
                          (3, 0.01, 1)])
def test_trim_count(count: int, fraction: float, trimmed: int) -> None:
    assert trim_count(count, fraction) == trimmed


def test_trimmed_mean_drops_each_end_per_coordinate_and_ignores_claims() -> None:
    deltas = owners(("a", 1, [1.0, 50.0]), ("b", 1, [2.0, -9.0]), ("c", 1, [3.0, 1.0]), ("d", 1, [4.0, 2.0]),
                    ("e", 10**9, [100.0, 3.0]))
    result = aggregate(ZERO, deltas, AggregatorConfig("trimmed-mean"))["w"]  # k = 1 of 5 from each end
    assert torch.allclose(result, torch.tensor([3.0, 2.0]))
    two = owners(("a", 1, [1.0, 0.0]), ("b", 3, [3.0, 0.0]))  # fewer than 3 owners: nothing trimmed, unweighted
    assert torch.equal(aggregate(ZERO, two, AggregatorConfig("trimmed-mean"))["w"], torch.tensor([2.0, 0.0]))
    wide = AggregatorConfig("trimmed-mean", trim_fraction=0.4)  # k = 2 of 5: the median
    assert torch.equal(aggregate(ZERO, deltas, wide)["w"], torch.tensor([3.0, 2.0]))


def test_median_odd_and_even() -> None:
    odd = owners(("a", 1, [1.0, 7.0]), ("b", 5, [5.0, -1.0]), ("c", 1, [2.0, 0.0]))
    assert torch.equal(aggregate(ZERO, odd, AggregatorConfig("median"))["w"], torch.tensor([2.0, 0.0]))
    even = [*odd, WeightedDelta("d", 1, one([100.0, 1.0]))]
    assert torch.equal(aggregate(ZERO, even, AggregatorConfig("median"))["w"], torch.tensor([3.5, 0.5]))


def test_clipping_scales_a_delta_down_to_the_bound_and_keeps_its_direction() -> None:
    big = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0], dtype=torch.float16)}  # norm 5
    clipped = clip_delta(big, 1.0)
    assert delta_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert all(t.dtype == torch.float32 for t in clipped.values())
    assert torch.equal(clip_delta(big, 10.0)["w"], big["w"]) and torch.equal(clip_delta(big, None)["w"], big["w"])
    with pytest.raises(AggregationError, match="NaN or infinite"):
        clip_delta({"w": torch.tensor([math.inf])}, 1.0)
    # A huge delta with a huge claim moves FedAvg by at most its weight times the bound.
    deltas = owners(("honest", 1, [0.0, 0.0]), ("greedy", 3, [-3000.0, 4000.0]))
    moved = aggregate(ZERO, deltas, AggregatorConfig("fedavg", clip_norm=2.0))["w"]
    assert torch.allclose(moved, torch.tensor([-0.9, 1.2]))  # 3/4 * 2 * (-0.6, 0.8)


@pytest.mark.parametrize("name", ["fedavg", "trimmed-mean", "median"])
def test_order_does_not_matter_and_sums_run_in_fp32(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    deltas = [WeightedDelta(f"o{i}", i + 1, {"w": torch.randn(64, generator=generator)}) for i in range(5)]
    config = AggregatorConfig(name, clip_norm=3.0)
    first = aggregate({"w": torch.zeros(64)}, deltas, config)["w"]
    assert torch.equal(first, aggregate({"w": torch.zeros(64)}, deltas[::-1], config)["w"])
    half = {"w": torch.zeros(2, dtype=torch.float16)}  # 60000 + 60000 overflows fp16; their mean does not
    big = [WeightedDelta(o, 1, {"w": torch.full((2,), 60000.0, dtype=torch.float16)}) for o in ("a", "b")]
    result = aggregate(half, big, AggregatorConfig(name))["w"]
    assert result.dtype == torch.float16 and torch.equal(result, torch.full((2,), 60000.0, dtype=torch.float16))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": "krum"}, "aggregator"),
    ({"clip_norm": math.inf}, "clip_norm"),
    ({"clip_norm": math.nan}, "clip_norm"),
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"trim_fraction": 0.5}, "trim_fraction"),
    ({"trim_fraction": 0.0}, "trim_fraction"),
    ({"trim_fraction": math.nan}, "trim_fraction"),
])
def test_aggregator_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(AggregatorConfigError, match=f"^{field} ") as error:
        AggregatorConfig(**kwargs)  # type: ignore[arg-type]
    assert error.value.field == field
    assert isinstance(error.value, AggregationError) and isinstance(error.value, EmulatorError)


def test_deltas_that_cannot_be_aggregated() -> None:
    with pytest.raises(AggregationError, match="no deltas"):
        aggregate(ZERO, [])
    with pytest.raises(AggregationError, match="same owner"):
        aggregate(ZERO, owners(("a", 1, [1.0, 0.0]), ("a", 1, [2.0, 0.0])))
    with pytest.raises(AggregationError, match="does not match"):
        aggregate(ZERO, owners(("a", 1, [1.0, 0.0, 0.0])))
    with pytest.raises(AggregationError, match="positive"):
        aggregate(ZERO, owners(("a", 0, [1.0, 0.0])))


# --- (b) the attack, against the real service -------------------------------------------------------------------

HONEST = {"alice": 300, "bob": 400, "dave": 500}
CAP = 1000  # the attack jobs' max_num_examples
GREEDY = 2**48


def honest_deltas() -> dict[str, Tensors]:
    """Three owners who agree up to small noise (in the spec's dtypes: ``c`` is fp16)."""
    base = good_delta(0.01)
    deltas = {}
    for i, owner in enumerate(HONEST):
        generator = torch.Generator().manual_seed(100 + i)
        deltas[owner] = {name: (t.float() + torch.randn(t.shape, generator=generator) * 0.002).to(t.dtype)
                         for name, t in base.items()}
    return deltas


def weighted_mean(deltas: dict[str, Tensors]) -> Tensors:
    total = sum(HONEST[o] for o in deltas)
    return {name: sum(HONEST[o] * d[name].float() for o, d in deltas.items()) / total  # type: ignore[misc]
            for name in reference()}


def add_owner(wire: Wire, name: str) -> None:
    wire.owners[name] = Ed25519PrivateKey.generate()
    wire.store.add_owner(name, wire.owners[name].public_key(), approved=True)


def attack_job(wire: Wire, bundle: Path, job_id: str, members: list[str], **settings: object) -> None:
    create_job(wire.storage, job_id, bundle, wire.key.public_key(), adapter_spec=SPEC, reference_adapter=reference(),
               chunk_size=CHUNK, **settings)  # type: ignore[arg-type]
    wire.store.open_round(job_id, 1)
    for member in members:
        wire.store.enroll(job_id, member)


def attack_bound(name: str, honest: list[Tensors], weight: float, clip_norm: float) -> float:
    """How far one attacker can move the aggregate away from the honest owners' own aggregate, whatever it sends.

    fedavg: A = (1 - w) m + w c with m the honest weighted mean and c the attacker's clipped delta, so
    A - m = w (c - m) and ||A - m|| <= w (||c|| + ||m||) <= w (clip_norm + ||m||).
    trimmed-mean (k >= 1 trimmed from each end) and median, with one attacker among >= 3 owners: per coordinate
    the result lies between the smallest and largest honest value (an attacker outside that range is trimmed, or
    not in the middle; one inside it is bounded by it), and so does the honest-only result; so they differ by at
    most the honest range, whatever the attacker's claim or values: ||A - H|| <= ||max_i h_i - min_i h_i||.
    """
    if name == "fedavg":
        return weight * (clip_norm + delta_norm(weighted_mean(dict(zip(HONEST, honest, strict=True)))))
    return delta_norm({key: torch.stack([h[key].float() for h in honest]).amax(0)
                       - torch.stack([h[key].float() for h in honest]).amin(0) for key in honest[0]})


@pytest.mark.parametrize("name", ["fedavg", "trimmed-mean", "median"])
def test_a_malicious_owner_cannot_steer_the_round(wire: Wire, bundle_dir: tuple[Path, Ed25519PrivateKey],
                                                  name: str) -> None:
    honest = honest_deltas()
    assert all(delta_norm(d) < wire.store.job("jobA").max_delta_norm for d in honest.values())
    clip_norm = 1.25 * max(delta_norm(d) for d in honest.values())  # honest deltas pass unclipped
    attack = {k: (-5 * v).to(reference()[k].dtype) for k, v in weighted_mean(honest).items()}  # -5x the honest
    assert delta_norm(attack) > 3 * clip_norm  # ... within the intake's norm bound, but clipped
    for owner in ("dave", "mallory"):
        add_owner(wire, owner)
    job = f"robust-{name}"
    attack_job(wire, bundle_dir[0], job, [*HONEST, "mallory"], aggregator=name, clip_norm=clip_norm,
               max_num_examples=CAP)

    assert wire.client_of("mallory").get_job(job).limits.max_num_examples == CAP  # the signed manifest says so
    # A claim of 2**48 examples is refused at intake, naming the cap, before anything is written.
    greedy = wire.seal(attack, owner="mallory", job_id=job, upload_id="mallory-greedy", num_examples=GREEDY)
    with pytest.raises(grpc.RpcError) as refused:
        wire.submit(greedy)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_num_examples" in refused.value.details() and f"at most {CAP} examples" in refused.value.details()
    assert wire.blobs.visible() == [] and list(wire.blobs.tmp.iterdir()) == []
    assert wire.store.round_status(job, 1)[2] == 0

    # Within the cap (the most it may claim), the attacker's delta is accepted and aggregated with the others.
    for owner, examples in HONEST.items():
        wire.submit(wire.seal(honest[owner], owner=owner, job_id=job, upload_id=f"{owner}-1", num_examples=examples))
    wire.submit(wire.seal(attack, owner="mallory", job_id=job, upload_id="mallory-1", num_examples=CAP))
    wire.store.close_round(job, 1)
    zero = {t.name: torch.zeros(t.shape) for t in SPEC.tensors}  # fp32: the aggregate is the move itself
    attacked, count = aggregate_round(wire.storage, job, 1, zero)
    assert count == 4
    config = AggregatorConfig(name, clip_norm=clip_norm)
    honest_only = aggregate(zero, [WeightedDelta(o, n, honest[o]) for o, n in HONEST.items()], config)
    shift = delta_norm({k: attacked[k] - honest_only[k] for k in zero})
    assert trim_count(len(HONEST) + 1, config.trim_fraction) >= 1  # the premise of the trimmed-mean bound
    weight = CAP / (sum(HONEST.values()) + CAP)
    bound = attack_bound(name, [clip_delta(honest[o], clip_norm) for o in HONEST], weight, clip_norm)
    assert shift <= bound * (1 + 1e-5) + 1e-6, (name, shift, bound)
    if name == "fedavg":
        assert shift >= 0.99 * bound  # the bound is tight: -5x the honest mean is the worst direction
    else:
        assert bound < 0.5 * delta_norm(honest_only)  # the attacker cannot even cancel the honest update

    # Revoked after its upload: the owner's stored delta is not aggregated.
    wire.store.set_owner_status("mallory", "revoked")
    again, count = aggregate_round(wire.storage, job, 1, zero)
    assert count == 3
    assert all(torch.equal(again[k], honest_only[k]) for k in zero)
    # Re-approved but removed from the job: still not aggregated.
    wire.store.set_owner_status("mallory", "approved")
    wire.store.unenroll(job, "mallory")
    again, count = aggregate_round(wire.storage, job, 1, zero)
    assert count == 3 and all(torch.equal(again[k], honest_only[k]) for k in zero)


def test_job_defaults(wire: Wire) -> None:
    job = wire.store.job("jobA")
    assert (job.aggregator, job.max_num_examples) == ("fedavg", DEFAULT_MAX_NUM_EXAMPLES)
    assert job.clip_norm == pytest.approx(job.max_delta_norm)


# --- (c) job settings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "value"), [
    ("clip_norm", math.inf), ("clip_norm", math.nan), ("clip_norm", 0.0),
    ("max_delta_norm_ratio", math.inf), ("max_delta_norm_ratio", math.nan), ("max_delta_norm_ratio", 0.0),
    ("max_delta_norm_ratio", -1.0), ("max_num_examples", 0), ("max_num_examples", 2**48 + 1),
    ("aggregator", "krum"),
])
def test_job_settings_that_disable_a_bound_are_refused(tmp_path: Path, setting: str, value: object) -> None:
    storage = Storage.open(tmp_path / "state")
    try:
        with pytest.raises(InvalidSettingError, match=f"^{setting} ") as error:
            create_job(storage, "j", tmp_path, Ed25519PrivateKey.generate().public_key(),
                       **{setting: value})  # type: ignore[arg-type]
        assert error.value.field == setting
        assert storage.store.jobs() == []
    finally:
        storage.close()


@pytest.mark.parametrize(("flag", "value"), [("--clip-norm", "inf"), ("--clip-norm", "nan"),
                                             ("--max-delta-norm-ratio", "inf"), ("--max-num-examples", "0"),
                                             ("--aggregator", "krum")])
def test_cli_job_create_refuses_them_as_bad_input(tmp_path: Path, offsite_home: Path, flag: str, value: str) -> None:
    result = CliRunner().invoke(coordinator_app, ["job", "create", "--bundle", str(tmp_path), "--job", "j",
                                                  flag, value, "--state", str(tmp_path / "state")])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert flag in " ".join(result.output.split())
    assert not offsite_home.exists() and not (tmp_path / "state").exists()  # checked before any key or state


# --- replies never crash a round or leave it OPEN ----------------------------------------------------------------

class InProcessRounds:
    """The coordinator service's side of the admin calls, without gRPC (``AdminClient`` answers the same)."""

    def __init__(self, keeper: RoundKeeper) -> None:
        self.keeper = keeper

    def open_round(self, job_id: str, round_number: int, config: RoundConfig) -> RoundOpened:
        opened = self.keeper.open_round(job_id, round_number, config)
        return RoundOpened(opened.state, opened.done, opened.message, opened.signature, opened.adapter)

    def aggregate_round(self, job_id: str, round_number: int, min_deltas: int,
                        report: RoundRecord | None = None) -> RoundAggregated:
        result = self.keeper.aggregate_round(job_id, round_number, min_deltas, report)
        return RoundAggregated(result.record, result.adapter)


class ReplyGrid:
    """A Grid that answers each train message with the next canned reply."""

    def __init__(self, *contents: RecordDict | Error | None) -> None:
        self.contents = contents

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.contents) + 1))

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        if any(c is None for c in self.contents):
            raise RuntimeError("the SuperLink went away")
        return [Message(c, reply_to=m) for c, m in zip(self.contents, messages, strict=True)]  # type: ignore[arg-type]


def test_malformed_replies_become_errors_and_the_round_is_closed(wire: Wire, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for attribute, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as inside a ServerApp
        monkeypatch.setattr(TaskIdentity, attribute, value)
    for owner, examples in (("alice", 5), ("bob", 6)):
        wire.submit(wire.seal(good_delta(), owner=owner, upload_id=f"{owner}-1", num_examples=examples))
    wire.store.set_owner_status("bob", "revoked")  # one approved delta left: fewer than min_replies
    checkpoints = tmp_path / "checkpoints" / "jobA"
    checkpoints.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference().items()}, str(checkpoint_path(checkpoints, 0)))
    rounds = InProcessRounds(RoundKeeper(wire.storage, wire.key, tmp_path / "checkpoints"))
    good = RecordDict({"receipt": ConfigRecord({"upload-id": "x"}), "metrics": MetricRecord({"loss": 0.5})})
    grid = ReplyGrid(
        good,
        Error(code=1, reason="owner crashed"),
        RecordDict({"receipt": ConfigRecord({"upload-id": "y"})}),  # no metrics
        RecordDict({"metrics": MetricRecord({"loss": 0.1}), "extra": ArrayRecord({"x": torch.zeros(2)})}),
        RecordDict({"metrics": ArrayRecord({"x": torch.zeros(2)})}),  # a record of the wrong kind
        RecordDict({"metrics": MetricRecord({"loss": [0.1, 0.2]})}),  # not a number
    )
    settings = FederationSettings(job_id="jobA", coordinator="unused:1", admin_key=tmp_path / "unused",
                                  num_rounds=1, min_replies=2, round_timeout=1.0, node_wait=0.0)
    progress = _run_rounds(grid, settings, rounds, None)  # type: ignore[arg-type]
    record = progress.rounds[0]
    assert (record.state, record.replies, record.owner_metrics) == ("ABORTED", 1, [{"loss": 0.5}])
    assert record.errors is not None and len(record.errors) == 5 and record.errors[0] == "owner crashed"
    assert "1 accepted deltas" in (record.reason or "")  # bob's revoked delta does not count
    assert wire.store.round_state("jobA", 1) == "ABORTED"
    assert Progress.load(checkpoints).completed_round == 1

    failing = FederationSettings(job_id="jobA", coordinator="unused:1", admin_key=tmp_path / "unused",
                                 num_rounds=2, min_replies=1, round_timeout=1.0, node_wait=0.0)
    record = _run_rounds(ReplyGrid(good, None), failing, rounds, None).rounds[-1]  # type: ignore[arg-type]
    assert record.round == 2 and record.state == "ABORTED"  # round 2 was opened, sent, closed and aborted
    assert record.errors is not None and "went away" in record.errors[0]
    assert wire.store.round_state("jobA", 2) == "ABORTED"
