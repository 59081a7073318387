"""The web catalogue on a live marketplace server: plain HTTP checks, then a real headless Chromium (selenium)
that searches, opens a listing, loads its report, asks through the "try it" form, reads its usage, and sees a
clear error once its buyer is revoked. Screenshots go to the test's tmp dir; the listing page's also to
``docs/images/marketplace-listing.png`` when the browser test passes and OFFSITE_UPDATE_SCREENSHOTS=1."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.market.buyers import revoke_buyer
from tests.market_server import LiveMarket, market_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
README_SHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "marketplace-listing.png"
HOSTILE = '<script>window.pwned = 1</script> & "Co"'


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMarket]:
    with market_server(tmp_path_factory.mktemp("market-web"), buyers=2) as market:
        yield market


def add_copy(live: LiveMarket, listing_id: str, *, public: bool = True, **card: Any) -> None:
    """Another listing with the live one's card (``card`` overrides fields): catalogue-only, not served."""
    base = live.store.listing(live.listing_id)
    data = {**json.loads(base.card), "listing_id": listing_id, **card}
    live.store.add_listing(replace(base, listing_id=listing_id, adapter_id=listing_id, public=public,
                                   name=data["name"], card=json.dumps(data)), {}, [], "tester", [])


def test_pages_escape_and_hide_private_and_withdrawn(live: LiveMarket) -> None:
    if not any(item.listing_id == "hostile" for item in live.store.listings()):
        add_copy(live, "hostile", name=HOSTILE, description='<img src=x onerror="window.pwned=2">')
    add_copy(live, "private-one", public=False, name="Private one")
    add_copy(live, "gone", name="Gone one")
    live.store.withdraw("gone", "tester")
    index = httpx.get(f"{live.base_url}/catalogue").text
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt; &amp; &#34;Co&#34;" in index
    assert "<script>window.pwned" not in index and "<img src=x" not in index
    assert 'href="/catalogue/hostile"' in index and live.listing_id in index
    assert "Private one" not in index and "Gone one" not in index
    for hidden in ("private-one", "gone", "no-such-listing"):
        page = httpx.get(f"{live.base_url}/catalogue/{hidden}")
        assert page.status_code == 404 and "No such listing" in page.text
        assert httpx.get(f"{live.base_url}/catalogue/{hidden}/report.png").status_code == 404
    searched = httpx.get(f"{live.base_url}/catalogue", params={"q": "<b>x</b>"}).text
    assert "&lt;b&gt;x&lt;/b&gt;" in searched and "<b>x</b>" not in searched
    page = httpx.get(f"{live.base_url}/catalogue/hostile")
    nonce = page.headers["content-security-policy"].split("script-src 'nonce-")[1].split("'")[0]
    assert page.text.count("<script") == page.text.count(f'<script nonce="{nonce}">') == 1
    home = httpx.get(f"{live.base_url}/", follow_redirects=False)
    assert home.status_code == 303 and home.headers["location"] == "/catalogue"


