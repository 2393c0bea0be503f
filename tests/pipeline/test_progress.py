"""Progress bars: drawn on stderr from on_record, silent with --quiet/--json."""

from __future__ import annotations

import argparse
import io

from fedpipe.monitor.progress import (
    ProgressBar,
    chain,
    client_rows,
    describe,
    is_quiet,
    step_of,
    steps_done,
)
from rich.console import Console


def test_bar_shows_count_and_loss() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with ProgressBar(total=4, unit="round", console=console) as bar:
        for r in range(4):
            bar({"round": r, "train_loss": 1.0 / (r + 1), "test_accuracy": 0.9})
    text = out.getvalue()
    assert "4/4" in text and "train loss 0.25" in text and "ETA" in text
    assert bar.records == 4


def test_disabled_bar_is_silent(capsys) -> None:
    with ProgressBar(total=2, enabled=False) as bar:
        bar({"iteration": 1, "loss": 0.3})
    assert capsys.readouterr() == ("", "")
    assert is_quiet(argparse.Namespace(quiet=False, json=True))
    assert not is_quiet(argparse.Namespace(quiet=False, json=False))


def test_steps_done_follows_each_engines_numbering() -> None:
    assert steps_done({"iteration": 0}) == 0  # the initial evaluation
    assert steps_done({"epoch": 3}) == 3
    assert steps_done({"round": 0}) == 1  # round 0 has just finished
    assert steps_done({"loss": 1.0}) is None


def test_record_helpers() -> None:
    assert step_of({"epoch": 3, "loss": 1.0}) == ("epoch", 3)
    assert step_of({"loss": 1.0}) is None
    assert describe({"loss": float("nan"), "test_loss": 0.5}) == "test loss 0.5"
    seen: list[dict] = []
    chain(seen.append, None, seen.append)({"a": 1})
    assert seen == [{"a": 1}, {"a": 1}]


def test_client_rows_accepts_mapping_and_list_forms() -> None:
    as_map = client_rows({"clients": {"0": {"local_loss": 0.2, "time": 1.5, "update_bytes": 80}},
                          "dropped": {"1": "timeout"}})
    as_list = client_rows({"clients": [{"client": 0, "loss": 0.2, "seconds": 1.5, "update_size": 80},
                                       {"client": 1, "status": "dropped", "reason": "timeout"}]})
    for rows in (as_map, as_list):
        by_id = {r["id"]: r for r in rows}
        assert by_id["0"]["status"] == "ok" and by_id["0"]["loss"] == 0.2 and by_id["0"]["seconds"] == 1.5
        assert by_id["0"]["update_bytes"] == 80
        assert by_id["1"]["status"] == "dropped" and by_id["1"]["reason"] == "timeout"
    assert client_rows({"iteration": 1, "loss": 0.1}) == []


def test_evaluated_but_not_sampled_clients_are_idle() -> None:
    rows = client_rows({"round": 0, "clients": {"0": {"train_loss": 0.3, "test_accuracy": 0.8},
                                                "1": {"test_accuracy": 0.7}}})
    assert {r["id"]: r["status"] for r in rows} == {"0": "ok", "1": "idle"}
