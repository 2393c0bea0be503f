"""Worker preload: import the modules of fedpipe's tasks before the worker joins the scheduler.

A worker process imports a task's module when it unpickles its first task. For fedpipe's
tasks that is dask.array, zarr and fedpipe itself, ~1 s on a quiet 2-core machine. A worker
the nanny restarts after a crash registers at once and is handed the lost worker's chunks to
reload: the iteration that met the kill then waited ~1.5 s (38x the median iteration,
benchmarks/chaos.py) for imports. Dask imports the modules named in ``preload`` before the
worker registers (``distributed.worker.preload``), so it arrives ready.
:func:`fedpipe.cluster.connect` names this module for the clusters it starts; a cluster of
your own takes ``dask worker --preload fedpipe.preload``.
"""

from __future__ import annotations

# What the tasks of fit (load, grad, eval, sum) and federate (local, sum) run.
import fedpipe.engine.fed_client  # noqa: F401
import fedpipe.engine.train_pass  # noqa: F401
