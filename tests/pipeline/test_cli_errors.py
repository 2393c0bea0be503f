"""The error policy, tried as a hostile user would: every failure ends in one line on stderr,
with exit 2 for bad input, 3 for an infrastructure failure, 1 for a fedpipe bug; no traceback
and none of Dask's own logs unless ``-v``."""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fedpipe.cli import main as cli_main
from fedpipe.cli.main import main

FEDPIPE = [sys.executable, "-m", "fedpipe.cli.main"]


def _fedpipe(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDPIPE, *argv], capture_output=True, text=True, timeout=timeout)


def _one_line_error(stderr: str, command: str) -> str:
    assert "Traceback" not in stderr and "distributed." not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"fedpipe {command}: ")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def not_dask():
    """A TCP service on loopback that is not Dask (it greets like SSH)."""

    class Greeter(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            time.sleep(0.5)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_garbage_store_metadata_is_one_line(small_store, capsys):
    store = small_store()
    (Path(store) / "zarr.json").write_text("garbage")
    assert main(["info", store]) == 2
    assert "unreadable zarr metadata" in _one_line_error(capsys.readouterr().err, "info")


def test_unwritable_destinations_are_one_line(small_store, capsys):
    assert main(["ingest", "sklearn:iris", "/proc/no/such/store.zarr"]) == 2
    _one_line_error(capsys.readouterr().err, "ingest")
    assert main(["train", small_store(), "--model", "softmax", "--iterations", "1",
                 "--out", "/proc/no/run"]) == 2
    _one_line_error(capsys.readouterr().err, "train")


def test_tls_without_certificates_is_refused(small_store, capsys):
    assert main(["train", small_store(), "--model", "softmax", "--iterations", "1",
                 "--scheduler", f"tls://127.0.0.1:{_free_port()}"]) == 2
    assert "TLS needs certificates" in _one_line_error(capsys.readouterr().err, "train")


def test_a_port_that_is_not_dask_is_refused_fast(small_store, capsys, not_dask):
    start = time.perf_counter()
    assert main(["train", small_store(), "--model", "softmax", "--iterations", "1",
                 "--scheduler", not_dask]) == 2
    assert time.perf_counter() - start < 10
    assert "not a Dask scheduler" in _one_line_error(capsys.readouterr().err, "train")


def test_a_closed_port_is_an_infrastructure_failure(small_store, capsys):
    assert main(["federate", small_store(), "--clients", "2", "--model", "softmax",
                 "--rounds", "1", "--scheduler", f"tcp://127.0.0.1:{_free_port()}"]) == 3
    assert "cannot reach scheduler" in _one_line_error(capsys.readouterr().err, "federate")


def test_a_missing_chunk_stops_the_run_without_dask_logs(small_store, tmp_path):
    store = Path(small_store())
    (store / "X" / "c" / "3" / "0").unlink()
    done = _fedpipe("train", str(store), "--model", "softmax", "--iterations", "2",
                    "--workers", "1")
    assert done.returncode == 2
    assert "chunk 3 of X is missing" in _one_line_error(done.stderr, "train")


def test_a_bug_is_one_line_with_exit_1_and_a_traceback_only_with_v(monkeypatch, capsys,
                                                                  caplog):
    def broken(args):
        raise RuntimeError("something fedpipe did not expect")

    parser = cli_main.build_parser

    def patched():
        built = parser()
        for action in built._subparsers._group_actions:
            action.choices["info"].set_defaults(func=broken)
        return built

    monkeypatch.setattr(cli_main, "build_parser", patched)
    assert main(["info", "x.zarr"]) == 1
    assert "internal error" in _one_line_error(capsys.readouterr().err, "info")
    assert not [r for r in caplog.records if r.exc_info]
    assert main(["info", "x.zarr", "-v"]) == 1
    assert [r for r in caplog.records if r.exc_info]  # the traceback, logged


@pytest.mark.chaos  # a real scheduler process killed: ~10 s; make test keeps the message test (test_scheduler_loss.py)
def test_losing_the_scheduler_mid_run_is_exit_3(small_store, tmp_path):
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    scheduler = subprocess.Popen([bin_dir / "dask", "scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([bin_dir / "dask", "worker", f"tcp://127.0.0.1:{port}",
                               "--nthreads", "1", "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "run"
    try:
        run = subprocess.Popen([*FEDPIPE, "train", small_store(), "--model", "softmax",
                                "--iterations", "100000", "--scheduler",
                                f"tcp://127.0.0.1:{port}", "--out", str(out), "-q"],
                               stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 90
        while not (out / "metrics.jsonl").exists() or os.path.getsize(out / "metrics.jsonl") < 500:
            assert time.time() < deadline and run.poll() is None, "the run never started"
            time.sleep(0.2)
        scheduler.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        stderr = run.communicate(timeout=60)[1]
        assert run.returncode == 3
        assert time.perf_counter() - killed < 30
        _one_line_error(stderr, "train")
    finally:
        for proc in (scheduler, worker):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_missing_partition_chunk_stops_federate_naming_it(small_store, capsys):
    store = small_store("synthetic:classification?n_samples=800&n_features=5&n_classes=3&seed=0")
    assert main(["partition", store, "--clients", "4", "--name", "fed", "-q"]) == 0
    chunk = next(Path(store).glob("partitions/fed/*/X/c/3/0"))  # one client's rows
    chunk.unlink()
    capsys.readouterr()
    # it used to drop that client and its worker's other client every round, and exit 0
    assert main(["federate", store, "--partition", "fed", "--model", "softmax", "--rounds", "2",
                 "--workers", "2", "-q"]) == 2
    line = _one_line_error(capsys.readouterr().err, "federate")
    assert f"chunk 3 of {chunk.parent.parent.parent.relative_to(store)} is missing" in line
