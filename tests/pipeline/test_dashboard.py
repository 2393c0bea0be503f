"""The fedpipe page on the scheduler's dashboard, checked in headless Chromium while a run publishes."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from pipeline.dashboard import Publisher, install_page, monitoring

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def dask_client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as dask_client:
        yield dask_client


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_records_reach_the_page_data(dask_client) -> None:
    url = install_page(dask_client)
    install_page(dask_client)  # a second run on the same cluster must not break the routes
    publish = Publisher(dask_client, mode="federate", total=2, unit="round", run_id="r1")
    publish({"round": 1, "train_loss": 0.5, "clients": {"0": {"loss": 0.4}}, "dropped": {"1": "timeout"}})
    publish.close()
    data = fetch_json(url + "data.json?run=r1")
    assert data["status"] == "finished" and data["meta"]["total"] == 2
    (record,) = data["records"]
    assert record["train_loss"] == 0.5
    assert {r["id"]: r["status"] for r in record["client_rows"]} == {"0": "ok", "1": "dropped"}
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert b"<title>fedpipe" in resp.read()


def launch_browser(playwright, tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/install-browser.sh could not apt-get it)")
    return playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
        args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
    )


def fake_federated_run(dask_client, rounds: int, stop: threading.Event) -> None:
    """Stand-in engine: one record per round through the same on_record path the CLI uses."""
    import argparse

    args = argparse.Namespace(quiet=True, json=False)
    with monitoring(args, dask_client, mode="federate", total=rounds, unit="round") as on_record:
        for r in range(1, rounds + 1):
            if stop.is_set():
                return
            clients = {str(c): {"loss": 1.0 / r + c / 10, "seconds": 0.1 + c / 20, "update_bytes": 4096}
                       for c in range(4) if (r + c) % 5}
            on_record({"round": r, "train_loss": 1.0 / r, "test_loss": 1.1 / r,
                       "train_accuracy": 1 - 0.5 / r, "test_accuracy": 1 - 0.6 / r,
                       "clients": clients, "dropped": {str(c): "timeout" for c in range(4) if not (r + c) % 5}})
            time.sleep(0.4)


def test_page_updates_in_a_browser(dask_client, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    url = install_page(dask_client)
    stop = threading.Event()
    run = threading.Thread(target=fake_federated_run, args=(dask_client, 40, stop), daemon=True)
    run.start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = launch_browser(playwright, tmp_path)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("+document.getElementById('n-records').textContent >= 2", timeout=20_000)
            first = int(page.text_content("#n-records"))
            first_points = int(page.get_attribute("#loss-chart", "data-points"))
            page.wait_for_function(f"+document.getElementById('n-records').textContent > {first + 1}", timeout=20_000)
            assert int(page.get_attribute("#loss-chart", "data-points")) > first_points
            assert int(page.get_attribute("#step", "data-step")) > 1
            assert page.is_visible("#participation-section") and page.locator("#clients tbody tr").count() == 4
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        stop.set()
        run.join(timeout=30)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
