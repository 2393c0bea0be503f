"""Predict with a saved model on NumPy, pandas, Dask arrays and DataFrames, or a fedpipe store.

Every input goes through one block function, :func:`predict_block`: raw columns -> one-hot
encoded features (:mod:`fedpipe.tasks.encode`) -> the store's imputation and standardisation ->
``model.predict``/``predict_proba`` -> original class labels. Dask inputs map it over their
blocks lazily, with the :class:`~fedpipe.model.saved.SavedModel` as one graph key, so the
parameters travel to each worker once, not once per block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fedpipe.errors import ValidationError
from fedpipe.model.saved import Encoding, SavedModel
from fedpipe.tasks import encode


def predict(saved: SavedModel, X: Any, *, proba: bool = False) -> Any:
    """Predictions (original labels) or class probabilities of ``saved`` on ``X``.

    Parameters
    ----------
    saved : SavedModel
    X : ndarray, pandas.DataFrame, dask Array or DataFrame, or str
        Rows of the model's input columns. A DataFrame's columns are matched by name (a missing
        or an extra column is an error); an array's columns are taken in the order of
        ``saved.encoding.columns``; a ``str`` is a fedpipe store URL (its ``X`` is used).
    proba : bool
        Class probabilities ``(n, n_classes)``, columns in the order of ``classes``.

    Returns
    -------
    ndarray for NumPy/pandas input; a Dask array (store, Dask array) or Dask Series/DataFrame
    (Dask DataFrame) otherwise, still lazy.
    """
    if proba and saved.model.predict_proba is None:
        raise ValidationError(f"model {saved.model.name} ({saved.model.task}) has no "
                              "probabilities: predict_proba is for classifiers")
    if isinstance(X, str | bytes) or hasattr(X, "__fspath__"):
        if saved.encoding.sparse_width is not None:
            return _predict_sparse_store(saved, str(X), proba)
        return _predict_store(saved, str(X), proba)
    kind = type(X).__module__.split(".")[0]
    if saved.encoding.sparse_width is not None:
        return predict_block(saved, X, proba)
    if kind == "dask":
        if hasattr(X, "map_partitions"):
            return _predict_dask_frame(saved, X, proba)
        return _predict_dask_array(saved, X, proba)
    return predict_block(saved, X, proba)


def predict_block(saved: SavedModel, X: Any, proba: bool = False, *,
                  encoded: bool = False) -> np.ndarray:
    """Predict on one in-memory block of raw rows (``encoded``: already one-hot, as in a store)."""
    enc = saved.encoding
    if enc.sparse_width is not None:
        return _predict_sparse(saved, X, proba)
    raw = X if encoded else raw_features(enc, X)
    if raw.ndim != 2 or raw.shape[1] != enc.n_features:
        raise ValidationError(f"X has {raw.shape[-1] if raw.ndim else 0} features, the model "
                              f"expects {enc.n_features}")
    features = encode.apply(enc.pre, raw)
    if enc.pre.fill is None and np.isnan(features).any():
        r, c = np.argwhere(np.isnan(features))[0]
        raise ValidationError(f"feature {enc.feature_names[c]!r} is missing (NaN) in row {r}; "
                              "the run's store had no --impute, so missing values are refused")
    if proba:
        return saved.model.predict_proba(saved.params, features)
    out = saved.model.predict(saved.params, features)
    return labels_of(enc, out)


def _predict_sparse(saved: SavedModel, X: Any, proba: bool) -> np.ndarray:
    """A model trained on a sparse store: rows as a scipy.sparse matrix or a dense array."""
    width = saved.encoding.sparse_width
    if hasattr(X, "columns"):
        raise ValidationError(f"the model was trained on a sparse store ({width} columns): "
                              "predict on a scipy.sparse matrix, an array of that width or a "
                              "sparse store")
    if hasattr(X, "tocsr"):
        X = X.tocsr()
    elif type(X).__module__.split(".")[0] == "dask":
        raise ValidationError("a model trained on a sparse store predicts on in-memory rows: "
                              "pass a scipy.sparse matrix (X.compute() for a Dask array)")
    else:
        X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != width:
        raise ValidationError(f"X has shape {X.shape}, the model expects (rows, {width})")
    if proba:
        return saved.model.predict_proba(saved.params, X)
    return labels_of(saved.encoding, saved.model.predict(saved.params, X))


def _predict_sparse_store(saved: SavedModel, url: str, proba: bool) -> np.ndarray:
    """Every row of a sparse store, one row chunk (all feature blocks, CSR) at a time."""
    from fedpipe.data.store import read_info
    from fedpipe.model.stream import sparse_store_blocks  # stream imports this module

    return np.concatenate([_predict_sparse(saved, X, proba)
                           for X, *_ in sparse_store_blocks(saved, url, read_info(url))])


def labels_of(enc: Encoding, index: np.ndarray) -> np.ndarray:
    """Class indices mapped to the original labels (strings stay strings); values unchanged."""
    if enc.task == "regression" or enc.classes is None:
        return index
    return np.asarray(enc.classes)[np.asarray(index, dtype=np.int64)]


def raw_features(enc: Encoding, X: Any) -> np.ndarray:
    """``(n, n_features)`` float64 rows of ``X``, categorical columns one-hot encoded."""
    if hasattr(X, "columns") and hasattr(X, "iloc"):
        return _frame_features(enc, X)
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValidationError(f"X must be 2-D (rows x columns), got shape {X.shape}")
    if X.shape[1] != len(enc.columns):
        raise ValidationError(f"X has {X.shape[1]} columns, the model expects {len(enc.columns)} "
                              f"({', '.join(enc.columns[:10])}{', ...' if len(enc.columns) > 10 else ''})")
    if not enc.categorical and X.dtype.kind in "biuf":
        return np.asarray(X, dtype=np.float64)
    import pandas as pd

    return _frame_features(enc, pd.DataFrame(X, columns=enc.columns))


def _frame_features(enc: Encoding, frame: Any) -> np.ndarray:
    names = [str(c) for c in frame.columns]
    missing = [c for c in enc.columns if c not in names]
    if missing:
        raise ValidationError(f"input lacks column(s) {', '.join(map(repr, missing[:5]))} "
                              f"that the model was trained on")
    extra = [c for c in names if c not in enc.columns]
    if extra:
        hint = f" (the target {enc.target!r} too)" if enc.target in extra else ""
        raise ValidationError(f"input has column(s) {', '.join(map(repr, extra[:5]))} the model "
                              f"was not trained on: drop them{hint}")
    frame = frame.set_axis(names, axis=1)
    parts = []
    for col in enc.columns:
        values = frame[col].to_numpy()
        if col in enc.categorical:
            cats = enc.categorical[col]
            parts.append(encode.one_hot(encode.codes(values, cats), len(cats)))
            continue
        try:
            parts.append(np.asarray(values, dtype=np.float64).reshape(-1, 1))
        except (TypeError, ValueError):
            raise ValidationError(f"column {col!r} is not numeric (as it was in training)") from None
    return np.hstack(parts) if parts else np.empty((len(frame), 0))


# ---------------------------------------------------------------------------------------------
# lazy inputs


def _model_key(saved: SavedModel):
    from dask import delayed

    return delayed(saved, pure=True)  # one key in the graph: shipped once per worker


def _out_dtype(saved: SavedModel, proba: bool) -> np.dtype:
    enc = saved.encoding
    if proba or enc.task == "regression" or enc.classes is None:
        return np.dtype(np.float64)
    return np.asarray(enc.classes).dtype


def _block(X: np.ndarray, saved: SavedModel, proba: bool, encoded: bool) -> np.ndarray:
    return predict_block(saved, X, proba, encoded=encoded)


def _lazy_array(saved: SavedModel, X, proba: bool, encoded: bool):
    X = X.rechunk({1: -1})
    if proba:
        k = len(saved.encoding.classes or [])
        return X.map_blocks(_block, _model_key(saved), proba, encoded,
                            chunks=(X.chunks[0], (k,)), dtype=np.float64)
    return X.map_blocks(_block, _model_key(saved), proba, encoded, drop_axis=1,
                        dtype=_out_dtype(saved, proba))


def _predict_dask_array(saved: SavedModel, X, proba: bool):
    if X.ndim != 2:
        raise ValidationError(f"X must be 2-D (rows x columns), got shape {X.shape}")
    return _lazy_array(saved, X, proba, encoded=False)


def _predict_store(saved: SavedModel, url: str, proba: bool):
    from fedpipe.data.store import open_store

    data = open_store(url)
    if list(data.info.feature_names) != list(saved.encoding.feature_names):
        raise ValidationError(f"store {url} has features {data.info.feature_names[:5]}..., the "
                              f"model was trained on {saved.encoding.feature_names[:5]}...")
    return _lazy_array(saved, data.X, proba, encoded=True)


def _frame_block(frame, saved: SavedModel, proba: bool):
    import pandas as pd

    out = predict_block(saved, frame, proba)
    if proba:
        return pd.DataFrame(out, index=frame.index, columns=proba_columns(saved.encoding))
    return pd.Series(out, index=frame.index, name="prediction")


def proba_columns(enc: Encoding) -> list[str]:
    """Column names of probabilities: ``proba_<label>`` in the order of the classes."""
    return [f"proba_{c}" for c in enc.classes or []]


def _predict_dask_frame(saved: SavedModel, frame, proba: bool):
    import pandas as pd

    if proba:
        meta = pd.DataFrame({c: pd.Series(dtype="float64") for c in proba_columns(saved.encoding)})
    else:
        meta = pd.Series(dtype=_out_dtype(saved, proba), name="prediction")
    return frame.map_partitions(_frame_block, _model_key(saved), proba, meta=meta)
