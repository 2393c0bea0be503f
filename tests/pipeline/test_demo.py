"""`fedpipe demo --quick --json` end to end: stores, five runs (one on site-local stores), reports and a comparison."""

from __future__ import annotations

import json
from pathlib import Path

from fedpipe.cli.main import main


def test_quick_demo_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    status = main(["demo", "--quick", "--json", "--out", str(out), "--dashboard-address", ":0"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1  # --json: the summary line and nothing else on stdout
    summary = json.loads(lines[0])
    assert summary["dashboard"].endswith("/fedpipe/")
    runs = {row["run"]: row for row in summary["runs"]}
    assert set(runs) == {"digits-dp", "synthetic-dp", "synthetic-fedavg", "synthetic-fedprox",
                         "digits-sites"}
    assert runs["digits-dp"]["test_accuracy"] > 0.85  # softmax on digits learns fast
    assert runs["synthetic-fedavg"]["mode"] == "fedavg"
    for report in summary["reports"]:
        assert Path(report).is_file() and (Path(report).parent / "report" / "curves.png").stat().st_size > 0
    fed_report = out / "runs" / "synthetic-fedavg" / "report"
    assert {p.name for p in fed_report.glob("*.png")} >= {"curves.png", "clients.png", "labels.png", "rounds.png"}
    assert (out / "runs" / "digits-dp" / "report" / "confusion.png").is_file()
    # three sites, each ingested on its own; the run's statistics were computed federatedly
    assert sorted(p.name for p in (out / "data").glob("site-*/store.zarr")) == ["store.zarr"] * 3
    assert runs["digits-sites"]["test_accuracy"] > 0.85
    site_run = json.loads((out / "runs" / "digits-sites" / "summary.json").read_text())
    assert site_run["sites"] == 3 and site_run["preprocess"]["computed"] == "federated"
    assert Path(summary["compare"]).is_file() and Path(summary["compare"]).with_suffix(".png").is_file()
