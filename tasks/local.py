"""What a federated client computes on its own rows: local training.

Pure NumPy on concrete arrays. The randomness of a client's round (its mini-batch order) comes
from ``(seed, round, client)`` only, so any worker that runs the task gets the same result.
A client's test metrics are the data-parallel engine's: :func:`fedpipe.tasks.reduce.eval_sums` of its
test rows, added over clients and finished by :func:`fedpipe.tasks.reduce.finish_metrics`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .models import Model
from .optimizers import CLIENT, REPORT, SERVER, Optimizer

Packet = dict[str, np.ndarray]


class LocalResult(NamedTuple):
    """Output of :func:`local_train`.

    Attributes
    ----------
    packet : dict of str to ndarray
        What enters the aggregation chain: ``delta`` (trained minus received params), ``n`` (rows,
        0-d) and what the client transforms report (SCAFFOLD's ``control``: the change of the
        client's control variate).
    metrics : dict of str to float
        ``train_loss`` (mean data loss over the batches seen), ``n``, ``steps``.
    kept : dict of str to ndarray
        The client transforms' state the client keeps until its next round (its worker holds
        it): the optimizer state's ``client/`` entries, e.g. SCAFFOLD's ``client/control``.
    """

    packet: Packet
    metrics: dict[str, float]
    kept: dict[str, np.ndarray]


def client_rng(seed: int, round_: int, client: str) -> np.random.Generator:
    """The random stream of one client in one round, independent of where it runs."""
    # A stable integer for any client id: Python's hash() is salted per process.
    tag = int.from_bytes(hashlib.sha256(str(client).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(round_), tag])


def round_lr(lr: float | Callable[[int], float], round_: int) -> float:
    """The client learning rate of a round: a constant or a schedule evaluated at the round."""
    return float(lr(round_)) if callable(lr) else float(lr)


def carry_of(kept: dict[str, np.ndarray], control: np.ndarray | None) -> dict[str, np.ndarray]:
    """What :func:`local_train` sets into a client's optimizer state for a round: the client
    transforms' state the client kept (``client/`` keys of ``kept``) and the server's control
    variate when the run has one (SCAFFOLD's ``server/control``)."""
    carry = {k: v for k, v in kept.items() if k.startswith(CLIENT)}
    if control is not None:
        carry[f"{SERVER}control"] = control
    return carry


def local_train(model: Model, params: np.ndarray, X: np.ndarray, y: np.ndarray, *,
                epochs: int, batch_size: int, lr: float, rng: np.random.Generator,
                optimizer: Optimizer | None = None,
                carry: dict[str, np.ndarray] | None = None) -> LocalResult:
    """E epochs of mini-batch steps of ``optimizer`` from the global params on one client's rows.

    Parameters
    ----------
    model : Model
        The model; its ``loss_and_grad`` returns sums, divided here by the batch size.
    params : ndarray
        Global parameters received this round (not modified).
    X, y : ndarray
        The client's training rows.
    epochs, batch_size : int
        Local epochs and mini-batch size (a batch at least ``len(y)`` is full-batch GD, rows in
        stored order).
    lr : float
        Client step size for this round (see :func:`round_lr`) of the default ``sgd``.
    rng : numpy.random.Generator
        Source of the batch order (see :func:`client_rng`).
    optimizer : Optimizer, optional
        The client's local optimizer with its client transforms chained before it (FedProx's
        :func:`~fedpipe.tasks.optimizers.add_proximal`, SCAFFOLD's
        :func:`~fedpipe.tasks.optimizers.control_variates`); its state starts from ``init``
        every round. Default ``sgd(lr)``.
    carry : dict of str to ndarray, optional
        Entries set into the optimizer's state after ``init``: the client's kept ``client/``
        state and the ``server/`` values the server sent this round.

    Returns
    -------
    LocalResult

    References
    ----------
    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017 (ClientUpdate).
    """
    n = len(y)
    w = np.array(params, dtype=np.float64, copy=True)
    opt_state = None if optimizer is None else optimizer.init(w)
    if carry:
        unknown = set(carry) - set(opt_state or ())
        if unknown:
            raise ValueError(f"carry has {sorted(unknown)}, which the client optimizer's state "
                             "does not hold")
        opt_state.update(carry)
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(epochs):
        # Full-batch GD keeps stored row order so it equals data-parallel gradient descent.
        order = None if batch_size >= n else rng.permutation(n)
        Xe, ye = (X, y) if order is None else (X[order], y[order])
        for start in range(0, n, batch_size):
            batch_loss, grad_sum, nb = model.loss_and_grad(w, Xe[start:start + batch_size],
                                                           ye[start:start + batch_size])
            grad = grad_sum / nb + model.penalty(w)[1]
            if optimizer is None:  # sgd(lr), the same bits without its ~4 us a step
                w -= lr * grad
            else:
                updates, opt_state = optimizer.update(grad, opt_state, w)
                w += updates
            steps, loss_sum, seen = steps + 1, loss_sum + batch_loss, seen + nb
    packet: Packet = {"delta": w - params, "n": np.asarray(float(n))}
    state = opt_state or {}
    packet |= {k.removeprefix(REPORT): v for k, v in state.items() if k.startswith(REPORT)}
    kept = {k: v for k, v in state.items() if k.startswith(CLIENT)}
    metrics = {"train_loss": loss_sum / max(seen, 1), "n": float(n), "steps": float(steps)}
    return LocalResult(packet, metrics, kept)
