"""fedpipe's orchestration layer: zarr storage, Dask graphs, training loops, rounds and the CLI."""

from pipeline.errors import ConfigError, FedpipeError, StoreError, TrainingError, ValidationError

__all__ = ["FedpipeError", "ValidationError", "StoreError", "ConfigError", "TrainingError"]
