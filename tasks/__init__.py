"""fedpipe's math layer: pure NumPy functions that run inside Dask tasks (no Dask import here)."""
