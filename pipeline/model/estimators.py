"""scikit-learn estimators whose ``fit`` trains data-parallel on a Dask cluster.

``fp.LogisticRegression``, ``fp.SoftmaxRegression``, ``fp.LinearRegression``,
``fp.MLPClassifier`` and ``fp.MLPRegressor`` follow scikit-learn's conventions (parameters in
``__init__``, fitted attributes ending in ``_``, ``get_params``/``set_params``, ``score``) and
its objectives: ``LogisticRegression(C=1.0)`` minimises ``C * sum(loss) + 0.5 * ||w||^2``,
which is fedpipe's mean loss with ``l2 = 1 / (C * n)``; ``alpha`` of the MLPs is
``l2 = alpha / n``. Training is :func:`fedpipe.engine.train.fit` with L-BFGS (full batch, as
scikit-learn's default ``lbfgs`` solver) on a fedpipe store: a NumPy or Dask array is written
to a temporary store block by block (never whole in memory for a Dask array), a ``str`` is a
store already written. The cluster is ``dask_client``, else the default ``distributed``
client, else a LocalCluster started for the call.

``federated=True`` trains with :func:`fedpipe.engine.federate.federate` instead: the rows are
split IID among ``clients`` simulated clients (a partition of the temporary store, or the
partition of a store URL given), each client's rows are read and kept on the worker lent to
it, and ``rounds`` rounds of ``strategy`` run ``local_epochs`` of mini-batch SGD per client.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from fedpipe.tasks import models
from fedpipe.tasks.lbfgs import lbfgs
from fedpipe.tasks.models import Model
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


def _is_dask(X: Any) -> bool:
    return type(X).__module__.split(".")[0] == "dask"


@contextlib.contextmanager
def _client(dask_client) -> Iterator[Any]:
    if dask_client is not None:
        yield dask_client
        return
    from distributed import default_client

    try:
        client = default_client()
    except ValueError:  # no default client: a LocalCluster for this call
        client = None
    if client is not None:
        yield client
        return
    import dask
    from fedpipe.cluster import connect

    # In-process workers' profiler calls sys._current_frames(), which can deadlock CPython
    # 3.11 with the GIL held (gh-106883; see tests/conftest.py); this cluster needs no profile.
    with (dask.config.set({"distributed.worker.profile.enabled": False}),
          connect(workers=1, threads=2, processes=False, dashboard_address=":0") as dc):
        yield dc


@contextlib.contextmanager
def _as_store(X: Any, y: Any, chunk_rows: int | None, task: str) -> Iterator[str]:
    """A fedpipe store holding ``X`` and class indices or targets ``y`` (a str is one already)."""
    if isinstance(X, str):
        yield X
        return
    from fedpipe.data.ingest import ingest_arrays, ingest_blocks

    with tempfile.TemporaryDirectory(prefix="fedpipe-fit-") as tmp:
        url = f"{tmp}/data.zarr"
        if _is_dask(X):
            ingest_blocks(X, y, url, chunk_rows=chunk_rows, task=task)
        else:
            ingest_arrays(X, y, url, chunk_rows=chunk_rows, task=task)
        yield url


class _DaskEstimator(BaseEstimator):
    """Shared ``fit``/``partial_fit``/``predict`` over the model :meth:`_build` returns."""

    _classifier = False

    def __sklearn_clone__(self):
        # clone() deep-copies every parameter, and a Client cannot be copied (it holds tasks,
        # sockets, its event loop): GridSearchCV, cross_val_score and dask-ml's searches failed
        # on dask_client=. A clone shares the cluster, as it shares the caller's default client.
        params = {k: clone(v, safe=False) for k, v in self.get_params(deep=False).items()
                  if k != "dask_client"}
        return type(self)(**params, dask_client=self.dask_client)

    def __getstate__(self):
        # a pickled estimator (saved, or sent to a worker) carries no connection; unpickled,
        # it predicts without a cluster and fits on the default client
        return {**super().__getstate__(), "dask_client": None}

    def _build(self, n_features: int, n_classes: int, n_rows: int) -> Model:
        raise NotImplementedError

    def _targets(self, y, classes=None):
        """``y`` as class indices (classifiers) or float targets; sets ``classes_``."""
        if not self._classifier:
            return y.astype(np.float64)
        if _is_dask(y):
            import dask.array as da

            self.classes_ = da.unique(y).compute() if classes is None else np.asarray(classes)
            found = self.classes_
            return y.map_blocks(lambda b: np.searchsorted(found, b).astype(np.float64),
                                dtype=np.float64)
        check_classification_targets(y)
        self.classes_ = np.unique(y) if classes is None else np.asarray(classes)
        if len(self.classes_) < 2:
            raise ValueError("this estimator needs samples of at least 2 classes in the data, "
                             f"but the data contains only one class: {self.classes_[0]!r}")
        return np.searchsorted(self.classes_, y).astype(np.float64)

    def _check(self, X, y=None, reset: bool = True):
        if isinstance(X, str) or _is_dask(X):
            if reset:
                from fedpipe.data.store import read_info

                self.n_features_in_ = read_info(X).n_features if isinstance(X, str) else X.shape[1]
            return X, y
        if y is None:
            return validate_data(self, X, reset=reset, dtype=np.float64), None
        return validate_data(self, X, y, reset=reset, dtype=np.float64, y_numeric=not
                             self._classifier, multi_output=False)

    def fit(self, X, y=None, groups=None):
        """Train on ``X`` (NumPy, Dask array or a fedpipe store URL, then ``y`` is unused).

        ``groups`` (a client id per row, as scikit-learn's group splitters take it) trains
        federated with one client per distinct id, each client's rows kept on its worker.
        """
        return self._fit(X, y, warm=False, groups=groups)

    def partial_fit(self, X, y=None, classes=None):
        """One distributed pass of L-BFGS from the current parameters (dask-ml's Incremental)."""
        return self._fit(X, y, warm=True, classes=classes)

    def _fit(self, X, y, *, warm: bool, classes=None, groups=None):
        from fedpipe.engine.train import fit

        first = not (warm and hasattr(self, "params_"))
        if y is None and not isinstance(X, str):
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y "
                             "is None")
        X, y = self._check(X, y, reset=first)
        if isinstance(X, str):
            from fedpipe.data.store import read_info

            info = read_info(X)
            n_rows = info.n_rows
            if self._classifier:
                self.classes_ = np.asarray(info.classes)
        else:
            n_rows = X.shape[0]
            y = self._targets(y, classes) if first else self._again(y)
        k = len(self.classes_) if self._classifier else 1
        model = self._build(self.n_features_in_, k, n_rows)
        if not first:
            start = self.params_.copy()
            model = model._replace(init=lambda seed: start.copy())
        iterations = 1 if warm else self.max_iter
        with _client(self.dask_client) as dc, _as_store(X, y, self.chunk_rows, model.task) as url:
            if self.federated or groups is not None:
                self.params_, self.n_iter_ = self._federate(url, model, dc, warm,
                                                            given=isinstance(X, str),
                                                            groups=groups)
            else:
                result = fit(url, model, lbfgs(), iterations=iterations, tol=self.tol,
                             test_fraction=0.0, dask_client=dc, seed=self.random_state)
                self.params_, self.n_iter_ = result.params, max(1, len(result.metrics))
        self._set_attributes(model)
        return self

    def _federate(self, url: str, model: Model, dc, warm: bool, given: bool, groups=None):
        """``rounds`` federated rounds (one for ``partial_fit``): ``(params, rounds run)``.

        A store written here is split into ``clients`` IID clients, or one client per distinct
        id of ``groups``; a store URL the user gave is trained on its own partition, which is
        not replaced (it may be a natural split).
        """
        from fedpipe.data.partition import partition
        from fedpipe.data.store import read_info
        from fedpipe.engine.federate import federate

        name = None
        if given and groups is not None:
            raise ValueError("groups= applies to arrays; a store is trained on its own partition")
        if groups is not None:
            name = "estimator"
            ids, assignment = np.unique(np.asarray(groups), return_inverse=True)
            partition(url, clients=len(ids), assignment=assignment.ravel(), name=name)
        elif not given:
            name = "estimator"
            partition(url, clients=self.clients, seed=self.random_state, name=name)
        elif len(read_info(url).partitions) != 1:
            raise ValueError(f"federated=True on store {url} needs exactly one partition of it: "
                             "make one with fp.partition(url, clients=K)")
        result = federate(url, model, rounds=1 if warm else self.rounds, strategy=self.strategy,
                          partition=name, local_epochs=self.local_epochs,
                          batch_size=self.batch_size, lr=self.lr, seed=self.random_state,
                          test_fraction=0.0, dask_client=dc)
        return result.params, result.summary["rounds_run"]

    def _again(self, y):
        """Later partial_fit calls: labels indexed by the classes of the first call."""
        if not self._classifier:
            return np.asarray(y, dtype=np.float64)
        return np.searchsorted(self.classes_, y).astype(np.float64)

    def _set_attributes(self, model: Model) -> None:
        named = model.unpack(self.params_)
        if "coef" in named:
            coef = named["coef"]
            self.coef_ = coef.T if coef.ndim == 2 else (coef[None, :] if self._classifier
                                                       else coef)
            b = named.get("intercept", 0.0)
            self.intercept_ = np.atleast_1d(b) if self._classifier else float(b)
        else:
            n = sum(1 for key in named if key.startswith("W"))
            self.coefs_ = [named[f"W{i}"] for i in range(n)]
            self.intercepts_ = [named[f"b{i}"] for i in range(n)]
        # the spec, not the model: its functions are closures, which plain pickle refuses
        self.model_spec_ = model.spec

    def _outputs(self, X, proba: bool):
        check_is_fitted(self, "params_")
        model = models.from_spec(self.model_spec_)
        fn = model.predict_proba if proba else model.predict
        if _is_dask(X):
            if X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                                 f"expecting {self.n_features_in_} features as input")
            params = self.params_
            k = len(self.classes_) if proba else None
            X = X.rechunk({1: -1})
            if proba:
                return X.map_blocks(lambda b: fn(params, b), chunks=(X.chunks[0], (k,)),
                                    dtype=np.float64)
            return X.map_blocks(lambda b: fn(params, b), drop_axis=1, dtype=np.float64)
        X, _ = self._check(X, reset=False)
        return fn(self.params_, X)

    def predict(self, X):
        out = self._outputs(X, proba=False)
        if self._classifier:
            if _is_dask(X):
                classes = self.classes_
                return out.map_blocks(lambda b: classes[b.astype(np.int64)], dtype=classes.dtype)
            return self.classes_[out]
        return out


