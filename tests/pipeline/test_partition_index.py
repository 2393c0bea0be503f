"""A partition is an index over one client-sorted copy: rows, files, reads, commits, checks."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import zlib

import numpy as np
import pytest
from fedpipe.cli.main import COMMAND_MODULES, main
from fedpipe.data.partition import partition
from fedpipe.data.store import (
    ChunkRef,
    apply_preprocess,
    chunk_key,
    chunk_refs,
    open_group,
    read_chunk,
    read_info,
    read_raw_chunk,
    verify_store,
)
from fedpipe.engine import placement
from fedpipe.errors import StoreError
from fedpipe.tasks import partition as part_math
from fedpipe.tasks import split as split_math


def _files(root: str) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def _stored_rows(store: str) -> tuple[np.ndarray, np.ndarray]:
    group = open_group(store)
    return group["X"][:], group["y"][:]


def _old_layout_chunks(X, y, assignment, k: int, rows: int):
    """Client ``k``'s chunks as the per-client-array layout stored them: its rows in store
    order (a row mask per source chunk, concatenated), cut in chunks of ``rows``."""
    Xk, yk = X[assignment == k], y[assignment == k]
    return [(Xk[i : i + rows], yk[i : i + rows]) for i in range(0, len(yk), rows)]


def _worker_rows(url, name, client):
    return placement.client_rows(url, name, client, test_fraction=0.2, seed=0)[0]


def test_clients_get_the_old_layouts_rows_in_the_same_order(small_store, dask_client):
    # 40-row chunks and Dirichlet sizes: client ranges start and end inside stored chunks.
    store = small_store(chunk_rows=40, standardize=True)
    partition(store, clients=7, scheme="dirichlet", alpha=0.5, seed=4, name="skew")
    info = read_info(store)
    X, y = _stored_rows(store)
    assignment = part_math.dirichlet(y.astype(np.int64), 7, 0.5, 4, 1)  # computed here, apart
    for k in range(7):
        expected = _old_layout_chunks(X, y, assignment, k, 40)
        refs = chunk_refs(info, "skew", k)
        assert [r.index for r in refs] == list(range(len(expected)))
        train_parts, test_parts = [], []
        for ref, (Xc, yc) in zip(refs, expected, strict=True):
            got = read_raw_chunk(open_group(store), info, ref)
            np.testing.assert_array_equal(got[0], Xc)
            np.testing.assert_array_equal(got[1], yc)
            # The train/test mask is keyed by (client prefix, chunk index) as before.
            mask = split_math.test_mask(len(yc), zlib.crc32(f"partitions/skew/{k}:{ref.index}".encode()),
                                        0.2, 0)
            Xp = apply_preprocess(Xc, info)
            train_parts.append((Xp[~mask], yc[~mask]))
            test_parts.append((Xp[mask], yc[mask]))
            Xt, yt = read_chunk(store, ref, split="train", test_fraction=0.2, seed=0, info=info)
            np.testing.assert_array_equal(Xt, Xp[~mask])
        # What a federated client trains and evaluates on, read on a real worker.
        X_tr, y_tr, X_te, y_te = dask_client.submit(_worker_rows, store, "skew", str(k),
                                                    pure=False).result()
        np.testing.assert_array_equal(X_tr, np.concatenate([p[0] for p in train_parts]))
        np.testing.assert_array_equal(y_tr, np.concatenate([p[1] for p in train_parts]))
        np.testing.assert_array_equal(X_te, np.concatenate([p[0] for p in test_parts]))
        np.testing.assert_array_equal(y_te, np.concatenate([p[1] for p in test_parts]))


def test_files_written_do_not_grow_with_the_number_of_clients(small_store):
    store = small_store(source="synthetic:classification?n_samples=2000&n_features=4&n_classes=2"
                        "&seed=0", chunk_rows=100)
    partition(store, clients=10, name="ten")
    partition(store, clients=1000, name="thousand")
    ten, thousand = (_files(os.path.join(store, "partitions", n)) for n in ("ten", "thousand"))
    assert ten == thousand <= 3 * 20 + 8  # X, y, assignment chunks + 7 metadata files
    assert read_info(store).partitions["thousand"]["clients"]["999"]["n_rows"] == 2


def test_a_client_reads_only_the_stored_chunks_that_hold_its_rows(small_store):
    store = small_store(chunk_rows=50)
    partition(store, clients=10, name="p")  # iid: 60 rows each; client 3 is rows 180..239
    info = read_info(store)
    path = info.partitions["p"]["path"]
    X, y = _stored_rows(store)
    for i in set(range(12)) - {3, 4}:  # keep only the stored chunks 3 and 4
        for name in ("X", "y"):
            os.remove(os.path.join(store, chunk_key(path, name, i)))
    assignment = part_math.iid(600, 10, 0)
    got = [read_chunk(store, ref, info=info) for ref in chunk_refs(info, "p", 3)]
    np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), X[assignment == 3])
    with pytest.raises(StoreError, match=f"chunk 0 of {path}/X is missing"):
        read_chunk(store, ChunkRef("partitions/p/0", 0), info=info)


def test_a_failed_repartition_keeps_the_committed_one(small_store):
    store = small_store(chunk_rows=50)
    before = partition(store, clients=3, name="p")
    chunk = os.path.join(store, chunk_key("", "X", 4))
    data = bytearray(open(chunk, "rb").read())
    data[8] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(StoreError, match="chunk 4 of X .* is corrupt"):
        partition(store, clients=5, name="p")
    info = read_info(store)
    assert info.partitions["p"]["path"] == before["path"] and len(info.partitions["p"]["clients"]) == 3
    assert sorted(os.listdir(os.path.join(store, "partitions", "p"))) == sorted(
        ["partition.json", "zarr.json", before["path"].rsplit("/", 1)[1]])
    assert sum(len(read_chunk(store, r, info=info)[1]) for r in chunk_refs(info, "p")) == 600


def _partition_command(barrier, argv: list[str]) -> None:
    from fedpipe.cli.main import main as cli_main

    barrier.wait(timeout=60)  # all four past start-up, so their writes overlap
    sys.exit(cli_main(argv))


def test_four_concurrent_partition_processes_all_commit(small_store):
    store = small_store(source="synthetic:classification?n_samples=6000&n_features=5&n_classes=3"
                        "&seed=0", chunk_rows=100)
    # Four OS processes running the `fedpipe partition` command on one store. A forkserver
    # that imported fedpipe once starts them (the CLI's imports cost seconds each), and it
    # forks from a process without the test's threads.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fedpipe.cli.main", *COMMAND_MODULES])
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_partition_command, args=(barrier, [
        "partition", store, "--clients", "300", "--seed", str(k), "--name", f"p{k}", "-q"]))
        for k in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 4
    info = read_info(store)
    assert sorted(info.partitions) == ["p0", "p1", "p2", "p3"]
    for k in range(4):
        assert sum(c["n_rows"] for c in info.partitions[f"p{k}"]["clients"].values()) == 6000
    assert verify_store(store).ok


def test_verify_catches_a_swapped_chunk_of_the_sorted_copy(small_store, capsys):
    store = small_store(chunk_rows=50)
    partition(store, clients=4, name="p")
    path = read_info(store).partitions["p"]["path"]
    a, b = (os.path.join(store, chunk_key(path, "X", i)) for i in (1, 2))
    data_a, data_b = open(a, "rb").read(), open(b, "rb").read()
    open(a, "wb").write(data_b)  # each chunk still passes its own crc32c
    open(b, "wb").write(data_a)
    report = verify_store(store)
    # each chunk's digest in the partition record names them (the content hash only told)
    assert not report.missing and report.corrupt == [ChunkRef(path, 1), ChunkRef(path, 2)]
    assert not report.ok
    assert main(["info", store, "--verify", "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fedpipe info: error: {store}: corrupt chunks {path}#1, {path}#2")
    assert main(["info", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["partitions"]["p"]["path"] == path


def test_a_store_larger_than_the_window_gives_the_same_copy(small_store, monkeypatch):
    from fedpipe.data import partition as partition_mod

    store = small_store(chunk_rows=40)
    one = partition(store, clients=9, scheme="quantity", seed=2, name="one")
    monkeypatch.setattr(partition_mod, "WINDOW_BYTES", 1)  # one stored chunk per window
    many = partition(store, clients=9, scheme="quantity", seed=2, name="many")
    assert one["content_hash"] == many["content_hash"] and one["clients"] == many["clients"]
    group = open_group(store)
    np.testing.assert_array_equal(group[one["path"] + "/X"][:], group[many["path"] + "/X"][:])


def test_a_damaged_client_table_is_refused_in_one_line(small_store, capsys):
    store = small_store(chunk_rows=50)
    meta = partition(store, clients=4, name="p")
    table = os.path.join(store, meta["path"], "clients.json")
    text = open(table).read()
    open(table, "w").write(text.replace('"n_rows":[150', '"n_rows":[151', 1))
    with pytest.raises(StoreError, match=f"client table {meta['path']}/clients.json of partition 'p' is corrupt"):
        read_info(store)
    os.remove(table)
    assert main(["info", store, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("clients.json of partition 'p' is missing in " + f"file://{store}")


def test_partitions_on_an_fsspec_store_replace_and_verify():
    import fsspec

    url = "memory://fedpipe-tests/partitioned.zarr"
    from fedpipe.data.ingest import ingest

    ingest("sklearn:iris", url, chunk_rows=30, progress=False, overwrite=True)
    old = partition(url, clients=4, name="a")
    new = partition(url, clients=3, name="a")
    fs = fsspec.filesystem("memory")
    assert fs.exists(f"/fedpipe-tests/partitioned.zarr/{new['path']}")
    assert not fs.exists(f"/fedpipe-tests/partitioned.zarr/{old['path']}")
    info = read_info(url)
    assert sum(len(read_chunk(url, r, info=info)[1]) for r in chunk_refs(info, "a")) == 150
    assert verify_store(url).ok


def test_rows_read_are_the_callers_own_even_when_clients_share_a_stored_chunk(small_store):
    store = small_store(chunk_rows=100)
    partition(store, clients=20, name="p")  # 30 rows each: clients 0..2 share stored chunk 0
    info = read_info(store)
    X, _ = _stored_rows(store)
    assignment = part_math.iid(600, 20, 0)
    first = read_raw_chunk(open_group(store), info, ChunkRef("partitions/p/0", 0))[0]
    first[:] = -1.0  # the caller may change its rows in place
    for k in (0, 1, 2):
        got = read_raw_chunk(open_group(store), info, ChunkRef(f"partitions/p/{k}", 0))[0]
        np.testing.assert_array_equal(got, X[assignment == k])
