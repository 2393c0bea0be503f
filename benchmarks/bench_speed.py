"""What a user gets from ``fedpipe train`` at its defaults, beside the hardware's limit.

Run ``python -m benchmarks.bench_speed [--rows N] [--chunk-rows R] [--dtype float32]
[--iterations T] [--out FILE]`` from the repository root; prints one table and one JSON
object. Full-batch logistic regression (SGD) on a Gaussian problem, ``--rows`` x 50
(default 2,000,000, the CLI's default chunk size), every row trained on (``--test-fraction 0``).
Measured in one run, median seconds per iteration:

* ``cli_defaults``: ``fedpipe train STORE --model logistic --iterations T --test-fraction 0``
  in a subprocess, as a user types it (its own LocalCluster, every other option defaulted);
* ``cli_tuned``: the same with ``--workers W --threads 1 --cache memory --chunks-per-task
  ceil(chunks / W)`` (one task per worker, W = the workers the defaults got);
* ``cli_float32`` (``--dtype float32`` only): the defaults plus ``--compute-dtype float32``,
  and ``float32_params_gap``: max |params - float64 run's| / max |float64 run's params|;
* ``fused_loop``: one process, the fused cache-blocked kernel over in-memory chunks
  (:mod:`fedpipe.tasks.kernels`) and the SGD update, default BLAS threads and one;
* ``naive_numpy``: ``model.loss_and_grad`` on the whole array (``X @ w``, then ``X.T @ r``);
* ``roofline``: reading X once from memory (``X.sum()``) in one process, and in W processes
  on W parts at once.

The machine may be shared: compare the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_FEATURES = 50
LR = 0.5  # below 2/L of the Gaussian problem (L ~ 0.25): no diverging margins


def make_store(path: str, n_rows: int, chunk_rows: int | None, dtype: str, seed: int = 0) -> str:
    """Standard normal features, labels drawn from a logistic model's probabilities."""
    from fedpipe.data.ingest import ingest_arrays

    rng = np.random.default_rng(seed)
    coef = rng.standard_normal(N_FEATURES) / np.sqrt(N_FEATURES) * 2.0
    X = rng.standard_normal((n_rows, N_FEATURES))
    y = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-(X @ coef)))).astype(np.int64)
    ingest_arrays(X, y, path, chunk_rows=chunk_rows, dtype=dtype, overwrite=True,
                  progress=False)
    return path


def params_gap(run: str, ref: str) -> float:
    """Largest parameter difference between two runs, relative to the largest parameter."""
    a, b = (np.load(os.path.join(r, "params.npz")) for r in (run, ref))
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in b.files)
    return diff / max(float(np.abs(b[k]).max()) for k in b.files)


def cli_train(store: str, out: str, iterations: int, *flags: str) -> dict:
    """``fedpipe train`` as a user runs it; its summary, with the median iteration time."""
    fedpipe = Path(sys.executable).with_name("fedpipe")
    cmd = [str(fedpipe), "train", store, "--model", "logistic", "--lr", str(LR),
           "--iterations", str(iterations), "--test-fraction", "0", "--out", out, "--json",
           *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    shown = " ".join(cmd[1:]).replace(store, "STORE").replace(out, "RUN")  # no local paths
    return {"seconds": summary["seconds_per_iteration"], "command": shown,
            **{k: summary[k] for k in ("n_workers", "n_chunks", "chunks_per_task", "cache")}}


def _median_step(step, iterations: int) -> float:
    step()  # warm
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def local_loops(store: str, iterations: int, dtype: str) -> dict:
    """The fused single-process loop and the naive whole-array loop, on the same rows."""
    import dataclasses

    from fedpipe.data.store import chunk_refs, read_chunk, read_info
    from fedpipe.tasks import kernels, models, optimizers, reduce
    from threadpoolctl import threadpool_limits

    info = dataclasses.replace(read_info(store), compute_dtype=dtype)  # rows as stored
    chunks = [read_chunk(store, r, info=info) for r in chunk_refs(info)]
    model, opt = models.logistic(N_FEATURES), optimizers.sgd(LR)
    kernel = kernels.fused(model)
    state = {"p": model.init(0)}
    state["s"] = opt.init(state["p"])

    def update(sums) -> None:
        _, grad = reduce.objective(*sums, model, state["p"])
        updates, state["s"] = opt.update(grad, state["s"], state["p"])
        state["p"] = state["p"] + updates

    def fused() -> None:
        update(reduce.add_sums(*(kernel(state["p"], X, y) for X, y in chunks)))

    out = {"fused_loop": _median_step(fused, iterations)}
    with threadpool_limits(limits=1, user_api="blas"):
        out["fused_loop_one_blas_thread"] = _median_step(fused, iterations)
    X = np.concatenate([c[0] for c in chunks])
    y = np.concatenate([c[1] for c in chunks])
    chunks.clear()
    out["naive_numpy"] = _median_step(lambda: update(model.loss_and_grad(state["p"], X, y)),
                                      iterations)
    out["read_once_1_process"] = _median_step(X.sum, iterations)
    return out


def _reader(rows: int, dtype: str, barrier, times, iterations: int) -> None:
    X = np.random.default_rng(0).standard_normal((rows, N_FEATURES)).astype(dtype)
    for _ in range(iterations + 1):
        barrier.wait()
        start = time.perf_counter()
        X.sum()
        times.put(time.perf_counter() - start)


def read_once_parallel(n_rows: int, dtype: str, processes: int, iterations: int) -> float:
    """Seconds to read X once with ``processes`` processes, each summing its own part."""
    ctx = mp.get_context("spawn")
    barrier, times = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(-(-n_rows // processes), dtype, barrier, times,
                                               iterations)) for _ in range(processes)]
    for p in procs:
        p.start()
    samples = [times.get() for _ in range((iterations + 1) * processes)]
    for p in procs:
        p.join()
    # one sample per process and iteration, in order of finishing: the slowest of each round
    rounds = [max(samples[i:i + processes]) for i in range(0, len(samples), processes)]
    return statistics.median(rounds[1:])