class _Classifier(ClassifierMixin, _DaskEstimator):
    _classifier = True

    def predict_proba(self, X):
        return self._outputs(X, proba=True)


class LogisticRegression(_Classifier):
    """Logistic regression as scikit-learn's (L2 penalty, ``C``), binary or multinomial.

    Parameters
    ----------
    C : float
        Inverse regularisation strength; ``None`` for no penalty.
    max_iter, tol : int, float
        L-BFGS iterations and the relative change of the objective that stops it.
    dask_client : distributed.Client, optional
    chunk_rows : int, optional
        Rows per chunk of the temporary store written from a NumPy/Dask array.
    random_state : int
    federated : bool
        Train federated (FedAvg-style rounds) instead of data-parallel L-BFGS.
    clients, rounds, strategy : int, int, fedpipe.tasks.aggregate.Strategy
        With ``federated``: simulated IID clients, rounds, and the algorithm (default
        ``fp.strategies.fedavg()``).
    lr, local_epochs, batch_size : float, int, int
        With ``federated``: each client's mini-batch SGD.
    """

    def __init__(self, C=1.0, *, max_iter=200, tol=1e-10, dask_client=None, chunk_rows=None,
                 random_state=0, federated=False, clients=4, rounds=20, strategy=None, lr=0.1,
                 local_epochs=1, batch_size=32):
        self.C, self.max_iter, self.tol = C, max_iter, tol
        self.dask_client, self.chunk_rows, self.random_state = dask_client, chunk_rows, random_state
        self.federated, self.clients, self.rounds = federated, clients, rounds
        self.strategy, self.lr = strategy, lr
        self.local_epochs, self.batch_size = local_epochs, batch_size

    def _l2(self, n_rows: int) -> float:
        return 0.0 if self.C is None else 1.0 / (float(self.C) * n_rows)

    def _build(self, n_features, n_classes, n_rows):
        if n_classes == 2:
            return models.logistic(n_features, l2=self._l2(n_rows))
        return models.softmax(n_features, n_classes, l2=self._l2(n_rows))


