"""The status page in headless Chromium against the running stack: its DOM shows the live hosts,
the numbers of /v1/stats and its refusals by status and reason; the screenshot goes to
bench/results/status-page.png."""

from __future__ import annotations

import asyncio
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from llooma.stack import Stack
from tests.conftest import AUTH

SCREENSHOT = Path(__file__).resolve().parents[2] / "bench" / "results" / "status-page.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Long enough for the page's first fetch and render, with the stack answering locally.
VIRTUAL_TIME_MS = 4000


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on this machine (make test installs Debian's chromium with apt-get)")


class StatusDom(HTMLParser):
    """The page's numbers (`data-stat` -> text and raw value), host rows and win rows."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, tuple[str, str | None]] = {}
        self.hosts: dict[str, dict[str, tuple[str, str | None]]] = {}
        self.wins: dict[tuple[str, str], int] = {}
        self.rejections: dict[str, int] = {}
        self.loaded = False
        self._open: tuple[str, str | None] | None = None
        self._text: list[str] = []
        self._host: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body" and found.get("data-loaded") == "true":
            self.loaded = True
        if tag == "tr" and found.get("data-rejection"):
            self.rejections[found["data-rejection"] or ""] = int(found.get("data-count") or 0)
        host = found.get("data-host")
        if tag == "tr" and host:
            self._host = host
            self.hosts[host] = {}
        if found.get("class") == "win" and found.get("data-host"):
            key = (found["data-host"] or "", found.get("data-model") or "")
            self.wins[key] = int(found.get("data-wins") or 0)
        if found.get("data-stat"):
            self._open = (found["data-stat"] or "", found.get("data-value"))
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._host = None
        if self._open is not None and tag in ("td", "div", "span", "dd"):
            name, value = self._open
            entry = ("".join(self._text).strip(), value)
            if self._host is not None:
                self.hosts[self._host][name] = entry
            else:
                self.stats[name] = entry
            self._open = None


async def run_chromium(*args: str, profile: Path) -> bytes:
    process = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(90):
        out, _ = await process.communicate()
    assert process.returncode == 0, f"chromium exited with {process.returncode}"
    return out


async def settled(http: httpx.AsyncClient) -> dict[str, Any]:
    """/v1/stats once no race event has arrived for a while."""
    last: dict[str, Any] = {}
    for _ in range(100):
        stats: dict[str, Any] = (await http.get("/v1/stats")).json()
        if last and stats["tasks"] == last["tasks"] and stats["requests"] == last["requests"]:
            return stats
        last = stats
        await asyncio.sleep(0.3)
    raise AssertionError("the stats never settled")


def number(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


async def test_the_status_page_shows_the_hosts_and_the_numbers_of_v1_stats(
    http: httpx.AsyncClient, stack: Stack, tmp_path: Path
) -> None:
    chromium()
    for index in range(8):
        body = {
            "model": "synthetic-small",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"status page request {index}"}],
        }
        response = await http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
    refused = await http.post("/v1/chat/completions", json=body, headers={"Authorization": "x"})
    assert refused.status_code == 401
    stats = await settled(http)

    dom = StatusDom()
    dom.feed((await run_chromium("--dump-dom", stack.base_url + "/", profile=tmp_path)).decode())
    after = (await http.get("/v1/stats")).json()
    assert after["tasks"] == stats["tasks"], "traffic arrived while the page was read"
    assert dom.loaded, "the page never rendered /v1/stats"

    assert dom.stats["requests.total"][0] == str(stats["requests"]["total"])
    assert dom.stats["tasks.succeeded"][0] == str(stats["tasks"]["succeeded"])
    assert dom.stats["requests.direct"][0] == str(stats["requests"]["by_path"]["direct"])
    for path in ("direct", "split", "fallback"):
        for q in ("p50", "p95", "p99"):
            shown = number(dom.stats[f"ttft.{path}.{q}"][1])
            assert shown == stats["first_token_ms"][path][q], (path, q)
    assert number(dom.stats["fallback.rate"][1]) == pytest.approx(stats["fallback"]["rate"])
    assert dom.wins == {(w["host_id"], w["model"]): w["wins"] for w in stats["race_wins"]}
    assert stats["rejections"]["by_status"]["401"]["invalid_api_key"] >= 1
    # Other ingresses' refusals are folded in from their tallies (about one a second): the
    # page shows /v1/stats as it was read before it or after it.
    refusals = (dom.stats["rejections.total"][1], dom.rejections)
    assert refusals in [
        (
            str(read["rejections"]["total"]),
            {
                f"{status} {reason}": count
                for status, reasons in read["rejections"]["by_status"].items()
                for reason, count in reasons.items()
            },
        )
        for read in (stats, after)
    ], refusals

    demo = {"host-fast", "host-steady", "host-jittery"}
    assert demo <= set(dom.hosts), dom.hosts.keys()
    live = {h["host_id"]: h for h in stats["hosts"]}
    # The p95 term is over a rolling window: samples may age out while the page renders.
    live_after = {h["host_id"]: h for h in after["hosts"]}
    for host_id in demo:
        row = dom.hosts[host_id]
        assert row["host.id"][0] == host_id
        assert int(row["host.wins"][0]) == live[host_id]["wins"]
        shown_p95 = number(row["host.p95"][1])
        assert shown_p95 in (
            live[host_id]["p95_first_token_ms"],
            live_after[host_id]["p95_first_token_ms"],
        ), (shown_p95, live[host_id], live_after[host_id])
    assert sum(int(dom.hosts[h]["host.wins"][0]) for h in demo) > 0

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    await run_chromium(
        f"--screenshot={SCREENSHOT}",
        "--window-size=1440,1400",
        stack.base_url + "/",
        profile=tmp_path,
    )
    assert SCREENSHOT.stat().st_size > 10_000
