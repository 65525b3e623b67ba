"""The report page in a real headless Chromium (Debian's, driven by Playwright), against a
real uvicorn serving the demo trial: it loads with a token in the URL fragment, shows the
numbers the JSON gives, draws one swimmer lane per treated patient, opens a platelet chart,
fetches nothing from another origin, and logs no console error. Screenshots are kept in
tests/artifacts/.

Without a browser this test is skipped locally and fails in CI (CI=true), like the
PostgreSQL half of the suite; `scripts/test.sh` installs Debian's chromium where missing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.services import demo
from tests.conftest import IN_CI, PROJECT_ROOT, token

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"


@pytest.fixture
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium; or set CHROMIUM_PATH)"
        if IN_CI:
            pytest.fail(message + " (CI=true: the browser test must run)")
        pytest.skip(message)
    return CHROMIUM


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _proportion_text(p: dict[str, Any]) -> str:
    return (
        f"{p['responders']}/{p['n']} = {_percent(p['rate'])} "
        f"(95% CI {_percent(p['ci95_low'])} to {_percent(p['ci95_high'])})"
    )


def _drive(browser_path: str, base: str, bearer_token: str, expected: dict[str, Any]) -> dict:
    """The browser session (Playwright's sync API, so in a thread of its own)."""
    from playwright.sync_api import sync_playwright

    report, listing = expected["report"], expected["listing"]
    seen: dict[str, Any] = {"errors": [], "foreign": [], "requests": []}
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=browser_path,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            # No token: the page holds no data and asks the server for none.
            page = browser.new_page()
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(f"{base}/report")
            page.wait_for_load_state("networkidle")
            assert page.locator("#report").is_hidden()
            assert not [url for url in seen["requests"] if "/fhir/" in url]
            page.close()

            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: seen["errors"].append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda error: seen["errors"].append(str(error)))
            page.on(
                "request",
                lambda r: (
                    seen["foreign"].append(r.url) if not r.url.startswith((base, "data:")) else None
                ),
            )
            page.goto(f"{base}/report#token={bearer_token}")
            page.wait_for_selector("#swimmer svg")
            # The fragment is gone from the address bar; the token is in this tab only.
            assert page.evaluate("location.hash") == ""
            assert page.evaluate("sessionStorage.getItem('itp-report-token')") == bearer_token
            assert page.evaluate("localStorage.length") == 0
            assert page.evaluate("document.cookie") == ""
            # The summary shows the numbers the JSON gives.
            assert page.text_content("#n-enrolled") == str(report["n_enrolled"])
            assert page.text_content("#n-treated") == str(report["n_treated"])
            assert page.text_content("#n-evaluable") == str(report["n_evaluable"])
            assert page.text_content("#orr") == _proportion_text(report["orr"])
            assert page.get_attribute("#orr", "data-low") == repr(report["orr"]["ci95_low"])
            assert page.get_attribute("#orr", "data-high") == repr(report["orr"]["ci95_high"])
            assert page.text_content("#cr-rate") == _proportion_text(report["cr_rate"])
            # One lane per treated patient, one site row per site, one row per patient.
            lanes = page.eval_on_selector_all(
                '#swimmer g[id^="lane-"]', "gs => gs.map(g => g.id.slice(5))"
            )
            seen["lanes"] = lanes
            assert page.locator("#sites tbody tr").count() == len(report["by_site"])
            rows = page.locator("#listing tbody tr")
            assert rows.count() == len(listing["rows"])
            page.screenshot(path=str(ARTIFACTS / "report-page.png"), full_page=True)
            # A patient's row opens its platelet chart, each count's marker by its id.
            patient = expected["chart_patient"]
            page.click(f'#listing tbody tr[data-patient="{patient}"]')
            page.wait_for_selector("#chart svg")
            assert page.locator("#chart-dialog").is_visible()
            seen["markers"] = [
                ident
                for ident in expected["count_ids"]
                if page.locator(f'#chart svg g[id="{ident}"]').count() == 1
            ]
            page.screenshot(path=str(ARTIFACTS / "report-chart.png"))
            page.click("#chart-dialog button")
            # A swimmer lane opens its patient's chart too.
            page.click(f'#swimmer g[id="lane-{patient}"]', force=True)
            page.wait_for_selector(f'#chart svg[data-patient="{patient}"]')
        finally:
            browser.close()
    return seen


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_report_page_in_a_real_browser(app, live_server, chromium):
    await demo.load(app.state.services, progress=lambda _line: None)
    bearer_token = token("monitor", ("S01", "S02"))
    headers = {"Authorization": f"Bearer {bearer_token}"}
    async with httpx.AsyncClient(base_url=live_server, headers=headers, timeout=60) as http:
        report = (await http.get("/fhir/$trial-report")).json()
        listing = (await http.get("/fhir/$response-listing")).json()
        chart_patient = next(r["patient"] for r in listing["rows"] if r["rescue_count"])
        counts = await http.get(
            "/fhir/Observation", params={"subject": f"Patient/{chart_patient}", "code": "777-3"}
        )
    count_ids = [entry["resource"]["id"] for entry in counts.json()["entry"]]
    expected = {
        "report": report,
        "listing": listing,
        "chart_patient": chart_patient,
        "count_ids": count_ids,
    }
    seen = await asyncio.to_thread(_drive, chromium, live_server, bearer_token, expected)
    treated = {row["patient"] for row in listing["rows"] if row["treatment_start"]}
    assert len(seen["lanes"]) == report["n_treated"] == len(treated) == 19
    assert set(seen["lanes"]) == treated
    assert seen["markers"] == count_ids and len(count_ids) == 13
    assert seen["foreign"] == []
    assert seen["errors"] == []
    assert Path(ARTIFACTS / "report-page.png").stat().st_size > 10_000
