"""Every aggregation stage as a value: ``fp.stages.clip(1.0)``, ``fp.stages.topk(0.01)``, ...

A chain reads in execution order on the client (``before_sum``) and in reverse on the server::

    chain = (validate(), clip(1.0), topk(0.01), dp_mean(10), gaussian_noise(1.0, 1.0))

The aggregators (``mean``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``,
``centered_clip``) are in :mod:`fedpipe.tasks.aggregators` (``fp.aggregators``) and re-exported
here so that one import builds a whole chain.
"""

from __future__ import annotations

from .aggregate import Stage, check_chain, default_chain, validate, weighted_mean
from .aggregators import centered_clip, krum, mean, median, multi_krum, trimmed_mean
from .compress import fp16, int8, topk
from .privacy import adaptive_clip, clip, dp_mean, gaussian_noise

__all__ = ["Stage", "adaptive_clip", "centered_clip", "check_chain", "clip", "default_chain",
           "dp_mean", "fp16", "gaussian_noise", "int8", "krum", "mean", "median", "multi_krum",
           "topk", "trimmed_mean", "validate", "weighted_mean"]


def __getattr__(name: str):
    # fp.stages.secure_sum lives in .secure, loaded on first use: the chain's other stages (and
    # the workers unpickling them) need no cryptography package.
    if name == "secure_sum":
        from .secure import secure_sum

        return secure_sum
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
