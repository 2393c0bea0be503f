"""The HTML report and the comparison: PNGs exist, are non-empty and plot what metrics.jsonl holds."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from fedpipe import rundir
from fedpipe.cli.main import main
from fedpipe.data.ingest import ingest
from fedpipe.monitor import report
from fedpipe.tasks import models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def federated_records(rounds: int = 5) -> list[dict]:
    records = []
    for r in range(1, rounds + 1):
        clients = {str(c): {"loss": 1.0 / r + c / 10, "accuracy": 0.5 + r / 20 - c / 50, "seconds": 0.2 + c / 10,
                            "update_bytes": 1024} for c in range(4) if c != r % 4}
        records.append({"round": r, "train_loss": 1.0 / r, "test_loss": 1.2 / r, "test_accuracy": 0.5 + r / 20,
                        "seconds": 0.5 + r / 10, "clients": clients, "dropped": {str(r % 4): "timeout"}})
    return records


def make_run(run_dir: Path, records: list[dict], config: dict | None = None, params: dict | None = None) -> Path:
    rundir.prepare(run_dir)
    for record in records:
        rundir.append_metrics(run_dir, record)
    rundir.write_summary(run_dir, {"mode": "federate", **{k: v for k, v in records[-1].items() if k != "clients"}})
    if config:
        rundir.write_config(run_dir, config)
    if params:
        rundir.write_params(run_dir, params)
    return run_dir


def embedded_series(page: str) -> dict[str, dict]:
    """figure id -> the numbers embedded next to its PNG."""
    found = re.findall(r'<figure id="(\w+)">.*?data-series="([^"]*)"', page)
    return {name: json.loads(html.unescape(data)) for name, data in found}


def test_report_plots_equal_metrics(tmp_path) -> None:
    records = federated_records()
    run_dir = make_run(tmp_path / "fed", records)
    page = report.write_report(run_dir).read_text()
    for name in ("curves", "clients", "rounds"):
        png = (run_dir / "report" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    series = embedded_series(page)
    on_disk = rundir.read_metrics(run_dir)
    assert series["curves"]["loss"]["train_loss"] == [[r["round"], r["train_loss"]] for r in on_disk]
    assert series["curves"]["accuracy"]["test_accuracy"] == [[r["round"], r["test_accuracy"]] for r in on_disk]
    expected = {str(r["round"]): [c["accuracy"] for c in r["clients"].values()] for r in on_disk}
    assert series["clients"] == {"field": "accuracy", "values": expected}
    assert series["rounds"]["seconds"] == [r["seconds"] for r in on_disk]
    assert series["rounds"]["dropped"] == [1] * len(on_disk)
    assert "data:image/png;base64," in page and "<script" not in page


def test_label_histogram_and_confusion_from_store(tmp_path) -> None:
    store = str(tmp_path / "digits.zarr")
    info = ingest("sklearn:digits", store, chunk_rows=400, progress=False)
    model = models.softmax(info.n_features, len(info.classes))
    params = model.unpack(model.init(0))
    config = {"store": store, "seed": 0, "test_fraction": 0.2}
    run_dir = make_run(tmp_path / "dp", [{"iteration": t, "train_loss": 2.0 / t} for t in range(1, 4)], config, params)
    page = report.write_report(run_dir, model=model).read_text()
    matrix = np.array(embedded_series(page)["confusion"]["matrix"])
    assert matrix.shape == (10, 10)
    assert 0.1 * info.n_rows < matrix.sum() < 0.3 * info.n_rows  # the 20 % test split
    assert (run_dir / "report" / "confusion.png").stat().st_size > 5_000

    clients = {"0": {"label_hist": [5, 0, 1]}, "1": {"label_hist": [0, 7, 2]}}
    plot = report.plot_label_histogram(clients, ["a", "b", "c"])
    assert plot.series == {"clients": ["0", "1"], "label_hist": [[5, 0, 1], [0, 7, 2]]}
    assert report.png_bytes(plot.figure).startswith(PNG_MAGIC)


def test_cli_report_and_compare(tmp_path, capsys) -> None:
    fed = make_run(tmp_path / "fedavg", federated_records(4))
    dp = make_run(tmp_path / "dp", [{"iteration": t, "train_loss": 1.5 / t, "test_accuracy": 0.6 + t / 50}
                                    for t in range(1, 8)])
    assert main(["report", str(fed), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(out["report"]).is_file() and len(out["pngs"]) == 3

    target = tmp_path / "cmp" / "both.html"
    assert main(["compare", str(fed), str(dp), "--out", str(target), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["run"] for row in out["runs"]] == ["fedavg", "dp"]
    assert out["runs"][1]["steps"] == 7 and out["runs"][0]["test_accuracy"] == pytest.approx(0.7)
    drawn = embedded_series(target.read_text())["compare"]
    assert drawn["loss"]["fedavg"] == [[r, 1.2 / r] for r in range(1, 5)]
    assert drawn["accuracy"]["dp"] == [[t, 0.6 + t / 50] for t in range(1, 8)]
    assert target.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)

    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_report_option_helpers(tmp_path) -> None:
    import argparse

    from fedpipe.cli import report as cli_report
    from fedpipe.errors import ValidationError

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    cli_report.add_report_option(parser)
    with pytest.raises(ValidationError, match="--report needs --out"):
        cli_report.check_report_option(parser.parse_args(["--report"]))
    run_dir = make_run(tmp_path / "run", federated_records(2))
    args = parser.parse_args(["--report", "--out", str(run_dir)])
    cli_report.check_report_option(args)
    summary = cli_report.report_at_end(args, {"rounds": 2})
    assert summary["rounds"] == 2 and Path(summary["report"]).is_file()
    assert "report" not in cli_report.report_at_end(parser.parse_args(["--out", str(run_dir)]), {})


def test_regression_runs_plot_r2() -> None:
    records = [{"iteration": t, "train_loss": 1.0 / (t + 1), "test_rmse": 2.0, "test_r2": t / 10} for t in range(3)]
    plot = report.plot_curves(records)
    assert plot.series["r2"]["test_r2"] == [[0, 0.0], [1, 0.1], [2, 0.2]]
    assert "accuracy" not in plot.series
