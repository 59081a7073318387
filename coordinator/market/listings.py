"""Listing a tuned adapter: its card, the release gate, and publishing (export, verify, install, record).

The card says what a buyer gets: name, description, task and labels, the base model's id and weights digest, the
method, rounds, how many data owners contributed (not who), the evaluation (plug-in score, privacy gap, attacker
gap when the run had one) with the report's PNG, licence, price, and the coordinator-signed export manifest as
provenance (its ``report_sha256`` binds the evaluation to the adapter).

The release gate: the plug-in score and the privacy gap must meet minimums. Defaults, in order: the flag, the run's
``simulate.json`` (``min_privacy_gap``, ``min_plugin_score`` if it has them), else ``min_privacy_gap = 0.0`` (the
plug-in must beat the emulator the owners had, or the owners already hold what is being sold) and
``min_plugin_score = 0.5`` (for accuracy-like metrics). Gaps are oriented so that positive is good whatever the
metric (a perplexity gap is negated); with an attacker row the smaller of the two gaps must pass (the honest
figure). For perplexity the plug-in score is checked only against ``max_plugin_perplexity``, when given. A failed
gate refuses the listing unless an override reason is given; the override, who made it and why, goes into the
audit log with the listing, in one transaction.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coordinator.errors import NotFoundError
from coordinator.market.contributions import contributions
from coordinator.market.store import Listing, MarketError, MarketStore, from_micro, stamp
from protos.crypto import load_public_key, sha256_file
from protos.documents import Document

LISTINGS_DIR = Path("market") / "listings"  # under the state directory: one LISTING_ID directory each
DEFAULT_MIN_PRIVACY_GAP, DEFAULT_MIN_PLUGIN_SCORE = 0.0, 0.5


class ReleaseGateError(MarketError):
    """The evaluation does not meet the release gate (and no override was given)."""


@dataclass(frozen=True, kw_only=True)
class Evaluation(Document):
    metric: str
    higher_is_better: bool
    plugin_score: float  # plugin_tuned
    privacy_gap: float  # plugin_tuned - emulator_tuned
    attacker_gap: float | None = None  # plugin_tuned - attacker_tuned
    utility_gain: float | None = None  # plugin_tuned - full_initial
    report_png: str | None = None  # beside card.json in the listing's directory


@dataclass(frozen=True, kw_only=True)
class Thresholds(Document):
    min_privacy_gap: float = DEFAULT_MIN_PRIVACY_GAP
    min_plugin_score: float | None = DEFAULT_MIN_PLUGIN_SCORE  # higher-is-better metrics
    max_plugin_perplexity: float | None = None  # lower-is-better metrics


@dataclass(frozen=True, kw_only=True)
class GateDecision(Document):
    thresholds: Thresholds
    failures: list[str]
    override_reason: str | None = None
    override_by: str | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True, kw_only=True)
class ListingCard(Document):
    listing_id: str
    name: str
    description: str
    task: str
    labels: list[str] | None = None
    base_model_id: str
    base_model_sha256: str
    method: str
    rounds: int
    contributors: int  # how many data owners, never who
    evaluation: Evaluation
    license: str
    price_per_1k_tokens: str  # decimal, from price_micro_per_1k
    owner_share: str  # decimal fraction of revenue paid to the contributing owners
    release_gate: GateDecision
    provenance: dict[str, Any]  # the signed export manifest, as written
    created: str


@dataclass(frozen=True, kw_only=True)
class Terms:
    """What the operator decides when listing."""

    listing_id: str
    name: str
    price_micro_per_1k: int
    owner_share_ppm: int
    description: str = ""
    license: str = "proprietary"
    public: bool = True
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class Source:
    """A verified export, its run's report, and who contributed: what a listing is made from."""

    export_dir: Path
    manifest: dict[str, Any]  # ExportManifest JSON (verified)
    report_path: Path
    contributions: dict[str, int]
    coordinator_pub: Path  # the key the export verified against: serving pins it


