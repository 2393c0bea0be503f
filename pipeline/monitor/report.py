"""After the run: a self-contained HTML report of PNG plots, and the comparison of several runs.

Every ``plot_*`` function takes plain data (metrics records, label histograms, a confusion
matrix) and returns a :class:`Plot`: the matplotlib figure *and the numbers it drew*. The
report embeds those numbers next to each PNG (``data-series`` attribute), so a test — or a
reader — can check that the picture shows exactly what ``metrics.jsonl`` holds.

>>> plot = plot_curves([{"iteration": 1, "train_loss": 0.9}, {"iteration": 2, "train_loss": 0.5}])
>>> plot.series["loss"]["train_loss"]
[[1, 0.9], [2, 0.5]]
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from fedpipe import rundir
from fedpipe.cli import registry
from fedpipe.data.store import chunk_refs, read_chunk, read_info
from fedpipe.monitor.progress import client_rows, step_of
from fedpipe.tasks.models import pack
from matplotlib.figure import Figure

Series = dict[str, list[list[float]]]  # name -> [[x, y], ...]
REPORT_HTML = "report.html"
HEADERS = {"test_accuracy": "test acc", "s_per_step": "s/step", "seconds": "total s"}
REPORT_DIR = "report"


class Plot(NamedTuple):
    """One figure of a report and the numbers it shows."""

    name: str  # file stem of the PNG
    title: str
    figure: Figure
    series: dict[str, Any]


def metric_series(metrics: Sequence[Mapping[str, Any]], word: str) -> Series:
    """``{key: [[step, value], ...]}`` for every finite numeric key containing ``word``."""
    out: Series = {}
    for i, record in enumerate(metrics):
        step = step_of(record)
        x = step[1] if step else i
        for key, value in record.items():
            if word in key and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                out.setdefault(key, []).append([x, value])
    return out


def step_name(metrics: Sequence[Mapping[str, Any]]) -> str:
    """What the x axis counts ("round", "iteration", …), from the first record."""
    step = step_of(metrics[0]) if metrics else None
    return step[0] if step else "record"


def _axes_lines(ax: Any, series: Series, ylabel: str, xlabel: str) -> None:
    for key, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=key.replace("_", " "))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_curves(metrics: Sequence[Mapping[str, Any]]) -> Plot:
    """Loss and accuracy per iteration/round, side by side."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    xlabel = step_name(metrics)
    word = score_word(metrics)
    loss, score = metric_series(metrics, "loss"), metric_series(metrics, word)
    _axes_lines(ax_loss, loss, "loss", xlabel)
    _axes_lines(ax_acc, score, word, xlabel)
    return Plot("curves", f"Loss and {word}", fig, {"loss": loss, word: score})


def score_word(metrics: Sequence[Mapping[str, Any]]) -> str:
    """The quality metric the records carry: accuracy (classification) or r2 (regression)."""
    return "r2" if any("_r2" in k for r in metrics[:1] for k in r) and \
        not any("accuracy" in k for r in metrics[:1] for k in r) else "accuracy"


def per_client_values(metrics: Sequence[Mapping[str, Any]]) -> tuple[str, dict[int, list[float]]]:
    """Per-round per-client accuracies (or local losses when no client reports accuracy)."""
    for field in ("accuracy", "loss"):
        values: dict[int, list[float]] = {}
        for i, record in enumerate(metrics):
            step = step_of(record)
            # Not-sampled ("idle") clients are evaluated too: their accuracy counts here.
            got = [r[field] for r in client_rows(record) if r["status"] != "dropped" and r[field] is not None]
            if got:
                values[step[1] if step else i] = got
        if values:
            return field, values
    return "accuracy", {}


def plot_client_distribution(metrics: Sequence[Mapping[str, Any]]) -> Plot:
    """Box plot per round of the participating clients' accuracy (or local loss)."""
    field, values = per_client_values(metrics)
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    rounds = sorted(values)
    # Past ~30 boxes the plot turns to mush: show every k-th round.
    shown = rounds[:: max(1, math.ceil(len(rounds) / 30))]
    if shown:
        ax.boxplot([values[r] for r in shown], positions=range(len(shown)), widths=0.6)
        ax.set_xticks(range(len(shown)), [str(r) for r in shown], fontsize=7)
    ax.set_xlabel(step_name(metrics))
    ax.set_ylabel(f"client {field}")
    ax.grid(alpha=0.3)
    return Plot("clients", f"Per-client {field} per round", fig,
                {"field": field, "values": {str(r): values[r] for r in shown}})


