"""The marketplace against a live ``serve-models --market`` process: a load test (8 buyers x 50 requests),
revocation and withdrawal mid-flight, bad input metering nothing, and SIGKILL under load losing no usage row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from coordinator.cli import app as cli
from coordinator.market.buyers import Limits, add_buyer, revoke_buyer
from coordinator.market.store import MarketStore
from tests.runs import tiny_run
from tests.serving_support import free_port

BUYERS, REQUESTS = 8, 50
PROMPT = "Definition: a small dog\nWord:"


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("market-live")
    run = tiny_run(root / "run", method="lora", task="multiple-choice")
    state = root / "state"
    for name, extra in (("defs", []), ("private", ["--allow", "buyer-0"])):
        if name == "private":
            add_buyer(MarketStore(state), "buyer-0", Limits(), [], actor="test")
        result = CliRunner().invoke(cli, ["market", "list", "--run", str(run), "--name", name,
                                          "--price-per-1k-tokens", "0.5", "--override-gate", "tiny test run",
                                          "--actor", "test", "--state", str(state), *extra])
        assert result.exit_code == 0, result.output
    store = MarketStore(state)
    keys = {"buyer-0": ""}
    for i in range(1, BUYERS + 1):
        keys[f"buyer-{i}"] = add_buyer(store, f"buyer-{i}", Limits(rate_per_minute=100_000, burst=1000), [], "test")
    store.close()
    return run, state, keys


@contextmanager
def server(run: Path, state: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve-models", "--state", str(state), "--market", "--http-port",
         str(port), "--base", str(run / "full-model"), "--max-wait-ms", "5"],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert process.poll() is None, "serve-models exited at start"
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def ask(url: str, key: str, model: str = "defs", **body: object) -> httpx.Response:
    payload = {"model": model, "prompt": PROMPT, "max_tokens": 2, **body}
    return httpx.post(f"{url}/v1/completions", json=payload, headers={"authorization": f"Bearer {key}"},
                      timeout=60)


def usage_rows(state: Path, status: str | None = None) -> int:
    store = MarketStore(state)
    try:
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        return int(store.query(f"SELECT COUNT(*) FROM usage {where}", *args)[0][0])
    finally:
        store.close()


def test_load_then_bad_input_then_revocation(market: tuple[Path, Path, dict[str, str]]) -> None:
    run, state, keys = market
    with server(run, state) as (url, _):
        latencies: list[float] = []
        answered = [0] * BUYERS

        def buyer(index: int) -> None:
            key = keys[f"buyer-{index + 1}"]
            with httpx.Client(timeout=60) as client:
                for _ in range(REQUESTS):
                    started = time.monotonic()
                    response = client.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {key}"},
                                           json={"model": "defs", "prompt": PROMPT, "max_tokens": 2})
                    if response.status_code == 200:
                        answered[index] += 1
                        latencies.append(time.monotonic() - started)

        threads = [threading.Thread(target=buyer, args=(i,)) for i in range(BUYERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        latencies.sort()
        p99 = latencies[int(0.99 * (len(latencies) - 1))]
        print(f"load test: {sum(answered)}/{BUYERS * REQUESTS} answered, p50={latencies[len(latencies) // 2]:.3f}s "
              f"p99={p99:.3f}s")
        assert sum(answered) == BUYERS * REQUESTS
        assert usage_rows(state, "ok") == sum(answered) == usage_rows(state)
        store = MarketStore(state)
        for day_tokens, day_requests in store.query("SELECT tokens, requests FROM daily_quota"):
            assert 0 <= day_tokens <= Limits().tokens_per_day and 0 <= day_requests <= Limits().requests_per_day
        store.close()

        before = usage_rows(state)
        key = keys["buyer-1"]
        bad = [ask(url, key, model="no-such-listing"), ask(url, key, max_tokens=-3),
               ask(url, key, prompt="word " * 2000), ask(url, key, model="private"),
               httpx.post(f"{url}/v1/completions", content=b"{oops", timeout=30,
                          headers={"authorization": f"Bearer {key}", "content-type": "application/json"})]
        assert [r.status_code for r in bad] == [404, 400, 400, 403, 400], [r.text for r in bad]
        assert all(r.json()["error"]["message"] for r in bad)
        assert usage_rows(state) == before  # nothing metered

        # A long request is running when its key is revoked: it finishes and is metered; the next is refused.
        holder: dict[str, httpx.Response] = {}
        running = threading.Thread(target=lambda: holder.setdefault("r", ask(url, key, max_tokens=48, stream=True)))
        running.start()
        time.sleep(0.3)
        store = MarketStore(state)
        revoke_buyer(store, "buyer-1", actor="test")
        running.join()
        assert holder["r"].status_code == 200 and holder["r"].text.rstrip().endswith("[DONE]")
        assert store.query("SELECT status, tokens_out FROM usage ORDER BY usage_id DESC LIMIT 1")[0] == ("ok", 48)
        refused = ask(url, key)
        assert refused.status_code == 401
        store.withdraw("defs", actor="test")
        assert ask(url, keys["buyer-2"]).status_code in (404, 410)
        store.close()


def test_sigkill_under_load_loses_no_answered_request(market: tuple[Path, Path, dict[str, str]]) -> None:
    run, state, keys = market
    result = CliRunner().invoke(cli, ["market", "list", "--run", str(run), "--name", "after-kill",
                                      "--price-per-1k-tokens", "0.5", "--override-gate", "tiny test run",
                                      "--actor", "test", "--state", str(state)])
    assert result.exit_code == 0, result.output
    ok_before = usage_rows(state, "ok")
    answered = [0]
    stop = threading.Event()
    with server(run, state) as (url, process):
        def hammer(key: str) -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    try:
                        response = client.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {key}"},
                                               json={"model": "after-kill", "prompt": PROMPT, "max_tokens": 4})
                    except httpx.HTTPError:
                        return
                    if response.status_code == 200:
                        answered[0] += 1

        threads = [threading.Thread(target=hammer, args=(keys[f"buyer-{i}"],)) for i in range(3, 7)]
        for thread in threads:
            thread.start()
        time.sleep(4)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        stop.set()
        for thread in threads:
            thread.join()
    assert answered[0] > 0
    assert usage_rows(state, "ok") - ok_before >= answered[0]
    with server(run, state) as (url, _):  # the restart closes what the killed server left admitted
        assert ask(url, keys["buyer-3"], model="after-kill").status_code == 200
        store = MarketStore(state)
        assert store.query("SELECT COUNT(*) FROM usage WHERE status = 'pending'")[0][0] == 0
        store.close()
    print(json.dumps({"answered_before_kill": answered[0], "ok_rows": usage_rows(state, "ok") - ok_before}))
