"""fedpipe: distributed and federated learning on zarr stores and Dask.

``import fedpipe as fp`` gives the whole user API in one flat namespace::

    fp.ingest, fp.open_store, fp.partition, fp.fit, fp.federate, fp.load_run, fp.connect
    fp.BoundedStaleness (fit's mode for bounded-staleness training)
    fp.models, fp.optimizers, fp.schedules, fp.strategies, fp.stages, fp.aggregators,
    fp.fedbuff
    fp.LogisticRegression, fp.SoftmaxRegression, fp.LinearRegression, fp.MLPClassifier,
    fp.MLPRegressor (scikit-learn estimators over Dask), fp.load_model, fp.export_onnx
    fp.check_model, fp.check_optimizer, fp.check_stage, fp.check_strategy (conformance suites)

The folder ``pipeline/`` of the repository is installed as ``fedpipe`` and ``tasks/`` (the pure
NumPy math) as ``fedpipe.tasks``. Names resolve lazily (PEP 562) so that a worker unpickling
``fedpipe.tasks.models`` or a ``fedpipe --help`` does not import the whole orchestration layer.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedpipe.errors import (  # noqa: F401  (re-exported: fp.ValidationError, ...)
    ConfigError,
    FedpipeError,
    StoreError,
    TrainingError,
    ValidationError,
)

# public name -> (module, attribute or None for the module itself); the one table of the face.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "ingest": ("fedpipe.data.ingest", "ingest"),
    "ingest_sparse": ("fedpipe.data.sparse", "ingest_sparse"),
    "open_store": ("fedpipe.data.store", "open_store"),
    "read_info": ("fedpipe.data.store", "read_info"),
    "partition": ("fedpipe.data.partition", "partition"),
    "fit": ("fedpipe.engine.train", "fit"),
    "BoundedStaleness": ("fedpipe.engine.stale", "BoundedStaleness"),
    "federate": ("fedpipe.engine.federate", "federate"),
    "load_run": ("fedpipe.rundir", "load_run"),
    "connect": ("fedpipe.cluster", "connect"),
    "models": ("fedpipe.tasks.models", None),
    "optimizers": ("fedpipe.tasks.optimizers", None),
    "schedules": ("fedpipe.tasks.schedules", None),
    "strategies": ("fedpipe.tasks.aggregate", None),
    "stages": ("fedpipe.tasks.stages", None),
    "aggregators": ("fedpipe.tasks.aggregators", None),
    "fedbuff": ("fedpipe.tasks.fedbuff", None),
    "LogisticRegression": ("fedpipe.model.estimators", "LogisticRegression"),
    "SoftmaxRegression": ("fedpipe.model.estimators", "SoftmaxRegression"),
    "LinearRegression": ("fedpipe.model.estimators", "LinearRegression"),
    "MLPClassifier": ("fedpipe.model.estimators", "MLPClassifier"),
    "MLPRegressor": ("fedpipe.model.estimators", "MLPRegressor"),
    "export_onnx": ("fedpipe.model.onnx_export", "export_onnx"),
    "load_model": ("fedpipe.model.saved", "load"),
    "check_model": ("fedpipe.tasks.checks", "check_model"),
    "check_optimizer": ("fedpipe.tasks.checks", "check_optimizer"),
    "check_stage": ("fedpipe.tasks.conformance", "check_stage"),
    "check_strategy": ("fedpipe.tasks.conformance", "check_strategy"),
}

__all__ = sorted([*_EXPORTS, "FedpipeError", "ValidationError", "StoreError", "ConfigError",
                  "TrainingError"])


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'fedpipe' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
