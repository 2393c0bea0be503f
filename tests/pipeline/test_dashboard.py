"""The fedpipe page on the scheduler's dashboard, checked in headless Chromium during real runs."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from fedpipe.cli import registry
from fedpipe.data.ingest import ingest
from fedpipe.data.partition import partition
from fedpipe.data.store import read_info
from fedpipe.engine import placement
from fedpipe.engine.federate import federate
from fedpipe.engine.train import fit
from fedpipe.monitor.dashboard import Publisher, install_page, monitoring
from fedpipe.monitor.progress import chain
from fedpipe.tasks import fedbuff

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def federated_cluster(tmp_path_factory):
    """A partitioned store and a simulation cluster whose workers carry the client resources."""
    path = str(tmp_path_factory.mktemp("dash") / "store.zarr")
    ingest("synthetic:classification?n_samples=2000&n_features=6&n_classes=3&seed=1", path,
           chunk_rows=250, progress=False)
    clients = partition(path, clients=4, scheme="dirichlet", alpha=0.5, seed=0, name="p")["clients"]
    groups = placement.assign_clients({c: v["n_rows"] for c, v in clients.items()}, 2)
    with placement.simulation_cluster(groups, processes=False, dashboard_address=":0") as dask_client:
        yield path, dask_client


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_records_reach_the_page_data(federated_cluster) -> None:
    _, dask_client = federated_cluster
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
    with urllib.request.urlopen(url.replace("fedpipe/", "status"), timeout=10) as resp:
        assert b'href="fedpipe"' in resp.read()  # a tab in Dask's own navigation bar


def launch_browser(playwright, tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (scripts/install-browser.sh could not apt-get it)")
    return playwright.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
        args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
    )


def real_runs(path: str, dask_client, errors: list) -> None:
    """A data-parallel then a federated run, through the on_record path the CLI uses.

    The test's own callback sleeps a little per record so the page can be read mid-run.
    """
    args = argparse.Namespace(quiet=True, json=False)
    try:
        info = read_info(path)
        model = registry.make_model("softmax", info)
        with monitoring(args, dask_client, mode="train", total=12, unit="iteration") as on_record:
            fit(path, model, registry.make_optimizer("adam", 0.1), iterations=12, dask_client=dask_client,
                on_record=chain(on_record, lambda r: time.sleep(0.3)))
        with monitoring(args, dask_client, mode="federate", total=10, unit="round") as on_record:
            federate(path, model, rounds=10, partition="p", dask_client=dask_client, batch_size=64,
                     on_record=chain(on_record, lambda r: time.sleep(0.3)))
    except Exception as exc:  # surfaced by the test thread, not lost in this one
        errors.append(exc)


def test_page_updates_in_a_browser(federated_cluster, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    path, dask_client = federated_cluster
    url = install_page(dask_client)
    errors: list = []
    run = threading.Thread(target=real_runs, args=(path, dask_client, errors), daemon=True)
    with sync_api.sync_playwright() as playwright:
        browser = launch_browser(playwright, tmp_path)
        page = browser.new_page()
        run.start()
        page.goto(url)
        # Data-parallel run: the iteration count and the curves grow between two reads.
        page.wait_for_function("+document.getElementById('n-records').textContent >= 2", timeout=60_000)
        first = int(page.text_content("#n-records"))
        first_points = int(page.get_attribute("#loss-chart", "data-points"))
        page.wait_for_function(f"+document.getElementById('n-records').textContent > {first + 1}", timeout=30_000)
        assert int(page.get_attribute("#loss-chart", "data-points")) > first_points
        assert page.text_content("#mode").startswith("train")
        page.screenshot(path=str(tmp_path / "dashboard-train.png"), full_page=True)
        # Federated run (the page follows the newest run): per-client view with all 4 clients.
        page.wait_for_function("document.getElementById('mode').textContent.startsWith('federate')"
                               " && +document.getElementById('n-records').textContent >= 3", timeout=60_000)
        assert page.is_visible("#participation-section")
        assert page.locator("#clients tbody tr").count() == 4
        page.screenshot(path=str(tmp_path / "dashboard-federate.png"), full_page=True)
        browser.close()
    run.join(timeout=120)
    assert not errors, errors
    for name in ("dashboard-train.png", "dashboard-federate.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_asynchronous_run_shows_versions_staleness_and_buffer(federated_cluster, tmp_path) -> None:
    """A FedBuff run: the page counts versions, not rounds, and draws staleness and the buffer."""
    sync_api = pytest.importorskip("playwright.sync_api")
    path, dask_client = federated_cluster
    url = install_page(dask_client)
    model = registry.make_model("softmax", read_info(path))
    mode = fedbuff.buffered(buffer_size=2, max_concurrency=4, speeds=fedbuff.two_tier(0.5, 10))
    args = argparse.Namespace(quiet=True, json=False)
    with monitoring(args, dask_client, mode="federate", total=6, unit="version") as on_record:
        federate(path, model, rounds=6, partition="p", dask_client=dask_client, batch_size=64,
                 mode=mode, on_record=on_record)
    with sync_api.sync_playwright() as playwright:
        browser = launch_browser(playwright, tmp_path)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("+document.getElementById('n-records').textContent === 6",
                               timeout=60_000)
        assert page.is_visible("#async-section")
        assert page.text_content("#unit") == "version" and page.text_content("#done") == "6"
        assert int(page.get_attribute("#staleness-chart", "data-points")) == 12  # mean, max
        assert int(page.get_attribute("#buffer-chart", "data-points")) == 18
        assert "versions →" in page.text_content("#participation")
        assert page.text_content("#clients-section h2") == "Clients in the latest version"
        page.screenshot(path=str(tmp_path / "dashboard-async.png"), full_page=True)
        browser.close()
    assert (tmp_path / "dashboard-async.png").stat().st_size > 10_000
