"""``fedpipe predict``'s engine: stream a source through a saved model into a Parquet file.

The source is read a block of rows at a time (CSV ``chunksize``, Parquet ``iter_batches``, one
zarr chunk, a slice of an ``.npz``), predicted, and appended to the output with
``pyarrow.parquet.ParquetWriter``, so memory stays bounded by a few blocks whatever the input
size. When the source carries the label column the same pass sums the test metrics
(:func:`fedpipe.tasks.reduce.eval_sums`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from fedpipe.errors import ValidationError
from fedpipe.model.predict import predict_block, proba_columns, raw_features
from fedpipe.model.saved import SavedModel
from fedpipe.tasks import encode, reduce

BLOCK_ROWS = 65_536
# (raw block, labels or None, encoded?, progress units)
Block = tuple[Any, np.ndarray | None, bool, int]


def predict_to_parquet(saved: SavedModel, source: str, out: str | os.PathLike[str], *,
                       proba: bool = False, target: str | None = None,
                       block_rows: int = BLOCK_ROWS, progress: bool = False) -> dict[str, Any]:
    """Predict every row of ``source`` and write ``out`` (Parquet); returns a summary.

    ``out`` holds a ``prediction`` column (original labels), plus ``proba_<label>`` columns with
    ``proba``. The summary has ``rows``, ``out`` and, when ``source`` has the label column (the
    run's target, or ``target``), the test metrics (``test_accuracy`` or ``test_rmse``/``test_r2``
    and ``test_loss``).
    """
    import pyarrow.parquet as pq
    from fedpipe.data.ingest import _progress

    enc = saved.encoding
    blocks, total = open_blocks(saved, str(source), target or enc.target, block_rows)
    sums, n, writer = None, 0, None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with _progress(progress, total, "predict") as bar:
            task = bar.add_task("predict", total=total)
            for X, y, encoded, units in blocks:
                # a sparse store's model takes its rows as they are (no columns to encode)
                features = X if encoded or enc.sparse_width is not None else raw_features(enc, X)
                table = _table(saved, features, proba)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                if y is not None:
                    model_input = (features if enc.sparse_width is not None
                                   else encode.apply(enc.pre, features))
                    part = reduce.eval_sums(saved.model, saved.params,
                                            (model_input, _targets(enc, y)))
                    sums = part if sums is None else sums + part
                n += table.num_rows
                bar.update(task, advance=units)
        if writer is None:
            raise ValidationError(f"source {source} has no rows")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    summary: dict[str, Any] = {"rows": n, "out": str(out), "source": str(source)}
    if sums is not None:
        summary.update(reduce.finish_metrics(sums, saved.model.task))
    return summary


def _table(saved: SavedModel, features: np.ndarray, proba: bool):
    import pyarrow as pa

    columns = {"prediction": pa.array(predict_block(saved, features, encoded=True))}
    if proba:
        probabilities = predict_block(saved, features, proba=True, encoded=True)
        for j, name in enumerate(proba_columns(saved.encoding)):
            columns[name] = pa.array(probabilities[:, j])
    return pa.table(columns)


def _targets(enc, y: np.ndarray) -> np.ndarray:
    """Labels as the model's class indices (regression: float targets)."""
    if enc.task == "regression":
        return np.asarray(y, dtype=np.float64)
    index = encode.codes(y, enc.classes)
    if (index < 0).any():
        bad = np.asarray(y, dtype=object)[index < 0][0]
        raise ValidationError(f"label {bad!r} is not one of the run's classes {enc.classes}")
    return index


# ---------------------------------------------------------------------------------------------
# sources


