"""``offsite-coordinator market``: list adapters, manage buyers and keys, meter usage, pay data owners, audit."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.cli.common import StateOption, console, fail, fail_with, state_dir
from coordinator.errors import CoordinatorError, NotFoundError
from coordinator.market import audit
from coordinator.market import buyers as accounts
from coordinator.market import listings as cards
from coordinator.market import payouts as money
from coordinator.market.store import MarketStore, from_micro, os_actor, to_micro, to_ppm
from coordinator.paths import PUBLIC_KEY_FILE, default_coordinator_dir
from protos.errors import ExitCode, ProtocolError

market_app = typer.Typer(help="The adapter marketplace: listings, buyers, usage, payouts, audit.",
                         no_args_is_help=True)
buyer_app = typer.Typer(help="Buyers and their API keys.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
market_app.add_typer(buyer_app, name="buyer")
market_app.add_typer(audit_app, name="audit")

FLAGS = {"listing_id": "--id", "price": "--price-per-1k-tokens", "owner_share": "--owner-share", "name": "NAME"}
ActorOption = Annotated[str | None, typer.Option(help="Who does this, for the audit log (default: the OS user).")]
BuyerArgument = Annotated[str, typer.Argument(help="Buyer name.")]
MonthOption = Annotated[str, typer.Option(help="The month, YYYY-MM (UTC).")]


@contextmanager
def opened(state: Path | None) -> Iterator[MarketStore]:
    """The marketplace's store in the state directory (``--state``); a domain error fails the command."""
    store = MarketStore(state_dir(state))
    try:
        yield store
    except (CoordinatorError, ProtocolError, ValueError, FileNotFoundError) as error:
        fail_with(error, FLAGS)
    finally:
        store.close()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:64]


@market_app.command("list")
def list_command(
    name: Annotated[str, typer.Option(help="The listing's name.")],
    price_per_1k_tokens: Annotated[str, typer.Option(help="Price per 1,000 tokens (in and out), e.g. 0.02.")],
    run: Annotated[Path | None, typer.Option(help="A finished simulate/demo run directory: exported now.")] = None,
    export: Annotated[Path | None, typer.Option(help="Or an export made earlier (offsite-coordinator export).")] = None,
    report: Annotated[Path | None, typer.Option(help="With --export: the run's report.json.")] = None,
    job: Annotated[str | None, typer.Option(help="With --export: the job it must be of (contributions are read "
                                                 "from --state).")] = None,
    coordinator_key: Annotated[Path | None, typer.Option(help="With --export: the pinned coordinator.pub.")] = None,
    listing_id: Annotated[str | None, typer.Option("--id", help="Listing id, the model name buyers send "
                                                                "(default: from --name).")] = None,
    description: Annotated[str, typer.Option(help="What it does, for the card.")] = "",
    license_name: Annotated[str, typer.Option("--license", help="Licence of the answers.")] = "proprietary",
    owner_share: Annotated[str, typer.Option(help="Fraction of revenue paid to contributing owners.")] = "0.7",
    allow: Annotated[list[str] | None, typer.Option(help="Only these buyers (repeat); default: public.")] = None,
    min_privacy_gap: Annotated[float | None, typer.Option(help="Gate: minimum privacy gap (default: the run's "
                                                               "simulate.json, else 0.0).")] = None,
    min_plugin_score: Annotated[float | None, typer.Option(help="Gate: minimum plug-in score, accuracy-like "
                                                                "metrics (default: simulate.json, else 0.5).")] = None,
    max_plugin_perplexity: Annotated[float | None, typer.Option(help="Gate: maximum plug-in perplexity.")] = None,
    override_gate: Annotated[str | None, typer.Option(help="List despite a failed gate; the reason is "
                                                           "audited.")] = None,
    actor: ActorOption = None,
    state: StateOption = None,
) -> None:
    """Publish a tuned adapter with its card; buyers query it as model LISTING_ID."""
    if (run is None) == (export is None):
        fail("give exactly one of --run or --export")
    if export is not None and report is None:
        fail("--export needs --report (the run's report.json)")
    with opened(state) as store:
        terms = cards.Terms(listing_id=listing_id or slug(name), name=name, description=description,
                            license=license_name, price_micro_per_1k=to_micro(price_per_1k_tokens),
                            owner_share_ppm=to_ppm(owner_share), public=not allow, allow=tuple(allow or ()))
        try:
            store.listing(terms.listing_id)
            fail(f"listing {terms.listing_id!r} already exists", ExitCode.FAILED)
        except NotFoundError:
            pass
        directory = cards.listing_dir(store, terms.listing_id)
        try:
            if run is not None:
                source = cards.source_from_run(run, directory / "export")
            else:
                assert export is not None and report is not None
                pub = coordinator_key or default_coordinator_dir() / PUBLIC_KEY_FILE
                source = cards.source_from_export(export, report, pub, store.dir, job)
            thresholds = cards.run_thresholds(run, min_privacy_gap, min_plugin_score, max_plugin_perplexity)
            card = cards.publish(store, source, terms, thresholds, actor=actor or os_actor(),
                                 override_reason=override_gate, now=time.time())
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    gate = "passed" if card.release_gate.passed else f"OVERRIDDEN ({card.release_gate.override_reason})"
    console.print(f"listed {card.listing_id}: {card.task}, {card.method}, {card.rounds} rounds, "
                  f"{card.contributors} contributing owners, {card.evaluation.metric} "
                  f"{card.evaluation.plugin_score:.4f}, privacy gap {card.evaluation.privacy_gap:+.4f}; "
                  f"release gate {gate}; {card.price_per_1k_tokens} per 1k tokens", highlight=False)


