"""The marketplace's web catalogue: server-rendered pages on the serving HTTP server (Jinja2, no build step).

``GET /catalogue`` lists the listed public listings (``?q=`` searches name, description, task and labels);
``GET /catalogue/{id}`` shows one listing's card, its evaluation report's PNG and a "try it" form whose small
inline script calls ``/v1/completions`` (``/v1/classify`` for classification listings) with the buyer's key;
``GET``/``POST /catalogue/usage`` shows a buyer's usage this month, the key sent in a POST body, never in a URL.
Private (allow-listed) and withdrawn listings are not shown: their pages are 404s like unknown ones. Every value
is escaped (autoescape): names and descriptions are whoever listed them's input; and a Content-Security-Policy
lets only the page's own nonce-tagged script and style run, should anything slip through.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader

from coordinator.errors import NotFoundError
from coordinator.market.buyers import key_owner
from coordinator.market.listings import ListingCard, card_of, listing_dir
from coordinator.market.payouts import buyer_statement, month_bounds, usage_rows
from coordinator.market.store import Listing, MarketStore, from_micro
from protos.documents import DocumentError

MAX_QUERY_CHARS = 200
MAX_FORM_BYTES = 4096
MAX_USAGE_ROWS = 500  # newest first; the month's totals always cover every row
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
TRY_MAX_TOKENS = 24


def templates() -> Environment:
    env = Environment(loader=PackageLoader("coordinator.market", "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["signed"] = lambda value: "—" if value is None else f"{value:+.4f}"
    env.filters["score"] = lambda value: "—" if value is None else f"{value:.4f}"
    env.filters["money"] = from_micro
    env.filters["when"] = lambda stamp: str(stamp).replace("T", " ")[:19]
    return env


def shown(store: MarketStore, listing: str | Listing) -> tuple[Listing, ListingCard] | None:
    """A listing the catalogue shows (listed and public) with its card, else None."""
    try:
        found = store.listing(listing) if isinstance(listing, str) else listing
        if found.status != "listed" or not found.public:
            return None
        return found, card_of(found)
    except (NotFoundError, DocumentError, ValueError):
        return None


def matches(card: ListingCard, query: str) -> bool:
    words = query.lower().split()
    text = " ".join([card.listing_id, card.name, card.description, card.task, *(card.labels or [])]).lower()
    return all(word in text for word in words)


def provenance(card: ListingCard) -> list[tuple[str, str]]:
    """The signed export manifest's identity: who signed it and the digests it binds."""
    manifest = card.provenance
    rows = [("signer (coordinator key id)", "signer"), ("signature (Ed25519)", "signature"), ("job", "job_id"),
            ("export format", "format"), ("adapter sha256", "adapter_sha256"), ("bundle sha256", "bundle_sha256"),
            ("report sha256", "report_sha256"), ("exported", "created")]
    out = [(label, str(manifest[key])) for label, key in rows if manifest.get(key) not in (None, "")]
    files = manifest.get("files") or {}
    out.append(("files signed", f"{len(files)}: " + ", ".join(sorted(files)) if files else "0"))
    return out


def this_month(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def catalogue_router(store: MarketStore) -> APIRouter:
    env = templates()
    router = APIRouter()

    def page(name: str, status: int = 200, headers: dict[str, str] | None = None, **values: Any) -> HTMLResponse:
        """A rendered page whose inline script and style run only with this response's nonce (CSP)."""
        nonce = secrets.token_urlsafe(16)
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self'; "
                  "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
        safety = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", **(headers or {})}
        return HTMLResponse(env.get_template(name).render(nonce=nonce, **values), status_code=status,
                            headers=safety)

    def not_found(listing_id: str) -> HTMLResponse:
        return page("not_found.html", 404, listing_id=listing_id)

    @router.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/catalogue", status_code=303)

    @router.get("/catalogue", response_class=HTMLResponse)
    def index(q: str = "") -> HTMLResponse:
        query = q.strip()[:MAX_QUERY_CHARS]
        found = [pair for item in store.listings() if (pair := shown(store, item)) is not None]
        hits = [(listing, card) for listing, card in found if not query or matches(card, query)]
        return page("index.html", query=query, hits=hits, total=len(found))

    def usage_page(status: int = 200, **values: Any) -> HTMLResponse:
        return page("usage.html", status, NO_STORE, **values)

    @router.get("/catalogue/usage", response_class=HTMLResponse)
    def usage_form() -> HTMLResponse:
        return usage_page()

    @router.post("/catalogue/usage", response_class=HTMLResponse)
    async def usage(request: Request) -> HTMLResponse:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return usage_page(413, error="the form is too large")
        try:
            fields = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=4)
        except ValueError:
            return usage_page(400, error="the form has too many fields")
        key = (fields.get("key") or [""])[0].strip()
        if not key:
            return usage_page(400, error="enter your API key")
        return await run_in_threadpool(usage_of, key)  # SQLite off the event loop

    def usage_of(key: str) -> HTMLResponse:
        found = key_owner(store, key)
        if found is None:
            return usage_page(401, error="invalid or revoked API key")
        buyer, month = found[0], this_month(time.time())
        statement = buyer_statement(store, buyer, month)
        rows = usage_rows(store, buyer, *month_bounds(month))[::-1]
        return usage_page(buyer=buyer, month=month, statement=statement, rows=rows[:MAX_USAGE_ROWS],
                          more=max(0, len(rows) - MAX_USAGE_ROWS))

    @router.get("/catalogue/{listing_id}", response_class=HTMLResponse)
    def listing_page(listing_id: str) -> HTMLResponse:
        if (pair := shown(store, listing_id)) is None:
            return not_found(listing_id)
        listing, card = pair
        classify = card.task == "classification"
        return page("listing.html", listing=listing, card=card, provenance=provenance(card),
                    has_report=report_file(store, card) is not None,
                    endpoint="/v1/classify" if classify else "/v1/completions", classify=classify,
                    max_tokens=TRY_MAX_TOKENS)

    @router.get("/catalogue/{listing_id}/report.png")
    def report_png(listing_id: str) -> Response:
        pair = shown(store, listing_id)
        path = report_file(store, pair[1]) if pair is not None else None
        if path is None:
            return not_found(listing_id)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "max-age=300"})

    return router


def report_file(store: MarketStore, card: ListingCard) -> Path | None:
    """The report PNG ``publish`` copied beside the listing's card (a bare file name, never a path out of it)."""
    name = card.evaluation.report_png
    if not name:
        return None
    path = listing_dir(store, card.listing_id) / Path(name).name
    return path if path.is_file() else None
