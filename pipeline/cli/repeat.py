"""From the objects of a Python call back to the command line that repeats it.

:mod:`fedpipe.cli.registry` turns the CLI's names into objects; this module goes the other way, so
that ``fit(..., out=RUN)`` and ``federate(..., out=RUN)`` called from Python write a
``RUN/config.toml`` that ``fedpipe train|federate --config RUN/config.toml`` runs again.

The objects carry few names (a :class:`~fedpipe.tasks.models.Model` its ``name``, a
:class:`~fedpipe.tasks.aggregate.Strategy` its ``name`` and ``mu``; an optimizer is two functions), so a
setting is read off what the object *does*: the candidate options rebuild the object through
:mod:`fedpipe.cli.registry`, and the options are only written when the rebuilt object gives the
same bits as the caller's on fixed probe inputs. Anything else (a model of your own, a
learning-rate schedule function, custom aggregation stages, non-default hyperparameters no
option sets) is left out of the file and named under :data:`fedpipe.cli.config.NOT_REPEATABLE`,
which ``--config`` refuses with one line instead of running something different.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from fedpipe.cli import config, registry
from fedpipe.errors import ValidationError
from fedpipe.tasks.aggregate import Strategy
from fedpipe.tasks.lbfgs import LBFGS, lbfgs
from fedpipe.tasks.models import Model
from fedpipe.tasks.optimizers import Optimizer

log = logging.getLogger("fedpipe")

# Step counts at which a schedule would show itself (the optimizer's state carries "step").
_FAR_STEPS = (10, 100, 1_000, 10_000, 100_000, 1_000_000, 2**31)
# The options that together give one setting of a Python call.
_KEYS = {"model": ("model", "hidden", "l2", "l1"), "optimizer": ("optimizer", "lr", "schedule"),
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
    _gather(values, reasons, "model", lambda: model_options(model, info, int(options["seed"])))
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
    _gather(values, reasons, "model",
            lambda: model_options(model, info, int(options["seed"]), l1_option=False))
    _gather(values, reasons, "strategy", lambda: strategy_options(strategy))
    if callable(lr):
        reasons["lr"] = "a schedule function (--lr-schedule takes a spec such as 'cosine')"
    else:
        values["lr"] = lr
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
    out = config.command_values(command, {k: _plain(v) for k, v in values.items()})
    if reasons:
        # The command's defaults stand in for what was not said: drop them, never guess.
        for setting in reasons:
            for key in _KEYS.get(setting, ()):
                out.pop(key, None)
        out[config.NOT_REPEATABLE] = [f"{k}: {v}" for k, v in reasons.items()]
        log.warning("fedpipe %s --config RUN_DIR/config.toml cannot repeat this run, "
                    "config.toml names what it lacks under '%s': %s", command,
                    config.NOT_REPEATABLE, "; ".join(out[config.NOT_REPEATABLE]))
    return out


def _plain(value: Any) -> Any:
    # NumPy scalars and paths reach us from Python callers; TOML and argparse want plain values.
    if isinstance(value, np.generic):
        return value.item()
    if value is not None and not isinstance(value, bool | int | float | str):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# models


def model_options(model: Model, info: Any, seed: int, l1_option: bool = True) -> dict[str, Any]:
    """``--model``, ``--hidden``, ``--l2`` (and ``--l1``) that rebuild ``model`` for ``info``.

    The kind and the hidden widths come from ``model.name``; ``l2``/``l1`` from its penalty
    gradient ``l2 * w + l1 * sign(w)`` at a huge and a tiny weight. A candidate counts only if
    :func:`fedpipe.cli.registry.make_model` then gives a model with the same bits everywhere.

    Raises
    ------
    NotExpressible
        Not a model the CLI builds (a model of your own, no intercept, ``l1`` without ``--l1``).
    """
    kind, *sizes = str(model.name).split("-")
    if kind not in registry.MODELS or (kind == "mlp") != bool(sizes):
        raise NotExpressible(f"{model.name!r} is not a model --model builds")
    hidden = ",".join(sizes[1:-1]) if kind == "mlp" else None
    for l2, l1 in _penalty_weights(model):
        if l1 and not l1_option:
            continue
        try:
            candidate = registry.make_model(kind, info, hidden=hidden, l2=l2, l1=l1)
        except ValidationError:
            continue
        if _same_model(model, candidate, info, seed):
            found = {"model": kind, "hidden": hidden, "l2": l2}
            return found | ({"l1": l1} if l1_option else {})
    penalties = "--l2/--l1" if l1_option else "--l2 (federate has no --l1)"
    raise NotExpressible(f"{model.name!r} is not what --model {kind} builds for this store with "
                         f"any {penalties}: a model of your own, or other settings")


def _penalty_weights(model: Model) -> list[tuple[float, float]]:
    """Candidate ``(l2, l1)``: with ``w = 2**100`` the L2 term swamps L1, with ``w = 2**-600``
    the L1 term swamps L2; both readings are exact (powers of two), the zeros cover the case
    where one of them is 0."""
    try:
        with np.errstate(all="ignore"):
            big = float(np.max(model.penalty(np.full(model.n_params, 2.0**100))[1])) * 2.0**-100
            tiny = float(np.max(model.penalty(np.full(model.n_params, 2.0**-600))[1]))
    except Exception:  # a model of your own may not take our probe: it is then not ours
        return [(0.0, 0.0)]
    pairs = [(0.0, 0.0), (big, 0.0), (0.0, tiny), (big, tiny)]  # simplest first
    return [p for p in dict.fromkeys(pairs) if all(math.isfinite(v) and v >= 0 for v in p)]


def _same_model(model: Model, candidate: Model, info: Any, seed: int) -> bool:
    if (model.name, model.n_params, model.task) != (candidate.name, candidate.n_params,
                                                    candidate.task):
        return False
    rng = np.random.default_rng(0)
    params = rng.normal(size=candidate.n_params)
    X = rng.normal(size=(5, info.n_features))
    y = rng.normal(size=5) if candidate.task == "regression" else np.arange(5) % len(info.classes)
    try:
        return all(_same_bits(f(model), f(candidate)) for f in (
            lambda m: m.init(seed), lambda m: m.loss_and_grad(params, X, y),
            # at three scales, so that neither penalty term hides below the other's rounding
            lambda m: [m.penalty(params * scale) for scale in (1.0, 2.0**100, 2.0**-600)],
            lambda m: m.predict(params, X),
            lambda m: m.unpack(params)))
    except Exception:  # raised by the caller's model only (the candidate is ours)
        return False


def _same_bits(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b, strict=True))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------
# optimizers and strategies


def optimizer_options(optimizer: Optimizer | LBFGS) -> dict[str, Any]:
    """``--optimizer`` and ``--lr`` that rebuild ``optimizer``.

    Raises
    ------
    NotExpressible
        A learning-rate schedule, non-default hyperparameters, or an optimizer of your own.
    """
    if isinstance(optimizer, LBFGS):
        if optimizer != lbfgs():
            raise NotExpressible(f"{optimizer} (--optimizer lbfgs uses {lbfgs()})")
        return {"optimizer": "lbfgs"}
    for name, factory in registry.OPTIMIZERS.items():
        if name != "lbfgs" and (lr := _matching_rate(factory, optimizer)) is not None:
            return {"optimizer": name, "lr": lr}
    raise NotExpressible("not one that --optimizer NAME --lr RATE builds (a learning-rate "
                         "schedule, other hyperparameters or an optimizer of your own)")


def strategy_options(strategy: Strategy) -> dict[str, Any]:
    """``--strategy``, ``--server-lr`` (and ``--mu`` for fedprox) that rebuild ``strategy``.

    Raises
    ------
    NotExpressible
        Not a registry strategy with its default server hyperparameters.
    """
    factory = registry.STRATEGIES.get(strategy.name)
    lr = None
    if strategy.client is not None or strategy.stages is not None:
        factory = None  # an optimizer of the strategy's own: no option reads it back (yet)
    if factory is not None:
        def server(server_lr: float) -> Optimizer:
            return factory(server_lr=server_lr, mu=strategy.mu).server

        try:
            ref = factory(mu=strategy.mu)
        except ValueError:  # a mu the CLI refuses
            ref = None
        if ref is not None and (ref.mu, ref.scaffold) == (strategy.mu, strategy.scaffold):
            lr = _matching_rate(server, strategy.server)
    if lr is None:
        raise NotExpressible(f"{strategy.name!r} is not what --strategy NAME --server-lr RATE "
                             "--mu MU builds (other server hyperparameters or a strategy of "
                             "your own)")
    return {"strategy": strategy.name, "server_lr": lr,
            **({"mu": strategy.mu} if strategy.name == "fedprox" else {})}


def _matching_rate(factory: Callable[[float], Any], target: Optimizer) -> float | None:
    """The rate ``lr`` for which ``factory(lr)`` updates exactly as ``target`` does, if any.

    The rate is read from the first update against ``factory(1.0)``'s (then a neighbour or two
    of it, for the rounding of ``lr * direction``) and checked over a few steps and at far step
    counts, where a schedule would differ.
    """
    try:
        want = _probe(target)
        unit = _probe(factory(1.0))
        i = int(np.argmax(np.abs(unit[0])))
        guess = float(want[0][i] / unit[0][i])
        for lr in _neighbours(guess):
            if _same_bits(_probe(factory(lr)), want):
                return lr
    except Exception:  # the caller's optimizer does not follow the probe: not ours
        return None
    return None


def _neighbours(x: float) -> list[float]:
    if not (math.isfinite(x) and x > 0):
        return []
    up, down = math.nextafter(x, math.inf), math.nextafter(x, 0.0)
    return [x, up, down, math.nextafter(up, math.inf), math.nextafter(down, 0.0)]


def _probe(optimizer: Optimizer) -> list[np.ndarray]:
    """Updates over four steps from ``init``, then one more at each of :data:`_FAR_STEPS`."""
    rng = np.random.default_rng(0)
    params, grads = rng.normal(size=6), rng.normal(size=(4, 6))
    state, updates = optimizer.init(params), []
    for g in grads:
        step, state = optimizer.update(g, state, params)
        updates.append(step)
        params = params + step
    for far in _FAR_STEPS:
        later = {**state, "step": np.asarray(far, dtype=np.int64)}
        updates.append(optimizer.update(grads[0], later, params)[0])
    return updates
