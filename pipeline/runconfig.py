"""``config.toml`` of a run started from Python, printed from the specs of its objects.

``fit(..., out=RUN)`` and ``federate(..., out=RUN)`` write a ``RUN/config.toml`` in the CLI's
schema (option names with ``_``), so that ``fedpipe train|federate --config RUN/config.toml``
runs it again. Models, optimizers, schedules and strategies keep the name and arguments they were
built with (``describe``/``spec`` in :mod:`fedpipe.tasks`): a setting is written when an option
gives an object with that same spec. Anything else (a model or rate function of your own, custom
aggregation stages, hyperparameters no option sets) is left out of the file and named under
:data:`NOT_REPEATABLE`, which ``--config`` refuses with one line instead of running something
different. The file holds the call's settings only: the CLI gives its defaults to the rest.

This module is for the engines, so it imports nothing of :mod:`fedpipe.cli`; the names it
writes (``--optimizer adam``, ``--lr-schedule step:every=10``) are the ones the CLI's registry
reads, which ``tests/pipeline/test_repeat.py`` holds together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from fedpipe.tasks import aggregate, models, optimizers, schedules
from fedpipe.tasks.aggregate import Strategy
from fedpipe.tasks.lbfgs import LBFGS, lbfgs
from fedpipe.tasks.models import Model
from fedpipe.tasks.optimizers import Optimizer

log = logging.getLogger("fedpipe")

# A run started from Python may hold settings no option expresses: its config.toml names them
# under this key, and --config refuses the file rather than run something else.
NOT_REPEATABLE = "not_repeatable"
# The CLI's spelling of a schedule kind and of its arguments (fedpipe.cli.registry.SCHEDULES).
SCHEDULE_NAMES = {"constant": "constant", "step_decay": "step", "exponential": "exponential",
                  "inverse_time": "inverse-time", "cosine": "cosine"}
_SCHEDULE_ARGS = {"total_steps": "total"}
# The strategies --strategy builds, all tasks.aggregate factories of (server_lr[, mu]).
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold")
# The options that together give one setting of a Python call.
_KEYS = {"model": ("model", "hidden", "l2", "l1"),
         "optimizer": ("optimizer", "lr", "lr_schedule"),
         "strategy": ("strategy", "server_lr", "mu"), "lr": ("lr", "lr_schedule")}


class NotExpressible(Exception):
    """A setting no CLI option gives; the message says what it is (for ``not_repeatable``)."""


# ---------------------------------------------------------------------------------------------
# whole commands


def fit_config(store: str, model: Model, optimizer: Optimizer | LBFGS, info: Any, *,
               fan_in: int, default_fan_in: int, **options: Any) -> dict[str, Any]:
    """``config.toml`` for a :func:`fedpipe.engine.train.fit` call, in ``fedpipe train``'s schema.

    ``options`` are the call's other settings under their CLI names (``iterations``, ``seed``,
    ``out``, ...). The settings the CLI cannot express are listed under ``not_repeatable``.
    """
    values: dict[str, Any] = {"store": str(store), **options}
    reasons: dict[str, str] = {}
    _gather(values, reasons, "model", lambda: model_options(model, info))
    _gather(values, reasons, "optimizer", lambda: optimizer_options(optimizer))
    if fan_in != default_fan_in:
        reasons["fan_in"] = f"{fan_in} (no option: the CLI's reduction tree adds {default_fan_in})"
    return _finish("train", values, reasons)


def federate_config(store: str, model: Model, info: Any, *, strategy: Strategy,
                    stages: Sequence[Any] | None, lr: float | Callable[[int], float],
                    retries: int, default_retries: int, **options: Any) -> dict[str, Any]:
    """``config.toml`` for a :func:`fedpipe.engine.federate.federate` call, in the CLI's schema.

    ``options`` are the call's other settings under their CLI names (``rounds``, ``seed``,
    ``partition``, ...). The settings the CLI cannot express are listed under ``not_repeatable``.
    """
    values: dict[str, Any] = {"store": str(store), **options}
    reasons: dict[str, str] = {}
    _gather(values, reasons, "model", lambda: model_options(model, info, l1_option=False))
    _gather(values, reasons, "strategy", lambda: strategy_options(strategy))
    if lr is not None:  # None: the strategy's client optimizer carries its own rate
        _gather(values, reasons, "lr", lambda: rate_options(schedules.describe(lr)))
    if stages is not None:
        reasons["stages"] = "an aggregation chain given explicitly (no option sets one)"
    if retries != default_retries:
        reasons["retries"] = f"{retries} (no option: the CLI retries a round {default_retries}x)"
    return _finish("federate", values, reasons)


def _gather(values: dict[str, Any], reasons: dict[str, str], setting: str,
            derive: Callable[[], dict[str, Any]]) -> None:
    try:
        values.update(derive())
    except NotExpressible as exc:
        reasons[setting] = str(exc)


def _finish(command: str, values: Mapping[str, Any], reasons: Mapping[str, str]) -> dict[str, Any]:
    out = {k: _plain(v) for k, v in values.items() if v is not None}
    if reasons:
        # The command's defaults would stand in for what was not said: drop them, never guess.
        for setting in reasons:
            for key in _KEYS.get(setting, ()):
                out.pop(key, None)
        out[NOT_REPEATABLE] = [f"{k}: {v}" for k, v in reasons.items()]
        log.warning("fedpipe %s --config RUN_DIR/config.toml cannot repeat this run, "
                    "config.toml names what it lacks under '%s': %s", command,
                    NOT_REPEATABLE, "; ".join(out[NOT_REPEATABLE]))
    return out


def _plain(value: Any) -> Any:
    # NumPy scalars and paths reach us from Python callers; TOML and argparse want plain values.
    if isinstance(value, np.generic):
        return value.item()
    if not isinstance(value, bool | int | float | str):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# reading the specs


def model_options(model: Model, info: Any, l1_option: bool = True) -> dict[str, Any]:
    """``--model``, ``--hidden``, ``--l2`` (and ``--l1``) that rebuild ``model`` for ``info``.

    Raises
    ------
    NotExpressible
        No spec, not a built-in kind, not what ``--model KIND`` builds for this store (no
        intercept, another size, renamed), or an L1 penalty where the command has no ``--l1``.
    """
    spec = models.describe(model)
    kind = (spec or {}).get("kind")
    if kind not in models.BUILDERS or _cli_model_spec(spec, info) != spec \
            or models.from_spec(spec).name != model.name:
        raise NotExpressible(f"{model.name!r} is not what --model builds for this store: a "
                             "model of your own, or settings no option gives")
    if spec["l1"] and not l1_option:
        raise NotExpressible(f"{model.name!r} has an L1 penalty (federate has no --l1)")
    hidden = ",".join(map(str, spec["hidden"])) if kind == "mlp" else None
    return {"model": kind, "hidden": hidden, "l2": spec["l2"],
            **({"l1": spec["l1"]} if l1_option else {})}


def _cli_model_spec(spec: dict[str, Any], info: Any) -> dict[str, Any] | None:
    """The spec ``--model KIND`` gives on ``info``'s store with ``spec``'s penalties and widths
    (``None``: the kind does not fit the store; fedpipe.cli.registry.make_model's rules)."""
    task, n_classes = _field(info, "task"), len(_field(info, "classes") or ())
    common = {"kind": spec["kind"], "n_features": int(_field(info, "n_features"))}
    penalties = {"l2": spec.get("l2"), "l1": spec.get("l1")}
    if spec["kind"] == "mlp":
        return {**common, "n_outputs": 1 if task == "regression" else n_classes,
                "hidden": spec.get("hidden"), "task": task, **penalties}
    fits = {"linear": task == "regression", "logistic": task == "binary",
            "softmax": task != "regression"}[spec["kind"]]
    sizes = {"n_classes": n_classes} if spec["kind"] == "softmax" else {}
    return {**common, **sizes, **penalties, "intercept": True} if fits else None


def _field(info: Any, key: str) -> Any:
    return info[key] if isinstance(info, Mapping) else getattr(info, key)


def optimizer_options(optimizer: Optimizer | LBFGS) -> dict[str, Any]:
    """``--optimizer``, ``--lr`` (and ``--lr-schedule``) that rebuild ``optimizer``.

    Raises
    ------
    NotExpressible
        No spec (an optimizer or rate function of your own), a chain, or hyperparameters
        other than the rate that no option sets.
    """
    if isinstance(optimizer, LBFGS):
        if optimizer != lbfgs():
            raise NotExpressible(f"{optimizer} (--optimizer lbfgs uses {lbfgs()})")
        return {"optimizer": "lbfgs"}
    spec = optimizers.describe(optimizer)
    kind = (spec or {}).get("kind")
    if kind not in optimizers.OPTIMIZERS:
        raise NotExpressible("not one that --optimizer NAME --lr RATE builds (a chain, or an "
                             "optimizer or learning-rate function of your own)")
    rate = rate_options(spec["lr"])
    default = optimizers.describe(optimizers.OPTIMIZERS[kind](schedules.from_spec(spec["lr"])))
    if other := sorted(k for k in spec if spec[k] != default.get(k)):
        raise NotExpressible(f"{kind} with {', '.join(f'{k}={spec[k]!r}' for k in other)} "
                             "(no option sets them)")
    return {"optimizer": kind, **rate}


def rate_options(spec: float | dict[str, Any] | None) -> dict[str, Any]:
    """``--lr`` (and ``--lr-schedule NAME:K=V,...``) for a rate's spec (see
    :func:`fedpipe.tasks.schedules.describe`).

    Raises
    ------
    NotExpressible
        ``None``: a learning-rate function that is not a schedule factory's.
    """
    if spec is None:
        raise NotExpressible("a schedule function of your own (--lr-schedule takes "
                             "NAME:K=V,... such as 'cosine')")
    if not isinstance(spec, dict):
        return {"lr": float(spec)}
    args = dict(spec)
    kind, lr = args.pop("kind"), args.pop("lr")
    if kind == "constant":
        return {"lr": lr}
    text = ",".join(f"{_SCHEDULE_ARGS.get(k, k)}={v!r}" for k, v in args.items())
    return {"lr": lr, "lr_schedule": f"{SCHEDULE_NAMES[kind]}:{text}"}


def strategy_options(strategy: Strategy) -> dict[str, Any]:
    """``--strategy``, ``--server-lr`` (and ``--mu`` for fedprox) that rebuild ``strategy``.

    Raises
    ------
    NotExpressible
        Not a built-in strategy with its default server hyperparameters.
    """
    server = optimizers.describe(strategy.server) or {}
    same = False
    # a client optimizer, epochs or chain carried by the strategy itself has no CLI spelling yet
    own = (strategy.client, strategy.local_epochs, strategy.stages) != (None, None, None)
    if not own and strategy.name in STRATEGIES and isinstance(server.get("lr"), float):
        mu = _proximal_mu(strategy)
        try:
            ref = getattr(aggregate, strategy.name)(server_lr=server["lr"], **mu)
        except ValueError:  # a mu the factory refuses
            ref = None
        same = ref is not None and (_specs(ref.client_transforms), ref.server.spec) == (
            _specs(strategy.client_transforms), server)
    if not same:
        raise NotExpressible(f"{strategy.name!r} is not what --strategy NAME --server-lr RATE "
                             "--mu MU builds (other server hyperparameters or a strategy of "
                             "your own)")
    return {"strategy": strategy.name, "server_lr": server["lr"], **_proximal_mu(strategy)}


def _specs(transforms) -> list:
    return [optimizers.describe(t) for t in transforms]


def _proximal_mu(strategy: Strategy) -> dict:
    """``{"mu": MU}`` of a fedprox strategy's proximal transform (``--mu``), else nothing."""
    if strategy.name != "fedprox":
        return {}
    mus = [spec["mu"] for spec in _specs(strategy.client_transforms)
           if spec and spec.get("kind") == "add_proximal"]
    return {"mu": mus[0]} if len(mus) == 1 else {}
