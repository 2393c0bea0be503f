"""Names of CLI and config choices mapped to fedpipe objects, in one place.

The Python API takes objects (``optimizers.adam(1e-2)``); only the CLI and config files speak in
names. Every lookup here turns a bad name or value into a one-line
:class:`~fedpipe.errors.ValidationError` that names the flag and the valid choices.

* ``MODELS``: name -> ``factory(n_features, n_classes, task, hidden, l2, l1) -> Model``; each
  factory rejects a task it cannot fit (softmax on a regression store).
* ``OPTIMIZERS``: name -> ``factory(lr) -> Optimizer`` (``lr`` a float or a schedule); ``lbfgs``
  gives :class:`fedpipe.tasks.lbfgs.LBFGS` settings, which the engine recognises instead.
* ``SCHEDULES``: name -> ``factory(lr, total_steps, **params) -> Schedule``; a spec string reads
  ``"cosine"`` or ``"step:every=10,factor=0.5"``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpipe.errors import ValidationError
from fedpipe.tasks import models, optimizers, schedules
from fedpipe.tasks.lbfgs import LBFGS, lbfgs
from fedpipe.tasks.models import Model
from fedpipe.tasks.optimizers import Optimizer
from fedpipe.tasks.schedules import Schedule

DEFAULT_HIDDEN = (256, 128)

# --------------------------------------------------------------------------------------------
# models


def _require(name: str, task: str, allowed: Sequence[str], hint: str) -> None:
    if task not in allowed:
        raise ValidationError(f"--model {name} does not fit a {task} store ({hint})")


def _linear(n_features, n_classes, task, hidden, l2, l1) -> Model:
    _require("linear", task, ("regression",), "use logistic, softmax or mlp for classes")
    return models.linear(n_features, l2=l2, l1=l1)


def _logistic(n_features, n_classes, task, hidden, l2, l1) -> Model:
    _require("logistic", task, ("binary",),
             "logistic is binary: use softmax or mlp" if task == "multiclass" else
             "use linear or mlp for regression")
    return models.logistic(n_features, l2=l2, l1=l1)


def _softmax(n_features, n_classes, task, hidden, l2, l1) -> Model:
    _require("softmax", task, ("binary", "multiclass"), "use linear or mlp for regression")
    return models.softmax(n_features, n_classes, l2=l2, l1=l1)


def _mlp(n_features, n_classes, task, hidden, l2, l1) -> Model:
    n_outputs = 1 if task == "regression" else n_classes
    return models.mlp(n_features, n_outputs, hidden=hidden, task=task, l2=l2, l1=l1)


ModelFactory = Callable[[int, int, str, tuple[int, ...], float, float], Model]

MODELS: dict[str, ModelFactory] = {
    "linear": _linear,
    "logistic": _logistic,
    "softmax": _softmax,
    "mlp": _mlp,
}


def parse_hidden(hidden: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"256,128"`` or ``[256, 128]`` -> ``(256, 128)``; ``None`` gives the default (256, 128)."""
    if hidden is None:
        return DEFAULT_HIDDEN
    parts = hidden.split(",") if isinstance(hidden, str) else list(hidden)
    if isinstance(hidden, str):
        parts = [p for p in parts if p.strip()]  # "" means no hidden layer
    try:
        sizes = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValidationError(f"--hidden must be comma-separated integers, got {hidden!r}") from None
    if any(s < 1 for s in sizes):
        raise ValidationError(f"--hidden layer widths must be >= 1, got {hidden!r}")
    return sizes