def evaluation_from_report(report: dict[str, Any], where: str = "report.json") -> Evaluation:
    """The card's evaluation from a plug-in report's JSON; raises naming the missing field."""
    def number(name: str, required: bool = True) -> float | None:
        value = report.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MarketError(f"{where}.{name}: missing or not a number; is it a plug-in report?")
        return float(value)

    metric = report.get("metric")
    if not isinstance(metric, str):
        raise MarketError(f"{where}.metric: missing; is it a plug-in report?")
    plugin, gap = number("plugin_tuned"), number("privacy_gap")
    assert plugin is not None and gap is not None
    return Evaluation(metric=metric, higher_is_better=bool(report.get("higher_is_better", metric != "perplexity")),
                      plugin_score=plugin, privacy_gap=gap, attacker_gap=number("privacy_gap_vs_attacker", False),
                      utility_gain=number("utility_gain", False))


def run_thresholds(run_dir: Path | None, min_privacy_gap: float | None, min_plugin_score: float | None,
                   max_plugin_perplexity: float | None) -> Thresholds:
    """Flags first, then the job's own minimums (``simulate.json``), then the defaults."""
    from coordinator.simulate.config import SimulateConfig

    job = SimulateConfig.load(run_dir) if run_dir is not None and (Path(run_dir) / "simulate.json").is_file() else None
    gap = min_privacy_gap if min_privacy_gap is not None else (job.min_privacy_gap if job else None)
    score = min_plugin_score if min_plugin_score is not None else (job.min_plugin_score if job else None)
    return Thresholds(min_privacy_gap=float(DEFAULT_MIN_PRIVACY_GAP if gap is None else gap),
                      min_plugin_score=float(DEFAULT_MIN_PLUGIN_SCORE if score is None else score),
                      max_plugin_perplexity=max_plugin_perplexity)


def release_gate(evaluation: Evaluation, thresholds: Thresholds) -> list[str]:
    """Pure: what fails the gate (empty: it passes)."""
    sign = 1.0 if evaluation.higher_is_better else -1.0
    gaps = {"privacy_gap": evaluation.privacy_gap * sign}
    if evaluation.attacker_gap is not None:
        gaps["privacy_gap_vs_attacker"] = evaluation.attacker_gap * sign
    failures = [f"{name} {value:+.4f} is below the minimum {thresholds.min_privacy_gap:+.4f}"
                for name, value in gaps.items() if value < thresholds.min_privacy_gap]
    score, metric = evaluation.plugin_score, evaluation.metric
    if evaluation.higher_is_better and thresholds.min_plugin_score is not None and score < thresholds.min_plugin_score:
        failures.append(f"plug-in {metric} {score:.4f} is below the minimum {thresholds.min_plugin_score:.4f}")
    limit = thresholds.max_plugin_perplexity
    if not evaluation.higher_is_better and limit is not None and score > limit:
        failures.append(f"plug-in {metric} {score:.4f} is above the maximum {limit:.4f}")
    return failures


def listing_dir(store: MarketStore, listing_id: str) -> Path:
    return store.dir / LISTINGS_DIR / listing_id


def source_from_run(run_dir: Path, export_dir: Path) -> Source:
    """Export a finished simulate/demo run's adapter (format ``adapter``, signed with the run's coordinator key)
    into ``export_dir``, verify it, and read its report and contributions from the run directory."""
    from coordinator.export.api import export_run
    from coordinator.export.manifest import verify_export

    run_dir = Path(run_dir)
    report = run_dir / "report.json"
    if not report.is_file():
        raise NotFoundError(f"{run_dir}: no report.json; the release gate needs the run's evaluation report")
    export_run(run_dir, "adapter", export_dir, force=True)
    manifest = verify_export(export_dir, load_public_key(run_dir / "keys" / "coordinator.pub"))
    return Source(export_dir, manifest.to_json(), report,
                  contributions(run_dir / "state", manifest.job_id, manifest.rounds),
                  run_dir / "keys" / "coordinator.pub")


def source_from_export(export_dir: Path, report: Path, coordinator_pub: Path, state_dir: Path,
                       job_id: str | None = None) -> Source:
    """An export made earlier (``offsite-coordinator export``), verified against the pinned coordinator key, with
    contributions from the coordinator state that ran its job."""
    from coordinator.export.manifest import verify_export

    manifest = verify_export(export_dir, load_public_key(coordinator_pub))
    if job_id is not None and manifest.job_id != job_id:
        raise MarketError(f"{export_dir}: the export is of job {manifest.job_id!r}, not {job_id!r}")
    return Source(Path(export_dir), manifest.to_json(), Path(report),
                  contributions(state_dir, manifest.job_id, manifest.rounds), Path(coordinator_pub))


