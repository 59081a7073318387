"""Listing a real run (export, verify, release gate, card, contributions) and the market CLI end to end."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from coordinator.cli.market import market_app
from coordinator.market import audit
from coordinator.market.contributions import contributions
from coordinator.market.gate import MarketGate, settle_query
from coordinator.market.listings import Terms, card_of, publish, run_thresholds, source_from_export, source_from_run
from coordinator.market.store import MarketError, MarketStore
from coordinator.records import UploadRecord
from coordinator.serving.gate import QueryRequest, Settlement
from coordinator.simulate.config import SimulateConfig
from coordinator.state import StateStore
from protos.errors import ProtocolError
from tests.runs import tiny_run

JOB = "job-layer-drop"
JAN_2025 = 1_736_000_000.0  # usage in a month long over, so payouts may run
APP = typer.Typer()  # as coordinator/cli/__init__.py registers it: offsite-coordinator market ...
APP.add_typer(market_app, name="market")


def record_uploads(run_dir: Path) -> dict[str, int]:
    """The rounds as the coordinator records them: 1 and 2 aggregated, 3 aborted (its upload must not count)."""
    store = StateStore(run_dir / "state")
    owners = sorted(o.owner_id for o in store.owners())
    counts = {1: [20, 28], 2: [24, 24], 3: [0, 1000]}
    for round_number, examples in counts.items():
        store.open_round(JOB, round_number)
        store.close_round(JOB, round_number)
        with store.transaction() as db:
            for owner, n in zip(owners, examples, strict=True):
                if n:
                    store.insert_upload(db, UploadRecord(f"u{round_number}-{owner}", JOB, round_number, owner,
                                                         "0" * 64, "0" * 64, n, "t", b"{}", b"", "0" * 64))
        if round_number == 3:
            store.abort_round(JOB, round_number, "too few deltas")
        else:
            store.mark_aggregated(JOB, round_number)
    store.close()
    return {owners[0]: 44, owners[1]: 52}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    run_dir = tiny_run(tmp_path_factory.mktemp("market-run"), method="lora")
    return run_dir, record_uploads(run_dir)


def market(*args: str) -> Result:
    return CliRunner().invoke(APP, ["market", *args])


def install_copy(state: Path) -> object:
    def install(export_dir: Path, adapter_id: str) -> None:
        shutil.copytree(export_dir, state / "adapters" / adapter_id)

    return install


def test_contributions_count_aggregated_rounds_only(run: tuple[Path, dict[str, int]]) -> None:
    run_dir, expected = run
    assert contributions(run_dir / "state", JOB, 2) == expected
    assert contributions(run_dir / "state", JOB, 3) == expected  # round 3 was aborted


def test_source_from_an_earlier_export(run: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    from coordinator.export.api import export_run

    run_dir, expected = run
    export_run(run_dir, "adapter", tmp_path / "export")
    pinned = run_dir / "keys" / "coordinator.pub"
    source = source_from_export(tmp_path / "export", run_dir / "report.json", pinned, run_dir / "state", JOB)
    assert source.contributions == expected and source.manifest["job_id"] == JOB
    with pytest.raises(MarketError, match="not 'job-other'"):
        source_from_export(tmp_path / "export", run_dir / "report.json", pinned, run_dir / "state", "job-other")
    (tmp_path / "export" / "adapter_config.json").write_text("{}")
    with pytest.raises(ProtocolError, match="adapter_config.json"):  # tampered: refused before anything is listed
        source_from_export(tmp_path / "export", run_dir / "report.json", pinned, run_dir / "state", JOB)


def test_release_gate_refuses_and_leaves_nothing(run: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    run_dir, _ = run
    state = tmp_path / "state"
    result = market("list", "--run", str(run_dir), "--name", "Sentiment", "--price-per-1k-tokens", "0.02",
                    "--state", str(state))
    assert result.exit_code == 1 and "release gate" in result.output and "plug-in accuracy" in result.output
    store = MarketStore(state)
    assert store.listings(include_withdrawn=True) == [] and store.query("SELECT COUNT(*) FROM audit_log")[0][0] == 0
    store.close()
    assert not (state / "market" / "listings" / "sentiment").exists()
    bad_price = market("list", "--run", str(run_dir), "--name", "S", "--price-per-1k-tokens", "-1", "--state",
                       str(state))
    assert bad_price.exit_code == 2 and "--price-per-1k-tokens" in bad_price.output


def test_publish_then_sell_meter_and_pay(run: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    run_dir, expected = run
    state = tmp_path / "state"
    store = MarketStore(state)
    source = source_from_run(run_dir, state / "market" / "listings" / "sentiment" / "export")
    assert source.contributions == expected and source.manifest["signature"]
    terms = Terms(listing_id="sentiment", name="Sentiment", price_micro_per_1k=20_000, owner_share_ppm=700_000,
                  license="CC-BY-4.0")
    card = publish(store, source, terms, run_thresholds(run_dir, None, None, None), actor="ops",
                   override_reason="pilot customer", install=install_copy(state), now=JAN_2025)  # type: ignore[arg-type]
    assert card.contributors == 2 and card.rounds == 2 and card.method == "lora" and card.task == "classification"
    assert card.release_gate.failures and card.release_gate.override_by == "ops"
    assert card.evaluation.report_png == "report.png" and card.provenance["job_id"] == JOB
    assert (state / "market" / "listings" / "sentiment" / "report.png").stat().st_size > 0
    assert (state / "adapters" / "sentiment" / "adapter_model.safetensors").is_file()
    assert card_of(store.listing("sentiment")) == card
    with store.reading() as db:
        actions = [(e.action, e.actor) for e in audit.entries(db)]
    assert actions == [("listing.add", "ops"), ("gate.override", "ops")]

    added = market("buyer", "add", "acme", "--tokens-per-day", "5000", "--state", str(state))
    assert added.exit_code == 0, added.output
    key = added.output.strip().splitlines()[-1]
    assert key.startswith("osk_")
    gate = MarketGate(store, clock=lambda: JAN_2025)
    for n in range(3):
        admission = gate.admit(QueryRequest(f"Bearer {key}", "sentiment", "classify", 100 + n, 0))
        gate.settle(admission, Settlement(100 + n, 0, 0.05, "ok"))
    pending = gate.admit(QueryRequest(f"Bearer {key}", "sentiment", "classify", 50, 0))
    settle_query(store, int(pending.ticket), 50, 0, 0.05, "ok", JAN_2025)

    usage = market("usage", "--buyer", "acme", "--since", "2025-01-01", "--format", "csv", "--state", str(state))
    rows = list(csv.DictReader(io.StringIO(usage.output)))
    assert len(rows) == 4 and sum(int(r["price_micro"]) for r in rows) == 353 * 20  # 0.02 per 1k tokens
    as_json = json.loads(market("usage", "--format", "json", "--state", str(state)).output)
    assert [r["usage_id"] for r in as_json] == [int(r["usage_id"]) for r in rows]
    bill = json.loads(market("statement", "--buyer", "acme", "--month", "2025-01", "--state", str(state)).output)
    assert bill["total_micro"] == 7060 and bill["lines"][0]["requests"] == 4

    paid = market("payouts", "--month", "2025-01", "--state", str(state))
    assert paid.exit_code == 0, paid.output
    statement = json.loads((state / "market" / "payouts" / "2025-01.json").read_text())
    assert statement["owners_micro"] == 7060 * 7 // 10 == sum(x["amount_micro"] for x in statement["lines"])
    assert {x["owner_id"]: x["num_examples"] for x in statement["lines"]} == expected

    assert market("buyer", "revoke", "acme", "--state", str(state)).exit_code == 0
    unlisted = market("unlist", "sentiment", "--state", str(state))
    assert unlisted.exit_code == 0 and store.listing("sentiment").status == "withdrawn"
    assert "sentiment" not in market("listings", "--state", str(state)).output
    verified = market("audit", "verify", "--state", str(state))
    assert verified.exit_code == 0 and "6 entries" in verified.output, verified.output
    store.close()


def test_cli_list_installs_for_serving(run: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    pytest.importorskip("coordinator.serving.adapters", reason="the serving engine's adapter store lands with #11")
    run_dir, _ = run
    state = tmp_path / "state"
    result = market("list", "--run", str(run_dir), "--name", "Sentiment v1", "--price-per-1k-tokens", "0.02",
                    "--override-gate", "demo", "--actor", "ops", "--allow", "nobody-yet", "--state", str(state))
    assert result.exit_code == 1 and "buyer 'nobody-yet' does not exist" in result.output
    result = market("list", "--run", str(run_dir), "--name", "Sentiment v1", "--price-per-1k-tokens", "0.02",
                    "--override-gate", "demo", "--actor", "ops", "--state", str(state))
    assert result.exit_code == 0, result.output
    assert "listed sentiment-v1" in result.output and "OVERRIDDEN (demo)" in result.output
    assert (state / "adapters" / "sentiment-v1").is_dir()


def test_the_gate_takes_the_jobs_own_minimums(run: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    """The same run passes once its job says a lower bar is enough (``simulate --min-plugin-score ...``)."""
    run_dir, _ = run
    saved = SimulateConfig.load(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    lenient = dataclasses.replace(saved, min_plugin_score=report["plugin_tuned"] - 0.01,
                                  min_privacy_gap=min(report["privacy_gap"], 0.0) - 0.01)
    try:
        lenient.save()
        thresholds = run_thresholds(run_dir, None, None, None)
        assert thresholds.min_plugin_score == lenient.min_plugin_score
        result = market("list", "--run", str(run_dir), "--name", "Lenient", "--price-per-1k-tokens", "0.02",
                        "--state", str(tmp_path / "state"))
        assert result.exit_code == 0 and "OVERRIDDEN" not in result.output, result.output
    finally:
        saved.save()