def plot_label_histogram(clients: Mapping[str, Mapping[str, Any]], classes: Sequence[Any] | None) -> Plot:
    """Stacked bars: how many rows of each label every client holds (the partition's skew)."""
    ids = sorted(clients, key=lambda c: (len(c), c))
    hist = np.array([np.asarray(clients[c].get("label_hist", []), dtype=float) for c in ids]) \
        if ids else np.zeros((0, 0))
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(ids))
    n_labels = hist.shape[1] if hist.ndim == 2 else 0
    cmap = fig.colormaps["tab20"] if hasattr(fig, "colormaps") else None
    for k in range(n_labels):
        color = cmap(k % 20) if cmap is not None else None
        label = str(classes[k]) if classes is not None and k < len(classes) else str(k)
        ax.bar(range(len(ids)), hist[:, k], bottom=bottom, label=label, color=color)
        bottom += hist[:, k]
    ax.set_xticks(range(len(ids)), ids, fontsize=7)
    ax.set_xlabel("client")
    ax.set_ylabel("rows")
    if n_labels and n_labels <= 20:
        ax.legend(fontsize=7, ncols=min(n_labels, 10), title="label", title_fontsize=7)
    return Plot("labels", "Label histogram per client", fig, {"clients": ids, "label_hist": hist.tolist()})


