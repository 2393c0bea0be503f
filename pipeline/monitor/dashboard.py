"""The live "fedpipe" page on the scheduler's own Dask dashboard, and the publisher feeding it.

How it fits together, so it works with a LocalCluster and a remote scheduler alike:

* :func:`install_page` registers :class:`FedpipePage`, a :class:`~distributed.diagnostics.plugin.SchedulerPlugin`,
  from the driver. When it starts *inside the scheduler process* it adds two HTTP routes to
  the scheduler's dashboard server (``scheduler.http_application``): ``/fedpipe/`` (the page)
  and ``/fedpipe/data.json`` (the records).
* :class:`Publisher` is an ``on_record`` callback: it sends each metrics record to the scheduler
  as a ``dask_client.log_event("fedpipe", ...)`` event. The scheduler keeps events in memory, so
  the page shows the whole run even when opened late, and nothing runs on the driver's side.
* The page polls ``data.json`` once a second and draws the curves and the per-client view.

>>> from distributed import Client, LocalCluster              # doctest: +SKIP
>>> with LocalCluster(n_workers=1, dashboard_address=":0") as cluster, Client(cluster) as dask_client:
...     url = install_page(dask_client)
...     publish = Publisher(dask_client, mode="train", total=2, unit="iteration")
...     publish({"iteration": 1, "train_loss": 0.7})
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import Client, default_client
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.http.utils import RequestHandler
from fedpipe.monitor.progress import OnRecord, ProgressBar, chain, client_rows, is_quiet, steps_done

log = logging.getLogger("fedpipe")

TOPIC = "fedpipe"
PAGE_PATH = "fedpipe/"
PAGE_HTML = Path(__file__).with_name("dashboard.html")  # shipped as package data


class PageHandler(RequestHandler):
    """Serves the page itself (static HTML; everything live comes from ``data.json``)."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(PAGE_HTML.read_text(encoding="utf-8"))


class DataHandler(RequestHandler):
    """``data.json?run=ID``: every run's id and metadata, and the chosen run's records."""

    def get(self) -> None:
        runs = collect_runs(self.server.get_events(TOPIC))
        wanted = self.get_argument("run", "") or (next(reversed(runs)) if runs else "")
        run = runs.get(wanted, {"meta": {}, "records": [], "status": "unknown"})
        self.set_header("Cache-Control", "no-store")
        self.write({
            "runs": [{"id": k, "meta": v["meta"], "status": v["status"]} for k, v in runs.items()],
            "run": wanted,
            **run,
        })


def collect_runs(events: Any) -> dict[str, dict[str, Any]]:
    """Group ``(time, message)`` events into runs, oldest first, each with meta/records/status."""
    runs: dict[str, dict[str, Any]] = {}
    for _, msg in events:
        if not isinstance(msg, Mapping) or "run" not in msg:
            continue
        run = runs.setdefault(msg["run"], {"meta": {}, "records": [], "status": "running"})
        kind = msg.get("type")
        if kind == "start":
            run["meta"] = msg.get("meta", {})
        elif kind == "record":
            run["records"].append(msg.get("record", {}))
        elif kind == "end":
            run["status"] = msg.get("status", "finished")
    return runs


class FedpipePage(SchedulerPlugin):
    """Adds the fedpipe page to the dashboard of the scheduler it is registered on."""

    name = "fedpipe-page"
    idempotent = True  # a second run on the same cluster keeps the routes already there

    async def start(self, scheduler: Any) -> None:
        app = getattr(scheduler, "http_application", None)
        if app is None or getattr(scheduler, "_fedpipe_page", False):
            return
        app.add_handlers(r".*$", [
            (r"/fedpipe/?", PageHandler, {"dask_server": scheduler}),
            (r"/fedpipe/data\.json", DataHandler, {"dask_server": scheduler}),
        ])
        scheduler._fedpipe_page = True
        add_nav_tab(scheduler)


def add_nav_tab(scheduler: Any) -> None:
    """Add "Fedpipe" to the navigation bar of Dask's own dashboard pages.

    The bar's page list is the memoised ``template_variables(scheduler)`` dict that every
    Bokeh page renders from; an older or newer distributed without it just keeps its bar.
    """
    try:
        from distributed.dashboard.scheduler import template_variables

        pages = template_variables(scheduler)["pages"]
    except Exception as exc:  # noqa: BLE001 - a cosmetic link must not break the page
        log.debug("fedpipe page: no dashboard navigation bar to extend: %s", exc)
        return
    if "fedpipe" not in pages:
        pages.append("fedpipe")


def page_url(dask_client: Client) -> str | None:
    """The address of the fedpipe page, derived from the cluster's dashboard link."""
    link = dask_client.dashboard_link
    if not link:
        return None
    base = link[: -len("status")] if link.endswith("status") else link.rstrip("/") + "/"
    return base + PAGE_PATH


def install_page(dask_client: Client) -> str | None:
    """Register the page on ``dask_client``'s scheduler; returns its URL (``None``: no dashboard)."""
    dask_client.register_plugin(FedpipePage())
    return page_url(dask_client)


