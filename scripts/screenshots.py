"""Make ``docs/img/dashboard.png`` and ``docs/img/report.png`` with the project's own commands.

    .venv/bin/python scripts/screenshots.py [--out docs/img] [--work DIR]

1. ``fedpipe ingest`` a synthetic store and ``fedpipe partition`` it (Dirichlet, non-IID);
2. start a scheduler whose workers carry the clients' resources (as a deployment would);
3. run ``fedpipe federate --scheduler ADDR`` against it and photograph the live fedpipe page
   on that scheduler's dashboard in headless Chromium (Debian's ``chromium``, no download);
4. ``fedpipe report RUN_DIR`` and photograph the report.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from pipeline import placement
from pipeline.dashboard import page_url
from pipeline.store import read_info

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SOURCE = "synthetic:classification?n_samples=40000&n_features=10&n_classes=4&seed=3"
ROUNDS = 25


def fedpipe(*argv: str) -> list[str]:
    """The command line of the installed ``fedpipe`` next to this Python."""
    return [sys.executable, "-m", "pipeline.cli", *argv]


def prepare_store(work: Path) -> tuple[str, list[list[str]]]:
    store = str(work / "shots.zarr")
    subprocess.run(fedpipe("ingest", SOURCE, store, "--chunk-rows", "2500", "--standardize",
                           "--overwrite", "-q"), check=True)
    subprocess.run(fedpipe("partition", store, "--clients", "6", "--scheme", "dirichlet",
                           "--alpha", "0.3", "--name", "shots", "-q"), check=True)
    clients = read_info(store).partitions["shots"]["clients"]
    groups = placement.assign_clients({c: v["n_rows"] for c, v in clients.items()}, 2)
    return store, groups


def shoot_dashboard(browser, url: str, target: Path, min_records: int) -> None:
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function(f"+document.getElementById('n-records').textContent >= {min_records}",
                           timeout=300_000)
    time.sleep(1.5)  # one more poll so every chart has redrawn
    page.screenshot(path=str(target), full_page=True)
    page.close()


def shoot_file(browser, path: Path, target: Path) -> None:
    page = browser.new_page()
    page.goto(path.resolve().as_uri())
    page.screenshot(path=str(target), full_page=True)
    page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    work = opts.work or Path(tempfile.mkdtemp(prefix="fedpipe-shots-"))
    store, groups = prepare_store(work)
    run_dir = work / "fedavg-run"
    with placement.simulation_cluster(groups, dashboard_address=":0") as dask_client, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(work / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        run = subprocess.Popen(fedpipe(
            "federate", store, "--partition", "shots", "--model", "mlp", "--hidden", "32",
            "--rounds", str(ROUNDS), "--lr", "0.05", "--batch-size", "64",
            "--scheduler", dask_client.scheduler.address, "--out", str(run_dir), "-q"))
        shoot_dashboard(browser, page_url(dask_client), opts.out / "dashboard.png", ROUNDS * 2 // 3)
        if run.wait(timeout=600) != 0:
            sys.exit(f"fedpipe federate failed with status {run.returncode}")
        subprocess.run(fedpipe("report", str(run_dir), "-q"), check=True)
        shoot_file(browser, run_dir / "report.html", opts.out / "report.png")
        browser.close()
    for name in ("dashboard.png", "report.png"):
        print(opts.out / name)


if __name__ == "__main__":
    main()