def table(result: dict) -> str:
    ref = result["cli_defaults"]["seconds"]
    rows = [("fedpipe train, CLI defaults", ref),
            *([("  ... --compute-dtype float32", result["cli_float32"]["seconds"])]
              if "cli_float32" in result else []),
            ("fedpipe train, tuned flags", result["cli_tuned"]["seconds"]),
            ("fused single-process loop", result["fused_loop"]),
            ("fused loop, one BLAS thread", result["fused_loop_one_blas_thread"]),
            ("naive NumPy loop (whole array)", result["naive_numpy"]),
            ("read X once, 1 process", result["read_once_1_process"]),
            (f"read X once, {result['workers']} processes", result["read_once_workers"])]
    lines = [f"{'':34s} {'s/iteration':>12s} {'defaults / this':>16s}"]
    lines += [f"{name:34s} {sec:12.4f} {ref / sec:15.2f}x" for name, sec in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--chunk-rows", type=int, help="default: the CLI's (about 8 MiB)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(os.path.join(tmp, "speed.zarr"), args.rows, args.chunk_rows,
                           args.dtype)
        defaults = cli_train(store, os.path.join(tmp, "defaults"), args.iterations)
        workers = defaults["n_workers"]
        per_task = -(-defaults["n_chunks"] // workers)
        tuned = cli_train(store, os.path.join(tmp, "tuned"), args.iterations, "--workers",
                          str(workers), "--threads", "1", "--cache", "memory",
                          "--chunks-per-task", str(per_task))
        if args.dtype == "float32":
            single = cli_train(store, os.path.join(tmp, "float32"), args.iterations,
                               "--compute-dtype", "float32")
            extra = {"cli_float32": single, "float32_params_gap": params_gap(
                os.path.join(tmp, "float32"), os.path.join(tmp, "defaults"))}
        else:
            extra = {}
        result = {"rows": args.rows, "features": N_FEATURES, "dtype": args.dtype,
                  "workers": workers, "cli_defaults": defaults, "cli_tuned": tuned,
                  **local_loops(store, args.iterations, args.dtype),
                  "read_once_workers": read_once_parallel(args.rows, args.dtype, workers,
                                                          args.iterations), **extra}
    ref = defaults["seconds"]
    result["ratios"] = {
        "defaults / fused_loop": ref / result["fused_loop"],
        "defaults / read_once_workers": ref / result["read_once_workers"],
        "defaults / naive_numpy": ref / result["naive_numpy"],
        "defaults / tuned": ref / tuned["seconds"],
    }
    print(table(result))
    if "float32_params_gap" in result:
        print(f"float32 parameters differ from float64's by {result['float32_params_gap']:.1e}"
              " of the largest")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
