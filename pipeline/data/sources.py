"""Data sources for ingest: each yields ``(X, y)`` batches of float64 rows plus a schema.

In-memory sources (``sklearn:NAME``, ``synthetic:...``, ``.npz``, ``.npy`` with its labels in
a second ``.npy``) are sliced into batches (a ``.npy`` is memory-mapped, so it is read batch by
batch too);
CSV and Parquet are streamed (``pandas.read_csv(chunksize=)``,
``pyarrow.parquet.ParquetFile.iter_batches``) so a file larger than memory never is whole.
Schema problems (a non-numeric column, a missing target, mismatched lengths) are raised as
:class:`~fedpipe.errors.ValidationError` naming the culprit.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import numpy as np
from fedpipe.errors import ValidationError
from fedpipe.tasks import encode

Batches = Iterator[tuple[np.ndarray, np.ndarray]]

SKLEARN = {
    "digits": ("load_digits", "multiclass"),
    "wine": ("load_wine", "multiclass"),
    "breast_cancer": ("load_breast_cancer", "binary"),
    "diabetes": ("load_diabetes", "regression"),
    "iris": ("load_iris", "multiclass"),
}
SYNTHETIC_PARAMS = {
    "classification": {"n_samples": 1000, "n_features": 20, "n_classes": 2, "n_informative": 0,
                       "seed": 0, "class_sep": 1.0},
    "regression": {"n_samples": 1000, "n_features": 20, "n_informative": 0, "noise": 1.0, "seed": 0},
}
TARGET_GUESSES = ("target", "y", "label")
MAX_CATEGORIES = 1000  # distinct values of a one-hot column (or of string labels)
SAMPLE_ROWS = 1000  # rows read up front to see which columns hold text


@dataclass
class Source:
    """A validated source: schema known up front, rows delivered by ``batches()``."""

    name: str
    feature_names: list[str]
    task: str | None  # known for sklearn/synthetic; None means "infer from y"
    n_rows: int | None  # None while streaming an unknown number of rows
    progress_total: int  # units for the progress bar: rows, or bytes of a streamed file
    batches: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray, int]]]  # rows -> (X, y, units)
    in_memory: bool = False  # already whole in memory: larger write blocks cost nothing
    classes: list | None = None  # original labels when y holds their indices (string/bool labels)
    categorical: dict[str, list] = field(default_factory=dict)  # column -> one-hot categories
    columns: list[str] | None = None  # input columns before one-hot (default feature_names)
    target: str | None = None  # label column of a table
    dtypes: dict[str, str] = field(default_factory=dict)  # input column -> dtype as read


def open_source(spec: str, *, target: str | None = None, labels: str | None = None,
                categorical: Iterable[str] | None = None) -> Source:
    """Parse a SOURCE string and check its schema; no rows are read yet for CSV/Parquet.

    ``labels`` is the ``.npy`` file of ``y`` for a ``.npy`` source, which holds only ``X``.
    ``categorical`` names feature columns of a CSV/Parquet table to one-hot encode; a column
    holding text is one-hot encoded without being named. String or boolean labels are kept as
    ``classes`` and ``y`` holds their indices. Finding the categories takes one pass over those
    columns only.
    """
    spec = str(spec)
    named = list(categorical or [])
    lower = spec.lower()
    if labels is not None and not lower.endswith(".npy"):
        raise ValidationError(f"--labels applies to a .npy source (X only), not {spec}")
    table = os.path.exists(spec) and lower.endswith((".csv", ".csv.gz", ".txt", ".parquet", ".pq"))
    if named and not table:
        raise ValidationError(f"--categorical applies to CSV/Parquet sources, not {spec}")
    if table and lower.endswith((".parquet", ".pq")):
        return _parquet(spec, target, named)
    if table:
        return _csv(spec, target, named)
    return _open(spec, target, labels)


def _open(spec: str, target: str | None, labels: str | None) -> Source:
    if spec.startswith("sklearn:"):
        return from_arrays(spec, *_sklearn(spec.split(":", 1)[1]), target)
    if spec.startswith("synthetic:"):
        return from_arrays(spec, *_synthetic(spec.split(":", 1)[1]), target)
    lower = spec.lower()
    if not os.path.exists(spec):
        raise ValidationError(f"source {spec} does not exist")
    if lower.endswith(".npz"):
        return from_arrays(spec, *_npz(spec), target)
    if lower.endswith(".npy"):
        return from_arrays(spec, *_npy(spec, labels), target)
    raise ValidationError(
        f"source {spec}: unknown kind (use .npz, .npy --labels Y.npy, .csv, .parquet, "
        "sklearn:NAME or synthetic:KIND?...)"
    )


def from_arrays(
    spec: str, X: np.ndarray, y: np.ndarray, names: list[str] | None, task: str | None,
    target: str | None = None,
) -> Source:
    """A source over in-memory arrays (checked: 2-D X, 1-D y of the same length, numeric)."""
    if target is not None:
        raise ValidationError(f"--target applies to CSV/Parquet sources, not {spec}")
    X = np.asarray(X)
    y = np.asarray(y)
    if names is None:
        names = [f"x{j}" for j in range(X.shape[1])] if X.ndim == 2 else []
    if X.ndim != 2:
        raise ValidationError(f"source {spec}: X must be 2-D (rows x features), got shape {X.shape}")
    if y.ndim != 1:
        raise ValidationError(f"source {spec}: y must be 1-D, got shape {y.shape}")
    if len(X) != len(y):
        raise ValidationError(f"source {spec}: X has {len(X)} rows but y has {len(y)}")
    for j, name in enumerate(names):
        if not np.issubdtype(X.dtype, np.number) and not _column_numeric(X[:, j]):
            raise ValidationError(f"source {spec}: column {name!r} is not numeric")
    classes = None
    if y.dtype.kind in "USOb":  # text or bool labels: kept as classes, y becomes their index
        classes, y = _label_index(spec, y)

    def batches(batch_rows: int):
        for start in range(0, len(X), batch_rows):
            stop = min(start + batch_rows, len(X))
            yield (X[start:stop].astype(np.float64, copy=False),
                   y[start:stop].astype(np.float64, copy=False), stop - start)

    return Source(spec, list(names), task, len(X), len(X), batches, in_memory=True,
                  classes=classes)


def _label_index(spec: str, y: np.ndarray) -> tuple[list, np.ndarray]:
    values = y.tolist()
    if any(v is None or (isinstance(v, float) and v != v) for v in values):
        raise ValidationError(f"source {spec}: y has a missing label")
    classes = sorted({encode.category_key(v): v for v in values}.values(), key=_order)
    if len(classes) > MAX_CATEGORIES:
        raise ValidationError(f"source {spec}: y has more than {MAX_CATEGORIES} distinct labels")
    return classes, encode.codes(y, classes).astype(np.float64)


def _column_numeric(column: np.ndarray) -> bool:
    try:
        column.astype(np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _sklearn(name: str):
    if name not in SKLEARN:
        raise ValidationError(f"unknown sklearn dataset {name!r} (choose from {', '.join(SKLEARN)})")
    import sklearn.datasets

    loader, task = SKLEARN[name]
    bunch = getattr(sklearn.datasets, loader)()
    names = getattr(bunch, "feature_names", None)
    names = [str(n) for n in names] if names is not None else [f"x{j}" for j in range(bunch.data.shape[1])]
    return bunch.data, bunch.target, names, task


def _synthetic(query: str):
    kind, _, params = query.partition("?")
    if kind not in SYNTHETIC_PARAMS:
        raise ValidationError(f"unknown synthetic kind {kind!r} (choose classification or regression)")
    values = dict(SYNTHETIC_PARAMS[kind])
    for key, raw in parse_qsl(params, keep_blank_values=True, strict_parsing=bool(params)):
        if key not in values:
            raise ValidationError(f"synthetic:{kind}: unknown parameter {key!r} (known: {', '.join(values)})")
        try:
            values[key] = type(values[key])(raw)
        except ValueError:
            raise ValidationError(f"synthetic:{kind}: parameter {key}={raw!r} is not a number") from None
    n, f = values["n_samples"], values["n_features"]
    if n <= 0 or f <= 0:
        raise ValidationError(f"synthetic:{kind}: n_samples and n_features must be positive")
    import sklearn.datasets

    names = [f"x{j}" for j in range(f)]
    if kind == "regression":
        X, y = sklearn.datasets.make_regression(
            n_samples=n, n_features=f, n_informative=values["n_informative"] or max(1, f // 2),
            noise=values["noise"], random_state=values["seed"])
        return X, y, names, "regression"
    k = values["n_classes"]
    if k < 2:
        raise ValidationError(f"synthetic:classification: n_classes must be >= 2, got {k}")
    # make_classification needs n_classes * 2 clusters <= 2 ** n_informative.
    informative = values["n_informative"] or min(f, max(2, math.ceil(math.log2(2 * k)), f // 2))
    if 2**informative < 2 * k or informative > f:
        raise ValidationError(f"synthetic:classification: n_features={f} is too few for n_classes={k}")
    X, y = sklearn.datasets.make_classification(
        n_samples=n, n_features=f, n_informative=informative, n_redundant=0,
        n_classes=k, class_sep=values["class_sep"], random_state=values["seed"])
    return X, y, names, "binary" if k == 2 else "multiclass"


def _npz(path: str):
    with np.load(path, allow_pickle=False) as data:
        for key in ("X", "y"):
            if key not in data:
                raise ValidationError(f"source {path}: no array {key!r} (has {', '.join(data.files)})")
        X, y = data["X"], data["y"]
    names = [f"x{j}" for j in range(X.shape[1])] if X.ndim == 2 else []
    return X, y, names, None


def _npy(path: str, labels: str | None):
    if labels is None:
        raise ValidationError(f"source {path} holds X only: give its labels with --labels Y.npy "
                              "(or write both to one .npz with arrays X and y)")
    if not labels.lower().endswith(".npy") or not os.path.exists(labels):
        raise ValidationError(f"--labels {labels}: expected an existing .npy file of y")
    X, y = _load_npy(path, "source"), _load_npy(labels, "--labels")
    names = [f"x{j}" for j in range(X.shape[1])] if X.ndim == 2 else []
    return X, y, names, None


def _load_npy(path: str, role: str) -> np.ndarray:
    # Memory-mapped: ingest copies it batch by batch, so X never has to fit in memory whole.
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays, a truncated or foreign file
        raise ValidationError(f"{role} {path} is not a readable .npy array ({exc})") from None


def _pick_target(spec: str, columns: list[str], target: str | None) -> str:
    if target is not None:
        if target not in columns:
            raise ValidationError(f"source {spec}: target column {target!r} not found")
        return target
    for guess in TARGET_GUESSES:
        if guess in columns:
            return guess
    raise ValidationError(f"source {spec}: no 'target', 'y' or 'label' column; name it with --target")


def _table(name: str, columns: list[str], target: str, sample, named: list[str],
           scan: Callable[[list[str]], Iterator]) -> dict:
    """Schema of a table: text columns and ``named`` are one-hot, text/bool labels are classes.

    ``sample`` is a pandas frame of the first rows; ``scan(cols)`` yields frames of those
    columns over the whole file, read once to collect every category.
    """
    features = [c for c in columns if c != target]
    if not features:
        raise ValidationError(f"source {name}: no feature columns besides the target {target!r}")
    unknown = [c for c in named if c not in features]
    if unknown:
        raise ValidationError(f"source {name}: --categorical column {unknown[0]!r} is not a "
                              f"feature column (columns: {', '.join(features[:20])})")
    kinds = {c: sample[c].dtype.kind for c in columns}
    cat_cols = [c for c in features if c in named or kinds[c] not in "biuf"]
    label_text = kinds[target] not in "iuf"  # bool or text labels are kept as they are
    found = _categories(name, scan, cat_cols + ([target] if label_text else []))
    categorical = {c: found[c] for c in cat_cols}
    names = [n for c in features for n in
             ([f"{c}={v}" for v in categorical[c]] if c in categorical else [c])]
    return {"features": features, "categorical": categorical, "feature_names": names,
            "classes": found[target] if label_text else None,
            "dtypes": {c: str(sample[c].dtype) for c in columns}}


def _categories(name: str, scan: Callable[[list[str]], Iterator], cols: list[str]) -> dict:
    """Sorted distinct values of ``cols`` (missing values left out), in their original type."""
    if not cols:
        return {}
    seen: dict[str, dict[str, object]] = {c: {} for c in cols}
    for frame in scan(cols):
        for c in cols:
            for value in frame[c].dropna().unique().tolist():
                seen[c].setdefault(encode.category_key(value), value)
            if len(seen[c]) > MAX_CATEGORIES:
                raise ValidationError(
                    f"source {name}: column {c!r} has more than {MAX_CATEGORIES} distinct values, "
                    "too many to one-hot encode or to be classes; drop it or encode it as numbers")
    return {c: sorted(values.values(), key=_order) for c, values in seen.items()}


def _order(value: object) -> tuple:
    # numbers in numeric order before text in text order; bools as False < True
    if isinstance(value, bool | int | float) and not isinstance(value, str):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _frame_to_arrays(spec: str, frame, target: str, schema: dict):
    """One batch as float64 rows (categorical columns one-hot) and labels or their indices."""
    features, categorical = schema["features"], schema["categorical"]
    if len(frame) == 0:
        return np.empty((0, len(schema["feature_names"]))), np.empty(0)
    parts = []
    for name in features:
        if name in categorical:
            cats = categorical[name]
            parts.append(encode.one_hot(encode.codes(frame[name].to_numpy(), cats), len(cats)))
            continue
        if frame[name].dtype.kind not in "biuf":
            raise ValidationError(f"source {spec}: column {name!r} is not numeric (a later row "
                                  f"holds text; name it with --categorical to one-hot encode it)")
        parts.append(frame[name].to_numpy(dtype=np.float64, na_value=np.nan).reshape(-1, 1))
    X = np.hstack(parts)
    if schema["classes"] is not None:
        index = encode.codes(frame[target].to_numpy(), schema["classes"]).astype(np.float64)
        y = np.where(index < 0, np.nan, index)  # a missing label: refused by ingest's check
    else:
        if frame[target].dtype.kind not in "biuf":
            raise ValidationError(f"source {spec}: column {target!r} is not numeric")
        y = frame[target].to_numpy(dtype=np.float64, na_value=np.nan)
    return X, y


def _table_source(name: str, target: str, schema: dict, n_rows, total, batches) -> Source:
    return Source(name, schema["feature_names"], None, n_rows, total, batches,
                  classes=schema["classes"], categorical=schema["categorical"],
                  columns=schema["features"], target=target, dtypes=schema["dtypes"])


def _csv(path: str, target: str | None, named: list[str]) -> Source:
    import pandas as pd

    try:
        with _ragged_rows(path):
            sample = pd.read_csv(path, nrows=SAMPLE_ROWS)
    except pd.errors.EmptyDataError:
        raise ValidationError(f"source {path} is empty") from None
    columns = [str(c) for c in sample.columns]
    target = _pick_target(path, columns, target)
    text = {c: str for c in columns if c != target and sample[c].dtype.kind not in "biuf"}

    def scan(cols):
        with _ragged_rows(path):
            yield from pd.read_csv(path, usecols=cols, chunksize=1 << 16, dtype={
                c: str for c in cols if c in text})

    schema = _table(path, columns, target, sample, named, scan)
    # category columns read as text in every batch, so "1" and "x" never split by dtype
    dtype = {c: str for c in schema["categorical"] if c in text}

    def batches(batch_rows: int):
        with open(path, "rb") as handle, _ragged_rows(path):
            reader = pd.read_csv(handle, chunksize=batch_rows, engine="c", low_memory=False,
                                 dtype=dtype)
            done = 0
            for frame in reader:
                X, y = _frame_to_arrays(path, frame, target, schema)
                position = handle.tell()
                yield X, y, position - done
                done = position

    return _table_source(path, target, schema, None, os.path.getsize(path), batches)


@contextlib.contextmanager
def _ragged_rows(path: str) -> Iterator[None]:
    """pandas' ParserError (a row with more fields than the header) as bad input naming the file.

    A row with fewer fields reads as missing values, which the schema checks already name.
    """
    import pandas as pd

    try:
        yield
    except pd.errors.ParserError as exc:
        detail = " ".join(str(exc).split()).removeprefix("Error tokenizing data. C error: ")
        raise ValidationError(f"source {path}: malformed row ({detail})") from None


def _parquet(path: str, target: str | None, named: list[str]) -> Source:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid for truncated/foreign files
        raise ValidationError(f"source {path} is not a readable Parquet file ({exc})") from None
    columns = list(parquet.schema_arrow.names)
    target = _pick_target(path, columns, target)
    sample = parquet.schema_arrow.empty_table().to_pandas()

    def scan(cols):
        for batch in parquet.iter_batches(batch_size=1 << 16, columns=cols):
            yield batch.to_pandas()

    schema = _table(path, columns, target, sample, named, scan)

    def batches(batch_rows: int):
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[*schema["features"], target]):
            X, y = _frame_to_arrays(path, batch.to_pandas(), target, schema)
            yield X, y, len(y)

    n = parquet.metadata.num_rows
    return _table_source(path, target, schema, n, n, batches)
