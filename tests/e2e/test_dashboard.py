"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright), against a
real hub process with real device processes sending real telemetry over a real Mosquitto.

Covered: the fleet page loads with the devices and their figures; it follows the fleet live (a
device killed with kill -9 turns offline on the open page, no reload); a device's page renders its
four charts from its telemetry; a rollout's progress moves on the rollouts page as devices update;
the label filter. Screenshots are saved (in the test's folder, and in EDGEKIT_SCREENSHOTS if set).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.test_telemetry import FEATURES, World, with_validation
from tests.hub.conftest import make_bundle
from tests.mqtt import WAIT, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MS = int(WAIT * 1000)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            yield pg
            assert errors == [], errors  # no JavaScript error on any page the test opened
        finally:
            browser.close()


def screenshot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real picture, not an empty page
    keep = os.environ.get("EDGEKIT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def test_the_dashboard_shows_the_fleet_live_the_device_charts_and_a_rollout_moving(
    world: World, page: Any, tmp_path: Path
) -> None:
    hub = world.start_hub()
    world.cli("push", str(world.bundle))
    devices = [world.device(f"pi-{i}") for i in range(3)]
    rng = np.random.default_rng(0)
    for d in devices:  # inputs like validation's, fresh for every request: no drift
        for _ in range(30):
            d.traffic(ok=1, x=rng.normal(size=(4, FEATURES)).astype(np.float32))
        d.traffic(ok=0, bad=2)
    for d in devices:
        world.wait_totals(d)

    page.goto(f"{hub.url}/#token={hub.token}")
    page.wait_for_selector("#fleet-table tr.device-row", timeout=MS)
    page.wait_for_function("document.querySelectorAll('#fleet-table tr.device-row').length === 3", timeout=MS)
    assert page.inner_text("#stat-devices") == "3" and page.inner_text("#stat-online") == "3"
    first = page.locator("tr.device-row[data-device='pi-0'] td")
    assert first.nth(3).inner_text() == "digits" and first.nth(4).inner_text() == "v1"
    assert page.locator("#live.on").count() == 1  # the live stream is connected
    assert "#token" not in page.url  # the token left the address bar
    screenshot(page, tmp_path, "dashboard-fleet")

    # live: a device dies; the open page says so without a reload
    devices[2].kill()
    page.wait_for_function("document.querySelector('#stat-offline').textContent === '1'", timeout=MS)
    assert page.locator("tr.device-row[data-device='pi-2'] td").nth(5).inner_text() == "offline"
    page.select_option("#f-state", "offline")
    page.wait_for_function("document.querySelectorAll('#fleet-table tr.device-row').length === 1", timeout=MS)
    page.select_option("#f-state", "all")
    page.fill("#f-label", "site=elsewhere")
    page.dispatch_event("#f-label", "change")
    page.wait_for_function("document.querySelectorAll('#fleet-table tr.device-row').length === 0", timeout=MS)
    page.fill("#f-label", "site=lab")
    page.dispatch_event("#f-label", "change")
    page.wait_for_function("document.querySelectorAll('#fleet-table tr.device-row').length === 3", timeout=MS)

    # a device's charts, from its telemetry
    page.click("tr.device-row[data-device='pi-0']")
    page.wait_for_function("document.body.dataset.deviceRendered === 'pi-0'", timeout=MS)
    for chart in ("c-lat-0", "c-tput-0", "c-err-0", "c-out-0"):
        assert page.locator(f"#{chart}[data-rendered='1'] .main-svg").count() >= 1, chart
    # the outputs chart draws live shares against validation's: two bar series
    assert page.locator("#c-out-0 .trace.bars").count() == 2
    screenshot(page, tmp_path, "dashboard-device")

    # a rollout of v2 in two waves; its progress moves on the open rollouts page
    v2 = with_validation(make_bundle(tmp_path / "digits-2.ekb", version=2, seed=2), world.keys)
    world.cli("push", str(v2))
    page.goto(f"{hub.url}/#/rollouts")
    page.wait_for_selector("#main h2", timeout=MS)
    # a health window of 3 s per device: the rollout takes long enough for the page to watch it
    rollout = world.cli(
        "deploy", "digits:2", "--to", "pi-0,pi-1", "--waves", "1,100%", "--health-window", "3s", "--json"
    ).stdout
    assert '"state"' in rollout
    page.wait_for_selector("tr.rollout-row", timeout=MS)
    seen: set[str] = set()

    def progress() -> str:
        row = page.locator("tr.rollout-row").first
        value = f"{row.get_attribute('data-done')}/{row.get_attribute('data-total')} {row.get_attribute('data-state')}"
        seen.add(value)
        return value

    wait_until(lambda: progress().endswith("completed"), "the rollout completed on the open page", 120, 0.1)
    # the page showed the rollout before it was done (0 or 1 of 2 devices done, running), then done
    assert "2/2 completed" in seen
    assert any(v.endswith("running") for v in seen), seen
    screenshot(page, tmp_path, "dashboard-rollouts")
