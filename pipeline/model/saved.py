"""A run directory as a self-contained model: ``model.json`` and ``preprocess.json``.

``model.json`` holds the model's spec (:attr:`fedpipe.tasks.models.Model.spec`: kind, sizes,
hyperparameters), ``preprocess.json`` how raw input columns become the model's features: the
input columns and dtypes in order, the categories of one-hot columns, imputation values,
standardisation statistics, the target's name and the class labels in their original form.
With ``params.npz`` that is everything :func:`load` needs: the training store may be gone.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fedpipe import rundir
from fedpipe.errors import ValidationError
from fedpipe.tasks import encode, models
from fedpipe.tasks.models import Model

log = logging.getLogger("fedpipe")

MODEL = "model.json"
PREPROCESS = "preprocess.json"
FACTORY = "model_factory.py"  # a copy of the user's factory module, for a --model FILE.py:NAME run
FORMAT = 1


@dataclass(frozen=True)
class Encoding:
    """How a table's raw columns become the float64 features the model was trained on."""

    columns: list[str]
    feature_names: list[str]
    pre: encode.Preprocess
    task: str
    classes: list | None = None
    categorical: dict[str, list] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    # A sparse store (fedpipe.ingest_sparse): columns are unnamed positions 0..width-1, taken
    # as they are (no preprocessing), and inputs may be scipy.sparse matrices.
    sparse_width: int | None = None

    @property
    def n_features(self) -> int:
        return len(self.feature_names) if self.sparse_width is None else self.sparse_width


@dataclass(frozen=True)
class SavedModel:
    """A trained model read back from a run: the model, its flat parameters and its encoding."""

    model: Model
    params: np.ndarray
    encoding: Encoding


# ---------------------------------------------------------------------------------------------
# writing


def encoding_of(info: Any) -> Encoding:
    """The :class:`Encoding` of a store's metadata (a :class:`~fedpipe.data.store.StoreInfo`)."""
    from fedpipe.data.store import stats_arrays

    if getattr(info, "sparse", None):  # no names, no statistics: 2**20 of them would be MBs
        empty = np.zeros(0)
        return Encoding(columns=[], feature_names=[], pre=encode.Preprocess(None, empty, empty,
                                                                            False),
                        task=info.task, classes=info.classes, sparse_width=info.n_features)
    impute = info.preprocess.get("impute", "none")
    standardize = bool(info.preprocess.get("standardize", False))
    if info.stats:
        stats = stats_arrays(info)
        pre = encode.from_stats(stats, impute=impute, standardize=standardize,
                                median=stats.get("median"))
    else:  # no statistics: no preprocessing can have been applied
        d = info.n_features
        pre = encode.Preprocess(None, np.zeros(d), np.ones(d), False)
    return Encoding(columns=list(getattr(info, "columns", None) or info.feature_names),
                    feature_names=list(info.feature_names), pre=pre, task=info.task,
                    classes=info.classes, categorical=dict(getattr(info, "categorical", {}) or {}),
                    dtypes=dict(getattr(info, "input_dtypes", None) or {}),
                    target=getattr(info, "target", None))


def write(run_dir: str | os.PathLike[str], model: Model, info: Any) -> None:
    """Write ``model.json`` and ``preprocess.json`` for ``model`` trained on the store ``info``.

    A model without a spec gets ``"spec": null``: the run can then only be loaded with the
    model given explicitly (``load(run_dir, model=...)``).
    """
    run_dir = Path(run_dir)
    spec = _portable_spec(run_dir, model.spec)
    if spec is None:
        log.warning("model %s has no spec: %s/%s cannot rebuild it (give model= to load it)",
                    model.name, run_dir, MODEL)
    _write_json(run_dir / MODEL, {"format": FORMAT, "name": model.name, "task": model.task,
                                  "n_params": model.n_params, "spec": spec})
    _write_json(run_dir / PREPROCESS, encoding_to_json(encoding_of(info)))


def _portable_spec(run_dir: Path, spec: dict | None) -> dict | None:
    """A factory spec points at the run's own copy of the user's module, so the run moves."""
    if spec is None or spec.get("kind") != "factory" or not spec.get("path"):
        return spec
    source = Path(spec["path"])
    if source.resolve() != (run_dir / FACTORY).resolve():
        shutil.copyfile(source, run_dir / FACTORY)
    return {**spec, "path": FACTORY}


def encoding_to_json(enc: Encoding) -> dict[str, Any]:
    pre = enc.pre
    return {"format": FORMAT, "task": enc.task, "classes": enc.classes, "target": enc.target,
            "columns": enc.columns, "dtypes": enc.dtypes, "categorical": enc.categorical,
            "feature_names": enc.feature_names, "standardize": pre.standardize,
            "fill": None if pre.fill is None else pre.fill.tolist(),
            "shift": pre.shift.tolist(), "scale": pre.scale.tolist(),
            **({} if enc.sparse_width is None else {"sparse_width": enc.sparse_width})}


