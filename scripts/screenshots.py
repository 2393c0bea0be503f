"""Make ``docs/img/dashboard.png`` and ``docs/img/report.png`` with the project's own commands.

    .venv/bin/python scripts/screenshots.py [--out docs/img] [--work DIR]

1. ``fedpipe ingest`` a synthetic store and ``fedpipe partition`` it (Dirichlet, non-IID);
2. start ``dask scheduler`` and ``dask worker`` processes carrying the clients' resources;
3. run ``fedpipe federate --scheduler ADDR`` against it and photograph the live fedpipe page
   on that scheduler's dashboard in headless Chromium (Debian's ``chromium``, no download);
4. ``fedpipe report RUN_DIR`` and photograph the report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fedpipe.data.store import read_info
from fedpipe.engine import placement
from playwright.sync_api import sync_playwright

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
    return [sys.executable, "-m", "fedpipe.cli.main", *argv]


def prepare_store(work: Path) -> tuple[str, list[list[str]]]:
    store = str(work / "shots.zarr")
    subprocess.run(fedpipe("ingest", SOURCE, store, "--chunk-rows", "2500", "--standardize",
                           "--overwrite", "-q"), check=True)
    subprocess.run(fedpipe("partition", store, "--clients", "6", "--scheme", "dirichlet",
                           "--alpha", "0.3", "--name", "shots", "-q"), check=True)
    clients = read_info(store).partitions["shots"]["clients"]
    groups = placement.assign_clients({c: v["n_rows"] for c, v in clients.items()}, 2)
    return store, groups


def start_cluster(work: Path, groups: list[list[str]]) -> tuple[list[subprocess.Popen], str, str]:
    """``dask scheduler`` + one ``dask worker`` per client group, as a deployment runs them.

    Returns the processes, the scheduler address and the dashboard's base URL.
    """
    dask = str(Path(sys.executable).with_name("dask"))
    sched_file = work / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    procs = [subprocess.Popen([dask, "scheduler", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sched_file)], stderr=subprocess.DEVNULL)]
    while not sched_file.exists():
        time.sleep(0.2)
    time.sleep(0.5)  # the file is written in one go, but give it a moment
    info = json.loads(sched_file.read_text())
    address = info["address"]
    base = f"http://{address.split('://')[1].rsplit(':', 1)[0]}:{info['services']['dashboard']}/"
    for group in groups:
        resources = " ".join(f"{name}=1" for name in placement.resources_of(group))
        procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--resources", resources], stderr=subprocess.DEVNULL))
    while _get_json(base + "json/counts.json").get("workers", 0) < len(groups):
        time.sleep(0.5)
    return procs, address, base


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return {}


def shoot_dashboard(browser, base: str, target: Path, min_records: int) -> None:
    # The page appears when the run publishes its first record; wait for it before opening.
    while len(_get_json(base + "fedpipe/data.json").get("records", [])) < min_records:
        time.sleep(0.5)
    page = browser.new_page()
    page.goto(base + "fedpipe/")
    page.wait_for_function(f"+document.getElementById('n-records').textContent >= {min_records}",
                           timeout=60_000)
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
    procs, address, base = start_cluster(work, groups)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(work / "chromium-profile"), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
            run = subprocess.Popen(fedpipe(
                "federate", store, "--partition", "shots", "--model", "mlp", "--hidden", "32",
                "--rounds", str(ROUNDS), "--lr", "0.05", "--batch-size", "64", "--local-epochs", "2",
                "--clients-per-round", "4",
                "--scheduler", address, "--out", str(run_dir), "-q"))
            shoot_dashboard(browser, base, opts.out / "dashboard.png", ROUNDS * 2 // 3)
            if run.wait(timeout=600) != 0:
                sys.exit(f"fedpipe federate failed with status {run.returncode}")
            subprocess.run(fedpipe("report", str(run_dir), "-q"), check=True)
            shoot_file(browser, run_dir / "report.html", opts.out / "report.png")
            browser.close()
    finally:
        for proc in reversed(procs):  # workers first, then the scheduler
            proc.terminate()
            proc.wait(timeout=30)
    for name in ("dashboard.png", "report.png"):
        print(opts.out / name)


if __name__ == "__main__":
    main()