def build_card(source: Source, terms: Terms, evaluation: Evaluation, decision: GateDecision,
               created: str) -> ListingCard:
    """Pure: the card from a verified export's manifest and the listing's terms."""
    manifest = source.manifest
    return ListingCard(
        listing_id=terms.listing_id, name=terms.name, description=terms.description, task=manifest["task"],
        labels=manifest.get("labels"), base_model_id=manifest["base_model_id"],
        base_model_sha256=manifest["base_model_sha256"], method=manifest["method"], rounds=manifest["rounds"],
        contributors=sum(1 for count in source.contributions.values() if count > 0), evaluation=evaluation,
        license=terms.license, price_per_1k_tokens=from_micro(terms.price_micro_per_1k),
        owner_share=from_micro(terms.owner_share_ppm), release_gate=decision, provenance=manifest, created=created)


def publish(store: MarketStore, source: Source, terms: Terms, thresholds: Thresholds, *, actor: str,
            override_reason: str | None = None, install: Callable[[Path, str], None] | None = None,
            now: float) -> ListingCard:
    """Check the gate, copy the report PNG, install the export for serving (``install(export_dir, adapter_id)``;
    default: the serving engine's state in the store's directory), then record the listing and its audit entries."""
    try:
        store.listing(terms.listing_id)
        raise MarketError(f"listing {terms.listing_id!r} already exists")
    except NotFoundError:
        pass
    for buyer_id in terms.allow:  # checked again when recorded; here so nothing is installed for a typo
        if not store.query("SELECT 1 FROM buyers WHERE buyer_id = ?", buyer_id):
            raise NotFoundError(f"buyer {buyer_id!r} does not exist")
    report = json.loads(source.report_path.read_text(encoding="utf-8"))
    expected = source.manifest.get("report_sha256")
    if expected is not None and sha256_file(source.report_path) != expected:
        raise MarketError(f"{source.report_path}: sha256 differs from the export manifest's report_sha256")
    evaluation = evaluation_from_report(report, str(source.report_path))
    failures = release_gate(evaluation, thresholds)
    if failures and not override_reason:
        raise ReleaseGateError("release gate: " + "; ".join(failures) + " (override with a reason to list anyway)")
    overridden = bool(failures and override_reason)
    decision = GateDecision(thresholds=thresholds, failures=failures,
                            override_reason=override_reason if overridden else None,
                            override_by=actor if overridden else None)
    directory = listing_dir(store, terms.listing_id)
    png = source.report_path.with_suffix(".png")
    if png.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, directory / "report.png")
        evaluation = replace(evaluation, report_png="report.png")
    card = build_card(source, terms, evaluation, decision, stamp(now))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "card.json").write_text(json.dumps(card.to_json(), indent=2) + "\n")
    if install is None:
        try:
            from coordinator.serving.adapters import ServingState  # type: ignore[import-not-found,unused-ignore]
        except ImportError as error:
            raise MarketError("the serving engine (coordinator.serving.adapters) is not installed") from error
        serving, signer = ServingState(store.dir), load_public_key(source.coordinator_pub)

        def install(export_dir: Path, adapter_id: str) -> None:
            serving.import_export(export_dir, adapter_id, signer)
    install(source.export_dir, terms.listing_id)
    events: list[tuple[str, dict[str, Any]]] = [("listing.add", {
        "listing": terms.listing_id, "job": source.manifest["job_id"], "rounds": source.manifest["rounds"],
        "adapter_sha256": source.manifest["adapter_sha256"], "price_micro_per_1k": terms.price_micro_per_1k,
        "owner_share_ppm": terms.owner_share_ppm, "public": terms.public, "allow": sorted(terms.allow),
        "contributors": card.contributors})]
    if overridden:
        events.append(("gate.override", {"listing": terms.listing_id, "reason": str(override_reason),
                                         "failures": failures}))
    listing = Listing(terms.listing_id, terms.listing_id, terms.name, source.manifest["job_id"], "listed",
                      terms.public, terms.price_micro_per_1k, terms.owner_share_ppm,
                      json.dumps(card.to_json()), card.created)
    store.add_listing(listing, source.contributions, list(terms.allow), actor, events, now)
    return card


def card_of(listing: Listing) -> ListingCard:
    return ListingCard.from_json(json.loads(listing.card), f"listing {listing.listing_id}")
