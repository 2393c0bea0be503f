"""``fedpipe ingest / info / partition`` through ``fedpipe.cli.main.main``: exit codes, one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from fedpipe.cli.main import main
from fedpipe.data.store import chunk_key


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_ingest_partition_info_round_trip(tmp_path, capsys):
    store = str(tmp_path / "wine.zarr")
    assert main(["ingest", "sklearn:wine", store, "--chunk-rows", "40", "--standardize", "--json"]) == 0
    summary = _json(capsys)
    assert summary["n_rows"] == 178 and summary["n_chunks"] == 5 and summary["preprocess"]["standardize"]
    assert main(["partition", store, "--clients", "3", "--scheme", "dirichlet", "--alpha", "0.5",
                 "--seed", "1", "--json"]) == 0
    part = _json(capsys)
    assert sum(c["n_rows"] for c in part["clients"].values()) == 178
    assert main(["info", store, "--verify", "--json"]) == 0
    info = _json(capsys)
    assert info["verify"]["missing"] == [] and info["verify"]["content_hash_ok"] is True
    assert info["partitions"]["default"]["scheme"] == "dirichlet"
    assert main(["info", store]) == 0  # the rich tables render
    out = capsys.readouterr().out
    assert "partition 'default'" in out and "alcohol" in out


def test_info_verify_reports_bad_chunks_and_exits_2(tmp_path, capsys):
    store = str(tmp_path / "iris.zarr")
    assert main(["ingest", "sklearn:iris", store, "--chunk-rows", "30", "-q"]) == 0
    os.remove(os.path.join(store, chunk_key("", "X", 1)))
    path = os.path.join(store, chunk_key("", "y", 3))
    data = bytearray(open(path, "rb").read())
    data[4] ^= 0xFF
    open(path, "wb").write(bytes(data))
    capsys.readouterr()
    assert main(["info", store, "--verify", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedpipe info: error: {store}: missing chunks X/y#1; corrupt chunks X/y#3"]


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [(["ingest", "BAD.csv", "OUT", "--categorical", "town"],
      "--categorical column 'town' is not a feature column"),
     (["ingest", "NAN.csv", "OUT"], "column 'b' has NaN at row 2"),
     (["ingest", "RAGGED.csv", "OUT"], "RAGGED.csv: malformed row (Expected 3 fields in line 3, saw 4)"),
     (["ingest", "OK.csv", "OUT", "--target", "zz"], "target column 'zz' not found"),
     (["ingest", "OK.csv", "OUT", "--chunk-rows", "-5"], "argument --chunk-rows: must be an integer >= 1"),
     (["ingest", "sklearn:nope", "OUT"], "unknown sklearn dataset 'nope'"),
     (["info", "OUT"], "no zarr v3 store"),
     (["partition", "OUT", "--clients", "2"], "no zarr v3 store")],
)
def test_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, culprit):
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, np.nan], "target": [0, 1, 0]})
    frame.to_csv(tmp_path / "NAN.csv", index=False)
    frame.fillna(0).assign(city="x").to_csv(tmp_path / "BAD.csv", index=False)
    frame.fillna(0).to_csv(tmp_path / "OK.csv", index=False)
    (tmp_path / "RAGGED.csv").write_text("a,b,target\n1,2,0\n3,4,1,9\n5,6,0\n")
    argv = [str(tmp_path / a) if a in ("BAD.csv", "NAN.csv", "OK.csv", "RAGGED.csv", "OUT") else a
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and culprit in err[0], err
    assert not (tmp_path / "OUT").exists()


def test_existing_store_without_overwrite_exits_2(tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", "sklearn:iris", store, "-q"]) == 0
    assert main(["ingest", "sklearn:iris", store, "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["ingest", "sklearn:iris", store, "-q", "--overwrite"]) == 0


def test_npy_with_labels_ingests_like_the_npz_of_the_same_arrays(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    npy, npz = str(tmp_path / "npy.zarr"), str(tmp_path / "npz.zarr")
    assert main(["ingest", str(tmp_path / "X.npy"), npy, "--labels", str(tmp_path / "y.npy"),
                 "--chunk-rows", "50", "--json"]) == 0
    from_npy = _json(capsys)
    assert main(["ingest", str(tmp_path / "d.npz"), npz, "--chunk-rows", "50", "--json"]) == 0
    from_npz = _json(capsys)
    assert from_npy["n_rows"] == 120 and from_npy["task"] == "binary" and from_npy["n_chunks"] == 3
    assert from_npy["content_hash"] == from_npz["content_hash"]


@pytest.mark.parametrize(("extra", "culprit"), [
    ([], "--labels Y.npy"),                                   # X alone has no labels
    (["--labels", "missing.npy"], "--labels missing.npy"),
])
def test_npy_without_usable_labels_is_one_line(tmp_path, capsys, extra, culprit):
    np.save(tmp_path / "X.npy", np.zeros((10, 2)))
    argv = ["ingest", str(tmp_path / "X.npy"), str(tmp_path / "out.zarr"), *extra]
    assert main([a if a != "missing.npy" else str(tmp_path / a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and culprit.split()[0] in err[0] and "--labels" in err[0], err
    assert not (tmp_path / "out.zarr").exists()
