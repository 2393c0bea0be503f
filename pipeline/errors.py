"""User-facing errors: each names its culprit in one line.

The CLI maps :class:`FedpipeError` (bad input or bad data) to exit status 2 and
:class:`InfrastructureError` (the cluster, the network or the disk failed, not the input) to 3.
"""


class FedpipeError(ValueError):
    """Base class of every error fedpipe raises for bad input or bad data."""


class ValidationError(FedpipeError):
    """The source data or an argument failed validation (names the column, row or flag)."""


class StoreError(FedpipeError):
    """A zarr store is missing, corrupt, incomplete or of the wrong layout."""


class ConfigError(FedpipeError):
    """A configuration key is unknown or has the wrong type."""


class TrainingError(FedpipeError):
    """Training could not go on (divergence, too few clients, a cluster that cannot place work)."""


class InfrastructureError(Exception):
    """The cluster, network or disk failed (not the input): exit status 3 from the CLI.

    Not a :class:`FedpipeError`: retrying the same command later may succeed.
    """