def _is_number(value: Any) -> bool:
    """A finite real number (bools are not learning rates)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _field(info: Any, key: str) -> Any:
    return info[key] if isinstance(info, Mapping) else getattr(info, key)


def make_model(name: str, info: Any, hidden: str | Sequence[int] | None = None,
               l2: float = 0.0, l1: float = 0.0) -> Model:
    """The model called ``name`` sized for a store.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    info : StoreInfo or mapping
        Anything with ``n_features``, ``task`` and ``classes`` (list of labels, or None).
    hidden : str or sequence of int, optional
        MLP hidden widths (``"256,128"``); ignored by the linear models.
    l2, l1 : float
        Penalty weights (>= 0).

    Raises
    ------
    ValidationError
        Unknown name, a model that does not fit the store's task, or a bad value.
    """
    from fedpipe.model import saved

    if name not in MODELS and not saved.is_factory_ref(name):
        raise ValidationError(f"unknown --model {name!r}; choose from {', '.join(MODELS)} "
                              "or give FILE.py:FACTORY / MODULE:FACTORY")
    task = _field(info, "task")
    classes = _field(info, "classes")
    n_classes = len(classes) if classes else 1
    if task != "regression" and n_classes < 2:
        raise ValidationError(f"a {task} store needs at least 2 classes, it has {n_classes}")
    if name not in MODELS:
        return user_model(name, int(_field(info, "n_features")), n_classes, task)
    for flag, value in (("--l2", l2), ("--l1", l1)):
        if not _is_number(value) or value < 0:
            raise ValidationError(f"{flag} must be a number >= 0, got {value!r}")
    try:
        return MODELS[name](int(_field(info, "n_features")), n_classes, task,
                            parse_hidden(hidden), float(l2), float(l1))
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError(f"--model {name}: {exc}") from None


def user_model(ref: str, n_features: int, n_classes: int, task: str) -> Model:
    """``--model path/to/mymodel.py:factory`` (or ``module:factory``): the user's model.

    The factory is called as ``factory(n_features=, n_classes=, task=)`` and must return a
    :class:`~fedpipe.tasks.models.Model`; it then runs through
    :func:`fedpipe.tasks.checks.check_model` on a few random rows, and gets a ``spec`` that
    names the factory, so the run's ``model.json`` rebuilds it (the file is copied into the
    run directory).
    """
    import numpy as np
    from fedpipe.model import saved
    from fedpipe.tasks.checks import check_model

    args = {"n_features": n_features, "n_classes": n_classes, "task": task}
    path = ref.rpartition(":")[0]
    model = saved.call_factory(saved.load_factory(ref), ref, **args)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, n_features))
    y = rng.normal(size=12) if task == "regression" else np.arange(12) % n_classes
    try:
        check_model(model, X, y)
    except AssertionError as exc:
        raise ValidationError(f"--model {ref}: check_model failed: {exc}") from None
    spec = {"kind": "factory", "factory": ref, "args": args,
            **({"path": str(Path(path).resolve())} if path.endswith(".py") else {})}
    return model._replace(spec=spec)


# --------------------------------------------------------------------------------------------
# schedules


def _cosine(lr: float, total_steps: int | None, total: int | None = None,
            final: float = 0.0) -> Schedule:
    steps = total if total is not None else total_steps
    if steps is None:
        raise ValidationError("--lr-schedule cosine needs the number of steps: give "
                              "cosine:total=N or train for a fixed number of iterations/epochs")
    return schedules.cosine(lr, int(steps), final=final)


ScheduleFactory = Callable[..., Schedule]

LR_SCHEDULE_HELP = ("how --lr changes over the run, counted in updates of the global model (a "
                    "train iteration or mini-batch step, a federate round): constant (default), "
                    "step, exponential, inverse-time, cosine; parameters as "
                    "step:every=10,factor=0.5")

SCHEDULES: dict[str, ScheduleFactory] = {
    "constant": lambda lr, total_steps: schedules.constant(lr),
    "step": lambda lr, total_steps, every=10, factor=0.5: schedules.step_decay(lr, every, factor),
    "exponential": lambda lr, total_steps, rate=0.96, decay_steps=1:
        schedules.exponential(lr, rate, decay_steps),
    "inverse-time": lambda lr, total_steps, decay=1.0, decay_steps=1:
        schedules.inverse_time(lr, decay, decay_steps),
    "cosine": _cosine,
}


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _schedule_params(spec: str, factory: ScheduleFactory) -> dict[str, int | float]:
    name, _, rest = spec.partition(":")
    allowed = [p for p in inspect.signature(factory).parameters if p not in ("lr", "total_steps")]
    params = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise ValidationError(f"--lr-schedule {spec!r}: {name} takes "
                                  f"{', '.join(f'{a}=' for a in allowed) or 'no parameters'}")
        try:
            params[key] = _number(value.strip())
        except ValueError:
            raise ValidationError(f"--lr-schedule {spec!r}: {key} must be a number") from None
    return params


def parse_schedule(spec: str, lr: float, total_steps: int | None = None,
                   flag: str = "--lr-schedule") -> Schedule:
    """A schedule from a spec like ``"cosine"`` or ``"step:every=10,factor=0.5"``.

    ``total_steps`` (the run's number of updates) is what ``cosine`` decays over unless the
    spec gives ``total=N``.

    Raises
    ------
    ValidationError
        Unknown name or parameter, or a value the schedule rejects.
    """
    name = spec.partition(":")[0].strip().replace("_", "-")
    if name not in SCHEDULES:
        raise ValidationError(f"unknown {flag} {name!r}; choose from {', '.join(SCHEDULES)}")
    factory = SCHEDULES[name]
    try:
        return factory(lr, total_steps, **_schedule_params(spec, factory))
    except ValidationError as exc:  # written for --lr-schedule; a caller may name another flag
        raise ValidationError(str(exc).replace("--lr-schedule", flag)) from None
    except ValueError as exc:
        raise ValidationError(f"{flag} {spec!r}: {exc}") from None


# --------------------------------------------------------------------------------------------
# optimizers

OptimizerFactory = Callable[[float | Schedule], Optimizer | LBFGS]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": optimizers.sgd,
    "momentum": optimizers.momentum,
    "nesterov": optimizers.nesterov,
    "adagrad": optimizers.adagrad,
    "rmsprop": optimizers.rmsprop,
    "adam": optimizers.adam,
    "adamw": optimizers.adamw,
    "yogi": optimizers.yogi,
    "lbfgs": lambda lr: lbfgs(),  # step lengths come from its line search, not from lr
}


def make_optimizer(name: str, lr: float, schedule: str | Schedule | None = None,
                   total_steps: int | None = None) -> Optimizer | LBFGS:
    """The optimizer called ``name`` with learning rate ``lr`` and an optional schedule.

    Parameters
    ----------
    name : str
        A key of :data:`OPTIMIZERS`.
    lr : float
        Base learning rate (> 0), the schedule's value at step 0.
    schedule : str or Schedule, optional
        A spec for :func:`parse_schedule` or a schedule function (then ``lr`` is unused).
    total_steps : int, optional
        Number of updates of the run (for ``cosine``).

    Raises
    ------
    ValidationError
        Unknown name, ``lr <= 0``, a bad schedule, or a schedule given to ``lbfgs``.
    """
    if name not in OPTIMIZERS:
        raise ValidationError(f"unknown --optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if not _is_number(lr) or not lr > 0:
        raise ValidationError(f"--lr must be a positive number, got {lr!r}")
    if name == "lbfgs":
        if schedule not in (None, "constant"):
            raise ValidationError("--optimizer lbfgs takes no --lr-schedule (its line search "
                                  "chooses each step)")
        return OPTIMIZERS[name](lr)
    rate = schedule if callable(schedule) else parse_schedule(schedule or "constant", float(lr),
                                                               total_steps)
    try:
        return OPTIMIZERS[name](rate)
    except ValueError as exc:
        raise ValidationError(f"--optimizer {name}: {exc}") from None


# --------------------------------------------------------------------------------------------
# federated strategies (STRATEGIES) are registered below by the federated engine.

from fedpipe.tasks import aggregate as _aggregate  # noqa: E402  (kept next to the map it serves)


def _server(factory: Callable[..., Any]) -> Callable[..., Any]:
    # None keeps the strategy's own default server step size (1.0 for averaging, 1e-2 adaptive).
    return lambda server_lr=None, mu=0.0: factory(**({} if server_lr is None else
                                                     {"server_lr": server_lr}))


STRATEGIES: dict[str, Callable[..., Any]] = {
    "fedavg": _server(_aggregate.fedavg),
    "fedprox": lambda server_lr=None, mu=0.01: _aggregate.fedprox(
        mu, **({} if server_lr is None else {"server_lr": server_lr})),
    "fedavgm": _server(_aggregate.fedavgm),
    "fedadam": _server(_aggregate.fedadam),
    "fedyogi": _server(_aggregate.fedyogi),
    "fedadagrad": _server(_aggregate.fedadagrad),
    "scaffold": _server(_aggregate.scaffold),
}
"""Federated strategies: name -> ``factory(server_lr=None, mu=...) -> fedpipe.tasks.aggregate.Strategy``."""

CLIENT_OPTIMIZERS = tuple(name for name in OPTIMIZERS if name != "lbfgs")
"""``federate --client-optimizer``: the first-order :data:`OPTIMIZERS` (a client takes steps)."""


def make_strategy(name: str, server_lr: float | None, mu: float | None,
                  client_optimizer: str = "sgd", lr: float = 0.1) -> Any:
    """The strategy of ``--strategy``, ``--server-lr``, ``--mu`` and ``--client-optimizer``.

    ``--mu`` belongs to fedprox: given with another strategy it is refused, not dropped. The
    default client ``sgd`` is left to the engine (its ``--lr-schedule`` counts rounds); another
    name becomes the strategy's ``client`` optimizer at ``lr``.
    """
    if mu is not None and name != "fedprox":
        raise ValidationError(f"--mu applies to --strategy fedprox, not {name}")
    strategy = STRATEGIES[name](server_lr=server_lr,
                                **({} if mu is None else {"mu": mu}))
    if client_optimizer == "sgd":
        return strategy
    if client_optimizer not in CLIENT_OPTIMIZERS:
        raise ValidationError(f"unknown --client-optimizer {client_optimizer!r}; choose from "
                              f"{', '.join(CLIENT_OPTIMIZERS)}")
    return strategy._replace(client=OPTIMIZERS[client_optimizer](lr))


# --------------------------------------------------------------------------------------------
# aggregation chain: --dp, --clip, --noise-multiplier, --aggregator, --compress

from fedpipe.tasks import aggregators as _aggregators  # noqa: E402
from fedpipe.tasks import compress as _compress  # noqa: E402
from fedpipe.tasks import privacy as _privacy  # noqa: E402

AGGREGATORS: dict[str, Callable[..., Any]] = {
    "mean": lambda: _aggregators.mean(),
    "median": lambda: _aggregators.median(),
    "trimmed-mean": lambda fraction=0.1: _aggregators.trimmed_mean(fraction),
    "krum": lambda fraction=0.2: _aggregators.krum(fraction),
    "multi-krum": lambda fraction=0.2: _aggregators.multi_krum(fraction),
    "centered-clip": lambda tau=1.0: _aggregators.centered_clip(tau),
}
"""``--aggregator NAME[:PARAM]``: trimmed-mean/krum/multi-krum take the Byzantine fraction,
centered-clip its radius tau."""

COMPRESSORS: dict[str, Callable[..., Any]] = {
    "fp16": lambda bound, seed: _compress.fp16(bound=bound),
    "int8": lambda bound, seed, *_: _compress.int8(seed=seed, bound=bound),
    "topk": lambda bound, seed, fraction=0.01: _compress.topk(fraction, bound=bound),
}
"""``--compress fp16|int8|topk:FRACTION``."""


def _name_and_param(flag: str, spec: str, names: Mapping[str, Any]) -> tuple[str, list[float]]:
    name, _, rest = spec.partition(":")
    name = name.strip().replace("_", "-")
    if name not in names:
        raise ValidationError(f"unknown {flag} {name!r}; choose from {', '.join(names)}")
    try:
        params = [float(p) for p in rest.split(",") if p.strip()]
    except ValueError:
        raise ValidationError(f"{flag} {spec!r}: the parameter after ':' must be a number") from None
    return name, params


def parse_clip(text: str | float | None) -> float | str | None:
    """``--clip S`` (a norm > 0) or ``--clip adaptive[:QUANTILE]``."""
    if text is None or isinstance(text, float | int):
        return None if text is None else float(text)
    if text.strip().startswith("adaptive"):
        return text.strip()
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(f"--clip must be a norm > 0 or 'adaptive[:QUANTILE]', "
                              f"got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValidationError(f"--clip must be > 0, got {text!r}")
    return value


def make_chain(*, dp: str | None, clip: float | str | None, noise_multiplier: float | None,
               aggregator: str, compress: str | None, clients_per_round: int, seed: int,
               reproducible_noise: bool = False) -> tuple[Any, ...]:
    """The aggregation chain the CLI's flags describe (see docs/privacy.md for the order).

    ``validate -> clip -> compress -> [local noise] -> aggregator``; with ``--dp central`` the
    aggregator is the fixed-denominator ``dp_mean`` followed by the server's noise (or
    adaptive clipping, which clips and noises in one stage).

    Raises
    ------
    ValidationError
        Settings that do not go together, named in one line.
    """
    if dp is None and noise_multiplier is not None:
        raise ValidationError("--noise-multiplier needs --dp central|local")
    if dp is not None and clip is None:
        raise ValidationError(f"--dp {dp} needs --clip S (the sensitivity the noise is sized for)")
    adaptive = isinstance(clip, str)
    if adaptive and dp != "central":
        raise ValidationError("--clip adaptive needs --dp central (it spends budget on the count)")
    if dp is not None and noise_multiplier is None:
        raise ValidationError(f"--dp {dp} needs --noise-multiplier Z or --target-epsilon E")
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier)
                                             and noise_multiplier > 0):
        raise ValidationError(f"--noise-multiplier must be > 0, got {noise_multiplier}")
    noise_seed = seed if reproducible_noise else None
    chain: list[Any] = [_aggregate.validate()]
    bound = None if adaptive else clip
    if bound is not None:
        chain.append(_privacy.clip(bound))
    if compress is not None:
        name, params = _name_and_param("--compress", compress, COMPRESSORS)
        try:
            chain.append(COMPRESSORS[name](bound if dp else None, seed, *params))
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"--compress {compress!r}: {exc}") from None
    name, params = _name_and_param("--aggregator", aggregator, AGGREGATORS)
    try:
        if dp == "central":
            if name != "mean":
                raise ValidationError(f"--dp central with --aggregator {name}: a robust rule "
                                      "breaks the sensitivity bound the noise is sized for; "
                                      "use --aggregator mean, or --dp local")
            chain.append(_privacy.dp_mean(clients_per_round))
            if adaptive:
                quantile = float(clip.partition(":")[2] or 0.5)
                chain.append(_privacy.adaptive_clip(noise_multiplier, clients_per_round,
                                                    quantile=quantile, seed=noise_seed))
            else:
                chain.append(_privacy.gaussian_noise(noise_multiplier, bound, "central",
                                                     seed=noise_seed))
            return tuple(chain)
        if dp == "local":
            chain.append(_privacy.gaussian_noise(noise_multiplier, bound, "local",
                                                 seed=noise_seed))
        chain.append(AGGREGATORS[name](*params))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError(f"--aggregator/--clip: {exc}") from None
    return tuple(chain)