@market_app.command("unlist")
def unlist(listing: Annotated[str, typer.Argument(help="Listing id.")], actor: ActorOption = None,
           state: StateOption = None) -> None:
    """Withdraw a listing: refused from its next request on (requests already running finish and are metered)."""
    with opened(state) as store:
        store.withdraw(listing, actor or os_actor())
    console.print(f"listing {listing} withdrawn")


@market_app.command("listings")
def listings(show_all: Annotated[bool, typer.Option("--all", help="Include withdrawn listings.")] = False,
             state: StateOption = None) -> None:
    """List the listings with price, access and status."""
    table = Table(title="listings")
    for column in ("id", "name", "status", "access", "price / 1k tokens", "owner share", "owners"):
        table.add_column(column)
    with opened(state) as store:
        for item in store.listings(include_withdrawn=show_all):
            access = "public" if item.public else "allow: " + ", ".join(store.allowed(item.listing_id))
            table.add_row(item.listing_id, item.name, item.status, access, from_micro(item.price_micro_per_1k),
                          from_micro(item.owner_share_ppm), str(len(store.listing_owners(item.listing_id))))
    console.print(table)


@buyer_app.command("add")
def buyer_add(
    name: BuyerArgument,
    tokens_per_day: Annotated[int, typer.Option(help="Daily token quota (in + out).")] = accounts.Limits.tokens_per_day,
    requests_per_day: Annotated[int, typer.Option(help="Daily request quota.")] = accounts.Limits.requests_per_day,
    rate_per_minute: Annotated[int, typer.Option(help="Per-key rate limit.")] = accounts.Limits.rate_per_minute,
    burst: Annotated[int, typer.Option(help="Per-key burst.")] = accounts.Limits.burst,
    query_budget: Annotated[int, typer.Option(help="Queries over a key's lifetime (bounds model "
                                                   "extraction).")] = accounts.Limits.query_budget,
    listing: Annotated[list[str] | None, typer.Option("--listings", help="Allow-listed listings (repeat).")] = None,
    actor: ActorOption = None,
    state: StateOption = None,
) -> None:
    """Create a buyer and print its API key, once: it is stored only hashed."""
    with opened(state) as store:
        limits = accounts.Limits(tokens_per_day, requests_per_day, rate_per_minute, burst, query_budget)
        key = accounts.add_buyer(store, name, limits, list(listing or []), actor or os_actor())
    console.print(f"buyer {name} created; its API key, shown only now:", highlight=False)
    typer.echo(key)