def encoding_from_json(data: dict[str, Any]) -> Encoding:
    fill = data.get("fill")
    pre = encode.Preprocess(None if fill is None else np.asarray(fill, dtype=np.float64),
                            np.asarray(data["shift"], dtype=np.float64),
                            np.asarray(data["scale"], dtype=np.float64), bool(data["standardize"]))
    return Encoding(columns=list(data["columns"]), feature_names=list(data["feature_names"]),
                    pre=pre, task=data["task"], classes=data.get("classes"),
                    categorical=dict(data.get("categorical") or {}),
                    dtypes=dict(data.get("dtypes") or {}), target=data.get("target"),
                    sparse_width=data.get("sparse_width"))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    # json writes floats with repr: they read back to the same bits.
    text = json.dumps(value, indent=1, default=rundir._json_default)
    with rundir._atomic_writer(path) as handle:
        handle.write((text + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# reading


def load(run_dir: str | os.PathLike[str], model: Model | None = None) -> SavedModel:
    """The trained model of a run directory, ready to predict without the training store.

    Parameters
    ----------
    run_dir : path
        A run written by ``fedpipe train``/``federate`` (or ``fit``/``federate`` with ``out=``).
    model : Model, optional
        The model to use instead of rebuilding it from ``model.json`` (needed when the run's
        model had no spec).

    Raises
    ------
    ValidationError
        The run lacks ``params.npz``/``model.json``/``preprocess.json`` or they do not agree.
    """
    run_dir = Path(run_dir)
    for name in (rundir.PARAMS, MODEL, PREPROCESS):
        if not (run_dir / name).exists():
            raise ValidationError(f"run {run_dir} has no {name} (an unfinished run, or one "
                                  "written before fedpipe saved its model)")
    meta = json.loads((run_dir / MODEL).read_text(encoding="utf-8"))
    enc = encoding_from_json(json.loads((run_dir / PREPROCESS).read_text(encoding="utf-8")))
    if model is None:
        model = build(meta.get("spec"), run_dir)
    with np.load(run_dir / rundir.PARAMS, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    try:
        params = models.pack(model, arrays)
    except ValueError as exc:
        raise ValidationError(f"run {run_dir}: {exc}") from None
    return SavedModel(model, params, enc)


def build(spec: dict | None, run_dir: Path | None = None) -> Model:
    """The model a saved spec describes: a built-in kind or a user's factory."""
    if spec is None:
        raise ValidationError(f"run {run_dir}: its model has no spec, so it cannot be rebuilt; "
                              "pass the model yourself (fedpipe.model.saved.load(run, model=...))")
    if spec.get("kind") == "factory":
        factory = load_factory(spec["factory"], base=run_dir, path=spec.get("path"))
        return call_factory(factory, spec["factory"], **spec["args"])
    try:
        return models.from_spec(spec)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"run {run_dir}: model.json spec {spec}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# a user's model factory: --model path/to/mymodel.py:factory or --model package.module:factory


def is_factory_ref(name: str) -> bool:
    """``"mymodel.py:factory"`` or ``"pkg.module:factory"`` (not a built-in model name)."""
    return ":" in str(name)


def load_factory(ref: str, base: Path | None = None, path: str | None = None):
    """The callable ``ref`` names: ``FILE.py:NAME`` (a file) or ``MODULE:NAME`` (importable).

    ``path`` (a file relative to ``base``, the run directory) wins over ``ref``'s own file.
    """
    target, _, attr = str(ref).rpartition(":")
    if not target or not attr:
        raise ValidationError(f"--model {ref!r}: expected FILE.py:FACTORY or MODULE:FACTORY")
    if path is not None or target.endswith(".py"):
        file = Path(base) / path if path is not None and base is not None else Path(target)
        if not file.is_file():
            raise ValidationError(f"--model {ref!r}: file {file} does not exist")
        name = f"fedpipe_user_model_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ValidationError(f"--model {ref!r}: importing {file} failed: {exc}") from None
        # Workers cannot import a module that lives in a file on this machine: ship its code.
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValidationError(f"--model {ref!r}: cannot import {target} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValidationError(f"--model {ref!r}: {target} has no callable {attr!r}")
    return factory


def call_factory(factory, ref: str, **args: Any) -> Model:
    """``factory(n_features=, n_classes=, task=)``, checked to return a Model; spec attached."""
    try:
        model = factory(**args)
    except Exception as exc:
        raise ValidationError(f"--model {ref}: the factory raised {type(exc).__name__}: {exc}"
                              ) from None
    if not isinstance(model, Model):
        raise ValidationError(f"--model {ref}: the factory returned {type(model).__name__}, "
                              "not a fedpipe.tasks.models.Model")
    return model