def round_times(metrics: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per round: ``seconds`` (the record's own, else its slowest client) and ``dropped`` count."""
    out: dict[str, list[float]] = {"step": [], "seconds": [], "dropped": []}
    for i, record in enumerate(metrics):
        rows = client_rows(record)
        step = step_of(record)
        secs = record.get("seconds", record.get("time"))
        if not isinstance(secs, int | float):
            client_secs = [r["seconds"] for r in rows if r["seconds"] is not None]
            secs = max(client_secs) if client_secs else math.nan
        out["step"].append(step[1] if step else i)
        out["seconds"].append(float(secs))
        out["dropped"].append(sum(r["status"] == "dropped" for r in rows))
    return out


def plot_round_times(metrics: Sequence[Mapping[str, Any]]) -> Plot:
    """Time per round (line) and clients dropped per round (bars)."""
    data = round_times(metrics)
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(data["step"], data["seconds"], color="tab:blue", marker="o", markersize=3)
    ax.set_xlabel(step_name(metrics))
    ax.set_ylabel("seconds", color="tab:blue")
    ax2 = ax.twinx()
    ax2.bar(data["step"], data["dropped"], color="tab:red", alpha=0.35)
    ax2.set_ylabel("clients dropped", color="tab:red")
    ax2.set_ylim(0, max([1, *data["dropped"]]) * 1.2)
    ax.set_zorder(ax2.get_zorder() + 1)  # the time line in front of the drop-out bars
    ax.patch.set_visible(False)
    return Plot("rounds", "Round times and drop-outs", fig,
                {k: [None if isinstance(v, float) and math.isnan(v) else v for v in vals] for k, vals in data.items()})


def plot_confusion(matrix: np.ndarray, classes: Sequence[Any] | None = None) -> Plot:
    """Confusion matrix (rows: true label, columns: predicted) with counts in the cells."""
    matrix = np.asarray(matrix)
    labels = [str(c) for c in classes] if classes is not None else [str(i) for i in range(len(matrix))]
    fig = Figure(figsize=(4.8, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    if len(matrix) <= 12:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return Plot("confusion", "Confusion matrix (test split)", fig, {"matrix": matrix.tolist(), "classes": labels})


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def render_html(title: str, plots: Sequence[Plot], pngs: Sequence[bytes], table_html: str = "") -> str:
    """One self-contained page: every PNG inlined as base64, its numbers in ``data-series``."""
    figures = []
    for plot, png in zip(plots, pngs, strict=True):
        data = html.escape(json.dumps(plot.series), quote=True)
        b64 = base64.b64encode(png).decode("ascii")
        figures.append(
            f'<figure id="{plot.name}"><figcaption>{html.escape(plot.title)}</figcaption>'
            f'<img alt="{html.escape(plot.title)}" src="data:image/png;base64,{b64}" data-series="{data}">'
            "</figure>"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:20px;color:#222}figure{margin:18px 0}"
        "figcaption{font-weight:bold;margin-bottom:4px}img{max-width:100%;border:1px solid #ddd}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{table_html}{''.join(figures)}</body></html>\n"
    )


def table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain HTML table of ``rows`` (columns: the union of their keys, first-seen order)."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(header(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(row.get(c)))}</td>" for c in cols) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def header(column: str) -> str:
    """Column title of a table key (``train_loss`` → ``train loss``)."""
    return HEADERS.get(column, column.replace("_", " "))


def fmt(value: Any) -> str:
    """Short text for a table cell."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def median(values: Sequence[float]) -> float | None:
    """Median of the finite values, ``None`` when there are none."""
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def save_plots(plots: Sequence[Plot], out_dir: Path) -> list[bytes]:
    """Write each plot as ``out_dir/NAME.png``; returns the PNG bytes in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for plot in plots:
        png = png_bytes(plot.figure)
        (out_dir / f"{plot.name}.png").write_bytes(png)
        pngs.append(png)
    return pngs


def load_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` of a run directory (via :mod:`fedpipe.rundir`)."""
    return rundir.read_metrics(run_dir)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``m[i, j]`` of rows with true class ``i`` predicted as ``j``."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def run_row(run_dir: str | Path) -> dict[str, Any]:
    """One line of a comparison table: a run's final metrics and its timing."""
    run = rundir.load_run(run_dir)
    last = run.metrics[-1] if run.metrics else {}
    final = {**last, **run.summary.get("final", {})}
    step = step_of(last)
    federated = step is not None and step[0] == "round"
    seconds = [r["seconds"] for r in run.metrics if isinstance(r.get("seconds"), int | float)]
    row: dict[str, Any] = {
        "run": Path(run_dir).name,
        "mode": run.summary.get("strategy") or ("federated" if federated else "data-parallel"),
        "steps": len(run.metrics),
    }
    for key in ("train_loss", "test_loss", "test_accuracy"):
        value = final.get(key)
        row[key] = value if isinstance(value, int | float) else None
    row["s_per_step"] = median(seconds)
    row["seconds"] = sum(seconds) if seconds else None
    return row


def label_histograms(config: Mapping[str, Any], summary: Mapping[str, Any] | None = None
                     ) -> tuple[dict[str, Any], list | None] | None:
    """The run's partition ``clients`` metadata and class names, read from its store's attrs.

    The partition's name is in ``config`` when given by name, else in the ``summary`` (a
    partition made for the run by ``--clients``).
    """
    store_url = config.get("store")
    partition = config.get("partition") or (summary or {}).get("partition")
    if not store_url or not partition:
        return None
    try:
        info = read_info(str(store_url))
    except Exception:  # noqa: BLE001 - a moved or deleted store only costs the report one plot
        return None
    part = (info.partitions or {}).get(str(partition))
    return (part["clients"], info.classes) if part and part.get("clients") else None


def test_confusion(config: Mapping[str, Any], params: Mapping[str, np.ndarray], model: Any,
                   max_chunks: int = 64) -> tuple[np.ndarray, list | None] | None:
    """Confusion matrix of ``model`` with the run's ``params`` on its store's test split.

    Reads the top-level test rows chunk by chunk on the driver (a report is after the fact and
    reads at most ``max_chunks`` chunks). ``None`` for regression or a store that is gone.
    """
    if model is None or getattr(model, "task", "") not in ("binary", "multiclass"):
        return None
    try:
        info = read_info(str(config["store"]))
    except Exception:  # noqa: BLE001 - a moved or deleted store only costs the report one plot
        return None
    flat = pack(model, dict(params))
    n_classes = len(info.classes) if info.classes else 2
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    split = {"test_fraction": float(config.get("test_fraction", 0.2)), "seed": int(config.get("seed", 0))}
    for ref in chunk_refs(info)[:max_chunks]:
        X, y = read_chunk(info.url, ref, split="test", info=info, **split)
        if len(y):
            matrix += confusion_matrix(y, model.predict(flat, X), n_classes)
    return matrix, info.classes


def report_plots(run: rundir.Run, model: Any = None) -> list[Plot]:
    """Every plot that the run's files support, in report order."""
    plots = [plot_curves(run.metrics)]
    federated = any(client_rows(r) for r in run.metrics)
    if federated:
        plots += [plot_client_distribution(run.metrics), plot_round_times(run.metrics)]
    if (hists := label_histograms(run.config, run.summary)) is not None:
        plots.append(plot_label_histogram(*hists))
    if run.named and run.config.get("store") and (cm := test_confusion(run.config, run.named, model)):
        plots.append(plot_confusion(*cm))
    return plots


def write_report(run_dir: str | Path, model: Any = None) -> Path:
    """Write ``RUN_DIR/report.html`` (self-contained) and ``RUN_DIR/report/*.png``.

    Parameters
    ----------
    run_dir : path
        A run directory written by ``fedpipe train`` / ``fedpipe federate``.
    model : fedpipe.tasks.models.Model, optional
        The run's model, for the confusion matrix; without it the report rebuilds it from
        ``config.toml`` through :mod:`fedpipe.cli.registry` when it can, else leaves that plot out.

    Returns
    -------
    pathlib.Path
        The HTML file.
    """
    run_dir = Path(run_dir)
    run = rundir.load_run(run_dir)
    if model is None:
        model = model_from_config(run.config)
    plots = report_plots(run, model)
    pngs = save_plots(plots, run_dir / REPORT_DIR)
    out = run_dir / REPORT_HTML
    title = f"fedpipe report: {run_dir.resolve().name}"
    out.write_text(render_html(title, plots, pngs, table_html([run_row(run_dir)]) + _config_html(run.config)))
    return out


def model_from_config(config: Mapping[str, Any]) -> Any:
    """The run's model rebuilt from its saved options, or ``None`` when that is not possible."""
    if not config.get("model") or not config.get("store"):
        return None
    try:
        info = read_info(str(config["store"]))
        return registry.make_model(str(config["model"]), info, hidden=config.get("hidden"),
                                   l2=config.get("l2", 0.0), l1=config.get("l1", 0.0))
    except Exception:  # noqa: BLE001 - without a model the report just skips the confusion matrix
        return None


def _config_html(config: Mapping[str, Any]) -> str:
    if not config:
        return ""
    items = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(fmt(v))}</td></tr>"
                    for k, v in sorted(config.items()) if not isinstance(v, dict))
    return f"<details><summary>configuration</summary><table>{items}</table></details>"


def plot_compare(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Plot:
    """Overlay: each run's test (else train) loss and accuracy on shared axes."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    score = "accuracy" if any(score_word(m) == "accuracy" for m in runs.values()) else "r2"
    drawn: dict[str, Series] = {"loss": {}, score: {}}
    for name, metrics in runs.items():
        for ax, word in ((ax_loss, "loss"), (ax_acc, score)):
            series = metric_series(metrics, word)
            key = next((k for k in (f"test_{word}", f"train_{word}", word) if k in series), None)
            if key is not None:
                drawn[word][name] = series[key]
                xs, ys = zip(*series[key], strict=True)
                ax.plot(xs, ys, label=f"{name} ({key.replace('_', ' ')})")
    for ax, word in ((ax_loss, "loss"), (ax_acc, score)):
        ax.set_xlabel("iteration / round")
        ax.set_ylabel(word)
        ax.grid(alpha=0.3)
        if drawn[word]:
            ax.legend(fontsize=8)
    return Plot("compare", "Runs compared", fig, drawn)


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write an overlay plot and a table of several runs to ``out`` (an .html; PNG beside it).

    Returns the HTML path and the table rows (one per run, as in :func:`run_row`).
    """
    out = Path(out)
    names = _unique_names(run_dirs)
    plot = plot_compare({n: rundir.load_run(d).metrics for n, d in zip(names, run_dirs, strict=True)})
    rows = [{**run_row(d), "run": n} for n, d in zip(names, run_dirs, strict=True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    png = png_bytes(plot.figure)
    out.with_suffix(".png").write_bytes(png)
    out.write_text(render_html("fedpipe: runs compared", [plot], [png], table_html(rows)))
    return out, rows


def _unique_names(run_dirs: Sequence[str | Path]) -> list[str]:
    # Two runs called "run" in different parents: fall back to parent/name to tell them apart.
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):
        names = ["/".join(Path(d).resolve().parts[-2:]) for d in run_dirs]
    return names