def test_usage_page_takes_the_key_by_post_only(live: LiveMarket) -> None:
    form = httpx.get(f"{live.base_url}/catalogue/usage", params={"key": live.buyer_keys["buyer-2"]})
    assert form.status_code == 200 and 'method="post"' in form.text and 'id="buyer"' not in form.text
    refused = httpx.post(f"{live.base_url}/catalogue/usage", data={"key": "osk_not-a-key"})
    assert refused.status_code == 401 and "invalid or revoked API key" in refused.text
    shown = httpx.post(f"{live.base_url}/catalogue/usage", data={"key": live.buyer_keys["buyer-2"]})
    assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
    assert '<span id="buyer">buyer-2</span>' in shown.text and 'id="no-usage"' in shown.text
    png = httpx.get(f"{live.base_url}/catalogue/{live.listing_id}/report.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_catalogue_in_a_real_browser(live: LiveMarket, browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = tmp_path_factory.mktemp("screenshots")
    wait = WebDriverWait(browser, 60)
    key = live.buyer_keys["buyer-1"]

    def find(css: str) -> Any:
        return browser.find_element(By.CSS_SELECTOR, css)

    def shot(name: str) -> Path:
        """The whole page, beyond the window (Chrome DevTools), at the window's width."""
        size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                                  "clip": clip})
        path = shots / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def ask() -> None:
        find("#key").clear()
        find("#key").send_keys(key)
        find("#submit").click()
        wait.until(lambda _: find("#answer").is_displayed() or find("#error").is_displayed())

    browser.get(live.base_url + "/")  # redirected to the index
    assert browser.current_url.endswith("/catalogue")
    assert find(f'[data-listing="{live.listing_id}"] h2').text == "WordNet definitions"
    shot("index")
    find("#q").send_keys("wordnet DEFINITIONS")
    find("form.search button").click()
    wait.until(lambda _: "q=" in browser.current_url)
    assert [e.get_attribute("data-listing") for e in browser.find_elements(By.CSS_SELECTOR, "[data-listing]")] \
        == [live.listing_id]
    browser.get(live.base_url + "/catalogue?q=zebra-quasar-nonsense")
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-listing]") and find("#no-results").is_displayed()

    browser.get(f"{live.base_url}/catalogue/{live.listing_id}")
    assert find("#listing-name").text == "WordNet definitions" and find("#model-id").text == live.listing_id
    assert find("#contributors").text == "2" and "0.020000 per 1k tokens" in find("#price").text
    assert find("#license").text == "CC-BY-4.0" and "multiple-choice" in find("#card").text
    signer = json.loads(live.store.listing(live.listing_id).card)["provenance"]["signer"]
    assert signer and signer in find("#provenance").text
    wait.until(lambda _: browser.execute_script("return document.getElementById('report').complete"))
    assert browser.execute_script("return document.getElementById('report').naturalWidth") > 0

    ask()
    assert not find("#error").is_displayed(), find("#error").text
    assert find("#answer").text.strip() and "completion tokens" in find("#meta").text
    listing_shot = shot("listing")

    browser.get(live.base_url + "/catalogue/usage")
    find("#usage-key").send_keys(key)
    find("#usage-submit").click()
    wait.until(lambda _: browser.find_elements(By.ID, "buyer") or browser.find_elements(By.ID, "usage-error"))
    assert find("#buyer").text == "buyer-1" and "?" not in browser.current_url  # the key is never in the URL
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.usage-row")
    assert len(rows) == 1 and live.listing_id in rows[0].text and "completions" in rows[0].text
    assert " ok " in f" {rows[0].text} " and find("#total-requests").text == "1"
    shot("usage")

    revoke_buyer(live.store, "buyer-1", "tester")
    browser.get(f"{live.base_url}/catalogue/{live.listing_id}")
    ask()
    error = find("#error").text
    assert "401" in error and "revoked" in error and not find("#answer").is_displayed(), error
    shot("revoked")

    if not any(item.listing_id == "hostile" for item in live.store.listings()):
        add_copy(live, "hostile", name=HOSTILE, description='<img src=x onerror="window.pwned=2">')
    browser.get(f"{live.base_url}/catalogue/hostile")  # shown as text, never run
    assert find("#listing-name").text == HOSTILE and browser.execute_script("return window.pwned === undefined")
    print(f"screenshots in {shots}")
    README_SHOT.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("OFFSITE_UPDATE_SCREENSHOTS") == "1":  # refresh the README's image on request
        shutil.copyfile(listing_shot, README_SHOT)



@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMarket]:
    with market_server(tmp_path_factory.mktemp("market-web-cls"), task="classification") as market:
        yield market


def test_classification_listing_answers_with_labels(classifier: LiveMarket, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    labels = json.loads(classifier.store.listing(classifier.listing_id).card)["labels"]
    browser.get(f"{classifier.base_url}/catalogue/{classifier.listing_id}")
    assert all(label in browser.find_element(By.ID, "card").text for label in labels)
    browser.find_element(By.ID, "key").send_keys(classifier.buyer_key)
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer li, #error").is_displayed())
    rows = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#answer li")]
    assert rows, browser.find_element(By.ID, "error").text
    assert all(r.split(": ")[0] in labels and len(r.split(": ")[1]) == 5 for r in rows), rows
    assert sum(float(r.split(": ")[1]) for r in rows) <= 1.005