class Publisher:
    """``on_record`` callback sending each record to the scheduler for the page.

    Parameters
    ----------
    dask_client : distributed.Client
        Client of the cluster the run trains on.
    mode : str
        ``"train"`` or ``"federate"``; shown on the page.
    total : int, optional
        Expected number of iterations/rounds, for "7 / 20" on the page.
    unit : str
        What one record is ("iteration", "epoch", "round").
    run_id : str, optional
        Identifies the run among others on the same scheduler; random by default.
    meta : mapping, optional
        Anything else to show in the page's header (run directory, model, strategy…).
    """

    def __init__(self, dask_client: Client, mode: str, total: int | None = None,
                 unit: str = "iteration", run_id: str | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.dask_client = dask_client
        self.run_id = run_id or f"{mode}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.total, self.count, self.closed = total, 0, False
        info = {"mode": mode, "total": total, "unit": unit, "started": time.time(), **(meta or {})}
        self._send({"type": "start", "meta": info})

    def __call__(self, record: Mapping[str, Any]) -> None:
        # Normalised per-client rows, worked out once here on the driver: the page polls every
        # second and the scheduler's event loop should not redo them for every record each time.
        self._send({"type": "record", "record": {**record, "client_rows": client_rows(record)}})
        self.count += 1
        # Engines close their own client when they return, before close() could be called:
        # a run that reached its total says so with its last record.
        done = steps_done(record)
        if self.total is not None and (self.count if done is None else done) >= self.total:
            self.close()

    def close(self, status: str = "finished") -> None:
        """Mark the run finished (or ``"failed"``) on the page; once."""
        if not self.closed:
            self.closed = True
            self._send({"type": "end", "status": status})

    def _send(self, msg: dict[str, Any]) -> None:
        if self.dask_client.status not in ("running", "connecting", "newly-created"):
            return  # the engine closed its client: nobody left to tell
        try:
            self.dask_client.log_event(TOPIC, plain({"run": self.run_id, **msg}))
        except Exception as exc:  # noqa: BLE001 - a lost dashboard update must not stop training
            log.debug("fedpipe page: could not publish a record: %s", exc)


def plain(value: Any) -> Any:
    """JSON-safe copy: NumPy → Python, non-finite floats → ``None`` (JSON has no NaN), str keys."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return json.loads(json.dumps(value, default=str))


class LazyPublisher:
    """A :class:`Publisher` made at the first record, for engines that start their own cluster.

    ``fedpipe federate`` without ``--scheduler`` builds its cluster inside the engine, after the
    CLI hands over ``on_record``; by the first record that cluster's client is the default one.
    """

    def __init__(self, mode: str, total: int | None, unit: str, meta: Mapping[str, Any] | None) -> None:
        self._args = (mode, total, unit)
        self._meta = meta
        self.publisher: Publisher | None = None
        self._tried = False

    def __call__(self, record: Mapping[str, Any]) -> None:
        if not self._tried:
            self._tried = True
            try:
                self.publisher = start_publishing(default_client(), *self._args, meta=self._meta)
            except ValueError:  # no client: the engine ran without a cluster we can reach
                log.debug("fedpipe page: no Dask client to publish to")
        if self.publisher is not None:
            self.publisher(record)

    def close(self, status: str = "finished") -> None:
        """Mark the run finished on the page, if it ever started publishing."""
        if self.publisher is not None:
            self.publisher.close(status)


def start_publishing(dask_client: Client, mode: str, total: int | None, unit: str,
                     meta: Mapping[str, Any] | None = None) -> Publisher | None:
    """Install the page, announce its link (stderr, via logging) and return the publisher."""
    try:
        url = install_page(dask_client)
        publisher = Publisher(dask_client, mode, total, unit, meta=meta)
    except Exception as exc:  # noqa: BLE001 - the run matters more than its live view
        log.warning("fedpipe dashboard page unavailable: %s", exc)
        return None
    if url:
        log.info("fedpipe dashboard: %s", url)
    return publisher


@contextmanager
def monitoring(args: Any, dask_client: Client | None, *, mode: str, total: int | None,
               unit: str, meta: Mapping[str, Any] | None = None) -> Iterator[OnRecord]:
    """The ``on_record`` a CLI command hands to its engine: progress bar + live page.

    Prints the page's link (to stderr, through logging) unless ``--quiet``/``--json``. With
    ``dask_client=None`` the page is installed on the engine's own cluster at the first record.
    Use::

        with monitoring(args, dask_client, mode="train", total=args.iterations, unit="iteration") as on_record:
            fit(..., on_record=on_record)
    """
    publisher: Publisher | LazyPublisher | None
    if dask_client is None:
        publisher = LazyPublisher(mode, total, unit, meta)
    else:
        publisher = start_publishing(dask_client, mode, total, unit, meta)
    status = "failed"
    with ProgressBar(total, unit, enabled=not is_quiet(args)) as bar:
        try:
            yield chain(bar, publisher)
            status = "finished"
        finally:
            if publisher is not None:
                publisher.close(status)