class SoftmaxRegression(LogisticRegression):
    """Multinomial logistic regression, also for two classes (one weight vector per class)."""

    def _build(self, n_features, n_classes, n_rows):
        return models.softmax(n_features, n_classes, l2=self._l2(n_rows))


class LinearRegression(RegressorMixin, _DaskEstimator):
    """Ordinary least squares, as scikit-learn's ``LinearRegression`` (solved by L-BFGS)."""

    def __init__(self, *, max_iter=200, tol=1e-12, dask_client=None, chunk_rows=None,
                 random_state=0, federated=False, clients=4, rounds=20, strategy=None, lr=0.1,
                 local_epochs=1, batch_size=32):
        self.max_iter, self.tol = max_iter, tol
        self.dask_client, self.chunk_rows, self.random_state = dask_client, chunk_rows, random_state
        self.federated, self.clients, self.rounds = federated, clients, rounds
        self.strategy, self.lr = strategy, lr
        self.local_epochs, self.batch_size = local_epochs, batch_size

    def _build(self, n_features, n_classes, n_rows):
        return models.linear(n_features)


class _MLP(_DaskEstimator):
    def __init__(self, hidden_layer_sizes=(100,), *, alpha=1e-4, max_iter=200, tol=1e-8,
                 dask_client=None, chunk_rows=None, random_state=0, federated=False, clients=4,
                 rounds=20, strategy=None, lr=0.1, local_epochs=1, batch_size=32):
        self.hidden_layer_sizes, self.alpha = hidden_layer_sizes, alpha
        self.max_iter, self.tol = max_iter, tol
        self.dask_client, self.chunk_rows, self.random_state = dask_client, chunk_rows, random_state
        self.federated, self.clients, self.rounds = federated, clients, rounds
        self.strategy, self.lr = strategy, lr
        self.local_epochs, self.batch_size = local_epochs, batch_size

    def _build(self, n_features, n_classes, n_rows):
        task = "regression" if not self._classifier else (
            "binary" if n_classes == 2 else "multiclass")
        return models.mlp(n_features, n_classes, hidden=tuple(self.hidden_layer_sizes),
                          task=task, l2=float(self.alpha) / n_rows)


class MLPClassifier(_Classifier, _MLP):
    """ReLU multilayer perceptron with a softmax output (``alpha``: L2 as scikit-learn's)."""


class MLPRegressor(RegressorMixin, _MLP):
    """ReLU multilayer perceptron with a linear output (``alpha``: L2 as scikit-learn's)."""