def open_blocks(saved: SavedModel, source: str, target: str | None,
                block_rows: int) -> tuple[Iterator[Block], int]:
    """Blocks of ``source`` and the progress total (rows, or bytes of a CSV)."""
    lower = source.lower()
    if saved.encoding.sparse_width is not None and lower.endswith(
            (".csv", ".csv.gz", ".txt", ".parquet", ".pq")):
        raise ValidationError(f"the model was trained on a sparse store: predict on a sparse "
                              f"store (fp.ingest_sparse) or a .npz/.npy array, not {source}")
    if lower.endswith((".csv", ".csv.gz", ".txt")):
        _exists(source)
        return _csv_blocks(source, target, saved.encoding.columns, block_rows), os.path.getsize(source)
    if lower.endswith((".parquet", ".pq")):
        _exists(source)
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(source)
        except Exception as exc:  # pyarrow raises ArrowInvalid for truncated/foreign files
            raise ValidationError(f"source {source} is not a readable Parquet file ({exc})") from None
        return _parquet_blocks(file, target, saved.encoding.columns, block_rows), file.metadata.num_rows
    if lower.endswith((".npz", ".npy")):
        _exists(source)
        X, y = _numpy(source)
        return _array_blocks(X, y, block_rows), len(X)
    return _store_blocks(saved, source)


def _exists(source: str) -> None:
    if not os.path.exists(source):
        raise ValidationError(f"source {source} does not exist")


def _split_target(frame, target: str | None, columns: list[str]):
    if target is None:  # a run from a store without a target name: ingest's default names
        from fedpipe.data.sources import TARGET_GUESSES

        target = next((t for t in TARGET_GUESSES if t in frame.columns and t not in columns), None)
    if target is not None and target in frame.columns:
        return frame.drop(columns=[target]), frame[target].to_numpy()
    return frame, None


def _csv_blocks(path: str, target: str | None, columns: list[str], block_rows: int) -> Iterator[Block]:
    import pandas as pd

    with open(path, "rb") as handle:
        done = 0
        for frame in pd.read_csv(handle, chunksize=block_rows, low_memory=False):
            X, y = _split_target(frame, target, columns)
            position = handle.tell()
            yield X, y, False, position - done
            done = position


def _parquet_blocks(file, target: str | None, columns: list[str], block_rows: int) -> Iterator[Block]:
    for batch in file.iter_batches(batch_size=block_rows):
        X, y = _split_target(batch.to_pandas(), target, columns)
        yield X, y, False, len(X)


def _numpy(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    if path.lower().endswith(".npy"):
        return np.load(path, mmap_mode="r", allow_pickle=False), None
    with np.load(path, allow_pickle=False) as data:
        if "X" not in data:
            raise ValidationError(f"source {path}: no array 'X' (has {', '.join(data.files)})")
        return data["X"], (data["y"] if "y" in data else None)


def _array_blocks(X: np.ndarray, y: np.ndarray | None, block_rows: int) -> Iterator[Block]:
    for start in range(0, len(X), block_rows):
        stop = min(start + block_rows, len(X))
        yield X[start:stop], (None if y is None else y[start:stop]), False, stop - start


def _store_blocks(saved: SavedModel, url: str) -> tuple[Iterator[Block], int]:
    from fedpipe.data.store import chunk_refs, open_group, read_info, read_raw_chunk

    info = read_info(url)
    if info.sparse:
        return sparse_store_blocks(saved, url, info), info.n_rows
    if list(info.feature_names) != list(saved.encoding.feature_names):
        raise ValidationError(f"store {url} does not have the features the model was trained on")

    def blocks() -> Iterator[Block]:
        group = open_group(url)
        for ref in chunk_refs(info):
            X, y = read_raw_chunk(group, info, ref)
            # a store keeps class indices of its own classes: back to the labels
            yield X, (np.asarray(info.classes)[y] if info.classes else y), True, len(y)

    return blocks(), info.n_rows


def sparse_store_blocks(saved: SavedModel, url: str, info) -> Iterator[Block]:
    """Row chunks of a sparse store as CSR matrices (every feature block), with their labels."""
    from fedpipe.data.sparse import read_block_csr
    from fedpipe.data.store import chunk_refs

    if not info.sparse or info.n_features != saved.encoding.sparse_width:
        raise ValidationError(f"store {url} is not a sparse store of "
                              f"{saved.encoding.sparse_width} columns, as the model's was")
    for ref in chunk_refs(info):
        X, y = read_block_csr(url, info, ref, (0, info.n_features))
        yield X, (np.asarray(info.classes)[y] if info.classes else y), True, len(y)