@buyer_app.command("revoke")
def buyer_revoke(name: BuyerArgument, actor: ActorOption = None, state: StateOption = None) -> None:
    """Revoke a buyer: its keys are refused from the next request on."""
    with opened(state) as store:
        accounts.revoke_buyer(store, name, actor or os_actor())
    console.print(f"buyer {name} revoked")


@buyer_app.command("rotate-key")
def buyer_rotate(name: BuyerArgument, actor: ActorOption = None, state: StateOption = None) -> None:
    """Give a buyer a new API key (printed once); the old key is refused from now on."""
    with opened(state) as store:
        key = accounts.rotate_key(store, name, actor or os_actor())
    console.print(f"buyer {name}: new API key, shown only now (the old one no longer works):", highlight=False)
    typer.echo(key)


@buyer_app.command("list")
def buyer_list(state: StateOption = None) -> None:
    """Buyers with status and limits."""
    table = Table(title="buyers")
    for column in ("buyer", "status", "tokens/day", "requests/day", "rate/min", "query budget"):
        table.add_column(column)
    with opened(state) as store:
        for item in accounts.buyers(store):
            limits = item.limits
            table.add_row(item.buyer_id, item.status, str(limits.tokens_per_day), str(limits.requests_per_day),
                          str(limits.rate_per_minute), str(limits.query_budget))
    console.print(table)


@market_app.command("usage")
def usage(
    buyer: Annotated[str | None, typer.Option(help="Only this buyer.")] = None,
    since: Annotated[str, typer.Option(help="From this date (YYYY-MM-DD, UTC) on.")] = "",
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    state: StateOption = None,
) -> None:
    """Usage rows, one per answered request: buyer, listing, tokens in and out, latency, status, price."""
    if fmt not in ("csv", "json"):
        fail(f"--format must be csv or json, got {fmt!r}")
    if since and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
        fail(f"--since must be YYYY-MM-DD, got {since!r}")
    with opened(state) as store:
        rows = money.usage_rows(store, buyer, since)
    typer.echo(money.usage_csv(rows) if fmt == "csv" else json.dumps([r.to_json() for r in rows], indent=2),
               nl=fmt == "json")


@market_app.command("statement")
def statement(buyer: Annotated[str, typer.Option(help="Buyer name.")], month: MonthOption,
              state: StateOption = None) -> None:
    """A buyer's monthly statement (JSON): requests, tokens and amount per listing."""
    with opened(state) as store:
        accounts.buyer(store, buyer)
        typer.echo(json.dumps(money.buyer_statement(store, buyer, month).to_json(), indent=2))


@market_app.command("payouts")
def payouts(month: MonthOption, actor: ActorOption = None, state: StateOption = None) -> None:
    """Split a finished month's revenue among each listing's contributing owners; writes JSON and CSV."""
    with opened(state) as store:
        result, path = money.make_payouts(store, month, actor or os_actor())
    console.print(f"payouts {month}: revenue {from_micro(result.revenue_micro)}, owners "
                  f"{from_micro(result.owners_micro)}, platform {from_micro(result.platform_micro)}; "
                  f"{len(result.lines)} lines in {path} (and .csv)", highlight=False)


@audit_app.command("verify")
def audit_verify(
    head: Annotated[str | None, typer.Option(help="A head kept earlier, COUNT:HASH: also catches entries removed "
                                                  "from the end.")] = None,
    state: StateOption = None,
) -> None:
    """Check the audit log's hash chain; names the first edited, deleted or moved entry."""
    expected = None
    if head is not None:
        count_text, _, digest = head.partition(":")
        if not count_text.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", digest):
            fail(f"--head must be COUNT:SHA256, got {head!r}")
        expected = (int(count_text), digest)
    with opened(state) as store, store.reading() as db:
        count = audit.verify(db, expected)
        _, last = audit.head(db)
    console.print(f"audit log verified: {count} entries; head {count}:{last} (keep it elsewhere: "
                  "--head catches truncation)", highlight=False)
